"""`method=recent_context`: answer with the most recently injected context(s) in the prompt.

A complete kbench method plugin in one file, kept outside kbench's own packages (docs/adding_a_method.md).
It stores the text of the last `window` injected contexts and renders them before every question,
exactly like the `context` upper bound does with the gold context; `reset` forgets them.
- In single-injection tasks (reset before every context) it matches `method=context`.
- In sequential tasks (no reset) it shows what a bounded prompt memory keeps: contexts older than the
  window fall back to the no-knowledge floor.
Extra storage: the stored text, in UTF-8 bytes. Resumable: its state is the list of texts (JSON).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.lm import LM
from core.options import checked
from core.types import Knowledge, PositiveInt, Query
from methods.base import Method


class RecentContextMethod(Method):
    name = "recent_context"

    @checked("method")  # a direct call checks the bounds below as the config does
    def __init__(self, lm: LM, window: PositiveInt = 1, separator: str = "\n\n") -> None:
        super().__init__(lm)
        self.window, self.separator = window, separator
        self.contexts: list[str] = []

    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        self.contexts = (self.contexts + [k.context for k in knowledge])[-self.window :]

    def prompt_ids(self, query: Query) -> list[int]:
        if not self.contexts:
            return self.lm.prompt_ids(query.prompt)
        return self.lm.prompt_ids(query.prompt, context=self.separator.join(self.contexts))

    def reset(self) -> None:
        self.contexts = []

    def extra_storage_bytes(self) -> int:
        return sum(len(text.encode("utf-8")) for text in self.contexts)

    def info(self) -> dict[str, Any]:
        return {"window": self.window, "contexts_held": len(self.contexts)}

    # resumable runs: the state is plain text, so JSON
    def save_state(self, directory: Path) -> bool:
        (directory / "contexts.json").write_text(json.dumps(self.contexts, ensure_ascii=False))
        return True

    def load_state(self, directory: Path) -> None:
        self.contexts = json.loads((directory / "contexts.json").read_text())
