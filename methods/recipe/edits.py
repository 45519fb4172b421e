"""The held-out edits RECIPE trains on, read from the editing contract (tasks/editing.py)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from core.types import KBenchError, Knowledge

@dataclass(frozen=True)
class TrainingEdit:
    """One held-out edit in the form RECIPE trains on (rendered exactly as the task's probes ask)."""

    statement: str
    prompt: str
    target: str
    rephrases: tuple[str, ...]
    locality: tuple[tuple[str, str], ...]  # (prompt, continuation as scored)


def training_edits(knowledge: Sequence[Knowledge]) -> list[TrainingEdit]:
    """Edits from `Knowledge.edit` (`EditSpec`): `context` is the edit statement; the prompt, target,
    rephrases and locality prompts come from the spec. A locality answer is scored after the same separator
    as the target (target = separator + target_new). Raises KBenchError for knowledge without an edit."""
    edits = []
    for item in knowledge:
        edit = item.edit
        if edit is None:
            raise KBenchError(
                f"method=recipe trains on edits, but training knowledge {item.id!r} has no structured edit "
                "(Knowledge.edit); use a task whose training_knowledge() carries EditSpecs (task=editing, task=synthetic)"
            )
        edits.append(TrainingEdit(
            statement=item.context,
            prompt=edit.prompt,
            target=edit.target,
            rephrases=tuple(edit.rephrase_prompts),
            locality=tuple((p, edit.separator + a) for p, a in zip(edit.locality_prompts, edit.locality_answers)),
        ))
    return edits
