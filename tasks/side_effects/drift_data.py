"""The drift family's data: a generic text whose perplexity is compared before and after injection, and
unrelated general-knowledge questions whose answers are compared (docs/side_effects.md). Defaults are
the packaged `tasks/data/generic_text.txt` and `tasks/data/general_questions.tsv`; both are config
knobs (`task.drift_text`, `task.drift_questions`).
"""
from __future__ import annotations

import logging
from pathlib import Path

from core.io import FirstSeen, read_lines
from core.types import DataError

log = logging.getLogger(__name__)

DATA = Path(__file__).resolve().parent.parent / "data"
GENERIC_TEXT = DATA / "generic_text.txt"
GENERAL_QUESTIONS = DATA / "general_questions.tsv"
QUESTIONS_FORMAT = "one 'question<TAB>answer' pair per line ('#' lines and empty lines are ignored)"


def load_generic_text(path: str | Path | None = None) -> list[str]:
    """The drift sentences (default: the packaged `tasks/data/generic_text.txt`); a repeated sentence is
    kept once (it would weigh twice in the perplexity ratio), with a warning naming both lines."""
    path = Path(path) if path else GENERIC_TEXT
    fmt = "one sentence per line ('#' lines and empty lines are ignored)"
    first: dict[str, int] = {}
    for number, line in read_lines(path, fmt, comments=True):
        if line in first:
            log.warning("%s:%d: repeats the sentence of line %d; kept once", path, number, first[line])
            continue
        first[line] = number
    if not first:
        raise DataError(f"{path}: no sentences; expected {fmt}")
    return list(first)


def load_general_questions(path: str | Path | None = None) -> list[tuple[str, str]]:
    """The unrelated (question, answer) pairs (default: the packaged `tasks/data/general_questions.tsv`).
    A line without a question and a non-empty answer is refused naming file:line (an empty gold would
    always agree); a question asked twice is refused naming both lines (its reference would alias)."""
    path = Path(path) if path else GENERAL_QUESTIONS
    pairs, seen = [], FirstSeen("question")
    for number, line in read_lines(path, QUESTIONS_FORMAT, comments=True):
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) != 2 or not all(fields):
            raise DataError(f"{path}:{number}: {line!r} is not a question and a non-empty answer; expected {QUESTIONS_FORMAT}")
        seen.add(fields[0], f"{path}:{number}")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise DataError(f"{path}: no questions; expected {QUESTIONS_FORMAT}")
    return pairs
