"""`task=csv_qa`: context QA from your own CSV file (columns `context`, `question`, `answer`).

A complete kbench task plugin in one file, kept outside kbench's own packages (docs/adding_a_task.md).
Rows that share a context form one piece of knowledge with its questions; a question with several
gold answers lists them separated by `answer_separator`. It reuses kbench's `ContextQATask`, so it
has the same injection modes (`single`: reset, inject one context, ask its questions; `batch`) and
the same scoring (QA-F1, exact match, contains) as `task=pwc`; only the loading is new.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from core.io import FirstSeen, read_text
from core.options import checked
from core.types import DataError, Knowledge, NonEmptyStr
from tasks.context_qa import ContextQATask, QAItem

COLUMNS = ("context", "question", "answer")
BUNDLED = Path(__file__).resolve().parent / "facts.csv"


class CSVQATask(ContextQATask):
    name = "csv_qa"

    @checked("task")
    def __init__(self, path: str | None = None, answer_separator: NonEmptyStr = "|", **knobs: Any) -> None:
        super().__init__(**knobs)
        self.path = Path(path).expanduser() if path else BUNDLED
        self.answer_separator = answer_separator

    def load_items(self) -> list[QAItem]:
        fmt = "a CSV file with a header row: context,question,answer"
        # kbench's reader: a non-UTF-8 byte is reported as file:line, not as a byte offset
        reader = csv.DictReader(io.StringIO(read_text(self.path, fmt), newline=""))
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"{self.path}: missing column(s) {missing}; the header must name {list(COLUMNS)}")
        questions: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        asked = FirstSeen("question about this context")  # the same question twice would be scored twice
        for row in reader:
            where = f"{self.path}:{reader.line_num}"
            empty = [c for c in COLUMNS if not (row[c] or "").strip()]
            if empty:
                raise DataError(f"{where}: empty {empty}; every row needs a context, a question and an answer")
            answers = tuple(a.strip() for a in row["answer"].split(self.answer_separator) if a.strip())
            if not answers:  # e.g. "|": nothing left after splitting, and an empty gold would score 1.0
                raise DataError(f"{where}: the answer {row['answer']!r} holds no answer between the "
                                f"{self.answer_separator!r} separators")
            asked.add((row["context"].strip(), row["question"].strip()), where)
            questions.setdefault(row["context"].strip(), []).append((row["question"].strip(), answers))
        return [
            QAItem(Knowledge(id=f"csv{index}", context=context), tuple(asked))
            for index, (context, asked) in enumerate(questions.items())
        ]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"path": str(self.path)}
