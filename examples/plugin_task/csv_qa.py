"""`task=csv_qa`: context QA from your own CSV file (columns `context`, `question`, `answer`).

A complete kbench task plugin in one file, kept outside kbench's own packages (docs/adding_a_task.md).
Rows that share a context form one piece of knowledge with its questions; a question with several
gold answers lists them separated by `answer_separator`. It reuses kbench's `ContextQATask`, so it
has the same injection modes (`single`: reset, inject one context, ask its questions; `batch`) and
the same scoring (QA-F1, exact match, contains) as `task=pwc`; only the loading is new.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from core.io import require_file
from core.types import DataError, Knowledge
from tasks.context_qa import ContextQATask, QAItem

COLUMNS = ("context", "question", "answer")
BUNDLED = Path(__file__).resolve().parent / "facts.csv"


class CSVQATask(ContextQATask):
    name = "csv_qa"

    def __init__(self, path: str | None = None, answer_separator: str = "|", **knobs: Any) -> None:
        super().__init__(**knobs)
        self.path = Path(path).expanduser() if path else BUNDLED
        self.answer_separator = answer_separator

    def load_items(self) -> list[QAItem]:
        path = require_file(self.path, "a CSV file with a header row: context,question,answer")
        questions: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{path}: missing column(s) {missing}; the header must name {list(COLUMNS)}")
            for line_no, row in enumerate(reader, start=2):
                empty = [c for c in COLUMNS if not (row[c] or "").strip()]
                if empty:
                    raise DataError(f"{path}:{line_no}: empty {empty}; every row needs a context, a question and an answer")
                answers = tuple(a.strip() for a in row["answer"].split(self.answer_separator) if a.strip())
                questions.setdefault(row["context"].strip(), []).append((row["question"].strip(), answers))
        return [
            QAItem(Knowledge(id=f"csv{index}", context=context), tuple(asked))
            for index, (context, asked) in enumerate(questions.items())
        ]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"path": str(self.path)}
