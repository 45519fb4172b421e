"""Context QA: inject a context, then ask questions about it without showing it (PwC, synthetic).

`mode=single` is the paper's single injection (reset, inject one context, ask its questions; repeat).
`mode=batch` injects `batch_size` contexts at once (all of them by default), then asks every question
of the batch. Subclasses only load their data as `QAItem`s.
"""
from __future__ import annotations

from abc import abstractmethod
from typing import Any, Literal

from core.options import checked
from core.types import DataError, GenerationSpec, NonNegativeInt, PositiveInt, Probe, ProbeSet, Query, Step
from tasks.base import Task
from tasks.qa_item import QAItem  # re-exported: plugins import it from here (docs/adding_a_task.md)

__all__ = ["ContextQATask", "QAItem"]


class ContextQATask(Task):
    @checked("task")
    def __init__(
        self,
        mode: Literal["single", "batch"] = "single",
        batch_size: NonNegativeInt = 0,  # batch mode: contexts per injection, 0 = all
        limit: NonNegativeInt = 0,  # 0 = all; a negative limit used to mean "all" silently
        prompt_template: str = "Question: {question}\nAnswer:",
        max_new_tokens: PositiveInt = 24,
        stop: list[str] | None = None,
    ) -> None:
        if "{question}" not in prompt_template:
            raise ValueError(f"task.prompt_template must contain '{{question}}', got {prompt_template!r}")
        self.mode, self.batch_size, self.limit = mode, batch_size, limit
        self.prompt_template = prompt_template
        self.generation = GenerationSpec(max_new_tokens=max_new_tokens, stop=tuple(stop if stop is not None else ["\n"]))
        self._items: list[QAItem] | None = None

    @abstractmethod
    def load_items(self) -> list[QAItem]:
        """Every context with its questions, in a fixed order."""

    def dropped_summary(self) -> dict[str, int]:
        """Records dropped while loading, by reason (named when nothing is left, and in the record)."""
        return {}

    @property
    def items(self) -> list[QAItem]:
        if self._items is None:
            items = self.load_items()
            self._items = items[: self.limit] if self.limit > 0 else items
            if not self._items:
                dropped = {k: v for k, v in self.dropped_summary().items() if v}
                why = f"; dropped while loading: {dropped}" if dropped else ""
                raise DataError(f"task {self.name!r} has no contexts to inject (check its data and filters){why}")
        return self._items

    def probes_of(self, item: QAItem) -> list[Probe]:
        return [
            Probe(
                query=Query(
                    id=f"{item.knowledge.id}/q{index}",
                    prompt=self.prompt_template.format(question=question),
                    context=item.knowledge.context,
                ),
                answers=answers,
                knowledge_id=item.knowledge.id,
            )
            for index, (question, answers) in enumerate(item.questions)
        ]

    def probe_set(self, items: list[QAItem], name: str = "qa") -> ProbeSet:
        return ProbeSet(name=name, probes=[p for item in items for p in self.probes_of(item)], generation=self.generation)

    def steps(self) -> list[Step]:
        items = self.items
        size = 1 if self.mode == "single" else (self.batch_size or len(items))
        groups = [items[start : start + size] for start in range(0, len(items), size)]
        return [
            Step(
                index=index,
                knowledge=[item.knowledge for item in group],
                probe_sets=[self.probe_set(group)],
                reset_before=True,
                label=group[0].knowledge.id if size == 1 else f"batch{index}",
            )
            for index, group in enumerate(groups)
        ]

    def describe(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "n_contexts": len(self.items),
            "n_questions": sum(len(item.questions) for item in self.items),
        } | ({"dropped": self.dropped_summary()} if self.dropped_summary() else {})  # by reason, zeros included
