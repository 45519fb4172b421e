"""The held-out edits RECIPE trains on, read from the editing contract (tasks/editing.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.types import KBenchError, Knowledge

EDIT_KEYS = ("prompt", "target", "rephrase_prompts", "locality_prompts", "locality_answers")


@dataclass(frozen=True)
class TrainingEdit:
    """One held-out edit in the form RECIPE trains on (rendered exactly as the task's probes ask)."""

    statement: str
    prompt: str
    target: str
    rephrases: tuple[str, ...]
    locality: tuple[tuple[str, str], ...]  # (prompt, continuation as scored)


def training_edits(knowledge: Sequence[Knowledge]) -> list[TrainingEdit]:
    """Edits from `Knowledge` following the editing contract (tasks/editing.py): `context` is the edit
    statement, `meta` holds `prompt`, `target`, `rephrase_prompts`, `locality_prompts`, `locality_answers`.
    A locality answer is scored after the same separator as the target (target = separator + target_new)."""
    edits = []
    for item in knowledge:
        missing = [key for key in EDIT_KEYS if key not in item.meta]
        if missing:
            raise KBenchError(
                f"method=recipe trains on edits, but training knowledge {item.id!r} has no {missing} in its meta; "
                "use a task whose training_knowledge() follows the editing contract (task=editing, task=synthetic)"
            )
        meta = item.meta
        separator = meta["target"][: len(meta["target"]) - len(meta.get("target_new") or meta["target"].lstrip())]
        edits.append(TrainingEdit(
            statement=item.context,
            prompt=meta["prompt"],
            target=meta["target"],
            rephrases=tuple(meta["rephrase_prompts"]),
            locality=tuple((p, separator + a) for p, a in zip(meta["locality_prompts"], meta["locality_answers"])),
        ))
    return edits
