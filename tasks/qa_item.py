"""`QAItem`: a context as knowledge plus its test questions, the unit context-QA data comes in.

Its own module so that the fictional-world generator (`tasks.world`) can build items without importing
a task; `tasks.context_qa` re-exports it for task plugins.
"""
from __future__ import annotations

from dataclasses import dataclass

from core.types import Knowledge


@dataclass(frozen=True)
class QAItem:
    """A context as knowledge plus its test questions (each with its gold answers)."""

    knowledge: Knowledge
    questions: tuple[tuple[str, tuple[str, ...]], ...]
