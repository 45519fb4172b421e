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

import re
from typing import Any

from core.io import read_jsonl
from core.types import DataError, Knowledge
from tasks.context_qa import ContextQATask, QAItem

PWC_FORMAT = 'JSON lines {"input": <context>, "prompt": <question>, "answer": <answer>} (PwC)'
_PIECES = re.compile(r"\w+|[^\w\s]")


def answer_length(answer: str) -> int:
    return len(_PIECES.findall(answer))


class PwCTask(ContextQATask):
    """`task=pwc`: PwC contexts, single or batch injection, scored by QA-F1 on generated answers."""

    name = "pwc"

    def __init__(
        self,
        path: str,
        max_answer_tokens: int = 5,
        drop_questions_containing: list[str] | None = None,
        context_prefix: str = "",
        **common,
    ) -> None:
        super().__init__(**common)
        self.path = path
        self.max_answer_tokens = max_answer_tokens
        self.drop_questions_containing = [s.lower() for s in (drop_questions_containing or [])]
        self.context_prefix = context_prefix
        self.dropped: dict[str, int] = {"long_answer": 0, "dropped_phrase": 0}

    def load_items(self) -> list[QAItem]:
        groups: list[tuple[str, list[tuple[str, tuple[str, ...]]]]] = []
        for row in read_jsonl(self.path, required=("input", "prompt", "answer"), expected_format=PWC_FORMAT):
            context, question, answer = (str(row[k]).replace("<s>", "").strip() for k in ("input", "prompt", "answer"))
            if not groups or groups[-1][0] != context:
                groups.append((context, []))  # a context's rows are consecutive in PwC files
            if self.max_answer_tokens and answer_length(answer) > self.max_answer_tokens:
                self.dropped["long_answer"] += 1
                continue
            if any(phrase in question.lower() for phrase in self.drop_questions_containing):
                self.dropped["dropped_phrase"] += 1
                continue
            groups[-1][1].append((question, (answer,)))
        items = []
        for index, (context, questions) in enumerate(groups):
            if not context:
                raise DataError(f"{self.path}: context #{index} is empty; every PwC row needs a non-empty 'input'")
            if questions:
                knowledge = Knowledge(id=f"pwc-{index}", context=self.context_prefix + context)
                items.append(QAItem(knowledge, tuple(questions)))
        return items

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"path": str(self.path), "dropped_questions": dict(self.dropped)}
