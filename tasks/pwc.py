"""PwC (Prompt-with-Context, Ge et al. ICAE): `{"input": context, "prompt": question, "answer": answer}`.

Consecutive rows with the same `input` form one context and its questions, as in the SELF-PARAM
reference loader. Following the reference, the literal "<s>" is removed from every field, questions
mentioning "above text" are dropped (they only make sense with the text visible), and so are
questions whose answer is longer than `max_answer_tokens`. The reference counted tokens with the
OpenLLaMA tokenizer; to keep the filtered set identical for every model, kbench counts
model-independent word pieces (`\\w+` runs and single punctuation marks), which track SentencePiece
counts closely on short answers. `max_answer_tokens: 0` keeps every answer.
"""
from __future__ import annotations

import logging
import re
from typing import Any

from core.io import read_jsonl_numbered, text_field
from core.options import checked
from core.types import DataError, Knowledge, NonNegativeInt
from tasks.context_qa import ContextQATask, QAItem

PWC_FORMAT = 'JSON lines {"input": <context>, "prompt": <question>, "answer": <answer>} (PwC)'
log = logging.getLogger(__name__)
_PIECES = re.compile(r"\w+|[^\w\s]")


def answer_length(answer: str) -> int:
    return len(_PIECES.findall(answer))


class PwCTask(ContextQATask):
    """`task=pwc`: PwC contexts, single or batch injection, scored by QA-F1 on generated answers."""

    name = "pwc"

    @checked("task")
    def __init__(
        self,
        path: str,
        max_answer_tokens: NonNegativeInt = 5,
        drop_questions_containing: list[str] | None = None,
        context_prefix: str = "",
        **common,
    ) -> None:
        super().__init__(**common)
        self.path = path
        self.max_answer_tokens = max_answer_tokens
        self.drop_questions_containing = [s.lower() for s in (drop_questions_containing or [])]
        self.context_prefix = context_prefix
        self.dropped: dict[str, int] = dict.fromkeys(
            ("empty_question", "empty_answer", "duplicate_question", "repeated_context_merged", "long_answer",
             "dropped_phrase"), 0)

    def load_items(self) -> list[QAItem]:
        """Every context with its questions. Fields must be strings (null is refused naming file:line,
        never read as the text 'None'); a question or answer that is empty once "<s>" and spaces are
        removed is dropped and counted (an empty gold would score an empty prediction 1.0); a repeated
        (context, question) row is dropped and counted with the same answer, refused with another; a
        context that reappears after other contexts is merged into its first occurrence with a warning
        naming both file:lines, each such row counted under `repeated_context_merged` (it would
        otherwise be injected twice, as two contexts)."""
        groups: list[tuple[str, list[tuple[str, tuple[str, ...]]]]] = []
        first_line: dict[str, tuple[str, int]] = {}  # context -> (where first seen, its group)
        asked: dict[tuple[str, str], tuple[str, str]] = {}  # (context, question) -> (answer, where)
        for where, row in read_jsonl_numbered(self.path, required=("input", "prompt", "answer"), expected_format=PWC_FORMAT):
            context, question, answer = (
                text_field(row, k, where, PWC_FORMAT).replace("<s>", "").strip() for k in ("input", "prompt", "answer")
            )
            if not context:
                raise DataError(f"{where}: field 'input' (the context) is empty; every PwC row needs a context")
            if context in first_line:
                earlier, group = first_line[context]
                if group != len(groups) - 1:  # rows of a context are consecutive in PwC files; this one is not
                    log.warning("%s: context first seen at %s reappears after other contexts; its questions are "
                                "merged into that one (not injected twice)", where, earlier)
                    self.dropped["repeated_context_merged"] += 1
            else:
                first_line[context] = (where, len(groups))
                groups.append((context, []))
            questions = groups[first_line[context][1]][1]
            if not question or not answer:
                self.dropped["empty_question" if not question else "empty_answer"] += 1
                continue
            if (context, question) in asked:
                earlier, earlier_where = asked[(context, question)]
                if earlier != answer:
                    raise DataError(f"{where}: the same question about the same context as {earlier_where}, with another "
                                    f"answer ({answer!r} vs {earlier!r}); merge them or make the questions differ")
                self.dropped["duplicate_question"] += 1
                continue
            asked[(context, question)] = (answer, where)
            if self.max_answer_tokens and answer_length(answer) > self.max_answer_tokens:
                self.dropped["long_answer"] += 1
                continue
            if any(phrase in question.lower() for phrase in self.drop_questions_containing):
                self.dropped["dropped_phrase"] += 1
                continue
            questions.append((question, (answer,)))
        items = []
        for index, (context, questions) in enumerate(groups):
            if questions:
                knowledge = Knowledge(id=f"pwc-{index}", context=self.context_prefix + context)
                items.append(QAItem(knowledge, tuple(questions)))
        return items

    def dropped_summary(self) -> dict[str, int]:
        return dict(self.dropped)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"path": str(self.path)}
