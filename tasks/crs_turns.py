"""A CRS test file in the He et al. CIKM'23 / CRSLab format, one line per recommender turn: the evaluated
turns (`load_crs_turns`), and the whole dialogues they come from (`dialogues_from_turns`), to inject."""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from core.io import FirstSeen, read_jsonl_numbered, text_field
from core.types import DataError
from tasks.crs_catalogue import Catalogue

CRS_FORMAT = (
    'JSON lines with "input" (the dialogue as System:/User: lines), "rec" (gold item ids), "prev_entity", '
    '"dialog_id", "turn_id" (the He et al. CIKM\'23 / CRSLab test format)'
)
_SPEAKER = re.compile(r"^(?:User|System):\s*")


@dataclass(frozen=True)
class CRSTurn:
    """One evaluated recommender turn: the dialogue so far, what the recommender then recommended,
    and the titles mentioned before it."""

    dialog_id: str
    turn_id: str
    dialogue: str
    response: str
    gold: tuple[str, ...]
    seen: tuple[str, ...]
    request: str  # the utterance the recommender answers (the last one before `response`)

    @property
    def id(self) -> str:
        return f"{self.dialog_id}/{self.turn_id}"


def _request(row: dict) -> str:
    """The utterance just before the recommender's turn: the last non-empty `context` entry (the
    rendered `input` labels speakers by position and is sometimes wrong), else the last line of `input`."""
    context = [str(u).strip() for u in row.get("context") or [] if str(u).strip()]
    if context:
        return context[-1]
    lines = [line for line in row["input"].strip().split("\n") if line.strip() and line.strip() != "System:"]
    return _SPEAKER.sub("", lines[-1]).strip() if lines else ""


def _ids(row: dict, key: str, where: str) -> list[int]:
    """A list of entity ids (numbers); anything else is refused naming file:line."""
    value = row[key]
    if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int | str) for i in value):
        raise DataError(f"{where}: field {key!r} must be a list of item ids, got {value!r}. Expected {CRS_FORMAT}.")
    return value


def load_crs_turns(path: str | Path, catalogue: Catalogue, dropped: dict[str, int] | None = None) -> list[CRSTurn]:
    """The recommender turns with a gold recommendation of a CRS test file, in file order.

    Fields must have their types (`input` a string, `rec` / `prev_entity` lists of ids, ids strings
    or numbers), refused naming file:line. A gold item whose title is empty once derived from its URI
    is dropped and counted in `dropped["empty_gold_title"]` (an empty gold would match an empty list
    item), and a turn left without gold in `dropped["no_gold_left"]`. The dialogue itself may be empty:
    the recommender may open a conversation. A (dialog_id, turn_id) seen twice is refused naming both
    file:lines (the two turns would share one probe id)."""
    turns, seen = [], FirstSeen("turn (dialog_id, turn_id)")
    dropped = dropped if dropped is not None else {}
    dropped.setdefault("empty_gold_title", 0)
    dropped.setdefault("no_gold_left", 0)
    required = ("input", "rec", "prev_entity", "dialog_id", "turn_id")
    for where, row in read_jsonl_numbered(path, required=required, expected_format=CRS_FORMAT):
        for key in ("dialog_id", "turn_id"):
            if isinstance(row[key], bool) or not isinstance(row[key], int | str) or not str(row[key]).strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string or number, got {row[key]!r}. "
                                f"Expected {CRS_FORMAT}.")
        seen.add(f"{row['dialog_id']}/{row['turn_id']}", where)
        rec = _ids(row, "rec", where)
        if not rec or row.get("is_user"):
            continue
        dialogue = text_field(row, "input", where, CRS_FORMAT)
        place = f"{where} (turn {row['dialog_id']}/{row['turn_id']})"
        gold = tuple(title for title in (catalogue.title(i, place) for i in rec) if title.strip())
        dropped["empty_gold_title"] += len(rec) - len(gold)
        if not gold:
            dropped["no_gold_left"] += 1
            continue
        turns.append(CRSTurn(
            dialog_id=str(row["dialog_id"]),
            turn_id=str(row["turn_id"]),
            dialogue=dialogue,
            response=text_field(row, "resp", where, CRS_FORMAT, optional=True) or "",
            gold=gold,
            seen=tuple(catalogue.title(i, place) for i in _ids(row, "prev_entity", where)),
            request=_request(row),
        ))
    if not turns:
        why = f" ({dropped['no_gold_left']} left without a gold title)" if dropped["no_gold_left"] else ""
        raise DataError(f"{path}: no recommender turn with a gold 'rec'{why}. Expected {CRS_FORMAT}.")
    return turns


@dataclass(frozen=True)
class Dialogue:
    """A whole dialogue to inject, and what was recommended in it: (user request, titles, response)."""

    id: str
    text: str
    recommendations: tuple[tuple[str, tuple[str, ...], str], ...]


def dialogues_from_turns(turns: Sequence[CRSTurn]) -> list[Dialogue]:
    """Group turns by dialogue. The text is the longest dialogue prefix plus the response that follows
    it (a test file holds a dialogue only up to its last recommendation)."""
    grouped: dict[str, list[CRSTurn]] = {}
    for turn in turns:
        grouped.setdefault(turn.dialog_id, []).append(turn)
    dialogues = []
    for dialog_id, members in grouped.items():
        last = max(members, key=lambda t: len(t.dialogue))
        text = (last.dialogue + last.response).strip("\n")
        recommendations = tuple((t.request, t.gold, t.response) for t in members)
        dialogues.append(Dialogue(dialog_id, text, recommendations))
    return dialogues
