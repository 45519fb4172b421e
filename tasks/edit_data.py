"""Where task=editing's edits come from: the `Edit` record, the two file formats and their loaders, and
the synthetic generator.

- `synthetic` (default): facts about generated fictional entities (`tasks.world`), asked as
  "Question: ...\\nAnswer:"; rephrases are the other phrasings of the same question; each edit has two
  locality prompts: the same question about another, never-edited entity (`same_relation`, the hard,
  CounterFact-neighbourhood kind) and a general-knowledge question (`general`).
- `zsre`: EasyEdit/MEND ZsRE JSON (`src`, `alt`, `rephrase`, `loc`, `loc_ans`; optional `subject`,
  `answers`). Locality kind `nq` (ZsRE's locality prompts are Natural Questions).
- `counterfact`: the flat CounterFact JSON used by EasyEdit and RECIPE (`prompt`, `target_new`,
  `rephrase_prompt`, `locality_prompt`, `locality_ground_truth`; optional `subject`, `ground_truth`,
  `case_id`). Locality kind `same_relation`.
Files may be a JSON list or JSON lines (`core.io.read_records` tells them apart and names file:line in
every error). A record with an empty prompt or target, or an empty locality pair or rephrase, is
dropped and counted by reason, never scored.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.io import FirstSeen, read_records, text_field
from core.types import DataError
from tasks.world.generate import generate_items
from core.world.relations import KINDS, relations_of

ZSRE_FORMAT = (
    "ZsRE / EasyEdit JSON: a list (or JSON lines) of objects with `src` (prompt), `alt` (new target), "
    "`rephrase`, `loc`, `loc_ans`; optional `subject`, `answers`"
)
COUNTERFACT_FORMAT = (
    "CounterFact JSON (EasyEdit / RECIPE flat format): a list (or JSON lines) of objects with `prompt`, "
    "`target_new`, `rephrase_prompt`, `locality_prompt`, `locality_ground_truth`; optional `subject`, "
    "`ground_truth`, `case_id`"
)


@dataclass(frozen=True)
class Edit:
    """One edit as the data gives it (prompts not yet rendered with the task's template)."""

    id: str
    prompt: str
    target_new: str
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    locality_kinds: tuple[str, ...] = ()
    subject: str | None = None
    ground_truth: str | None = None

    def __post_init__(self) -> None:
        if not self.prompt.strip() or not self.target_new.strip():
            raise DataError(f"edit {self.id!r} needs a non-empty prompt and target_new")
        if not len(self.locality_prompts) == len(self.locality_answers) == len(self.locality_kinds):
            raise DataError(f"edit {self.id!r}: every locality prompt needs one answer and one kind")


# ---------------------------------------------------------------------- files
def _strings(value: Any, field: str, where: str, fmt: str) -> tuple[str, ...]:
    """A field that may hold one string or a list of strings, as a tuple (empty strings kept: the
    caller pairs prompts with answers before dropping empty pairs, so pairs never shift)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise DataError(f"{where}: field {field!r} must be a string or a list of strings, got {type(value).__name__}. "
                    f"Expected {fmt}.")


def _locality(prompts: tuple[str, ...], answers: tuple[str, ...], kind: str, where: str,
              dropped: dict[str, int]) -> dict[str, tuple[str, ...]]:
    if len(prompts) != len(answers):
        raise DataError(f"{where}: {len(prompts)} locality prompt(s) but {len(answers)} answer(s)")
    pairs = [(p, a) for p, a in zip(prompts, answers) if p.strip() and a.strip()]
    dropped["empty_locality_pair"] += len(prompts) - len(pairs)  # an empty answer would score as agreement
    return {"locality_prompts": tuple(p for p, _ in pairs), "locality_answers": tuple(a for _, a in pairs),
            "locality_kinds": (kind,) * len(pairs)}


def _nonempty(texts: tuple[str, ...], dropped: dict[str, int], reason: str) -> tuple[str, ...]:
    kept = tuple(t for t in texts if t.strip())
    dropped[reason] = dropped.get(reason, 0) + len(texts) - len(kept)
    return kept


def _required_text(row: dict, key: str, where: str, fmt: str, dropped: dict[str, int]) -> str | None:
    """A required string field; None, counted as an empty prompt or target, when it is empty after stripping."""
    text = text_field(row, key, where, fmt)
    if not text.strip():
        reason = "empty_prompt" if key in ("src", "prompt") else "empty_target"
        dropped[reason] += 1
        return None
    return text


def empty_drops() -> dict[str, int]:
    """The drop counters every loader reports, at zero (a record lists each reason, zeros included)."""
    return {"empty_prompt": 0, "empty_target": 0, "empty_locality_pair": 0, "empty_rephrase": 0}


def load_zsre(path: str | Path) -> tuple[list[Edit], dict[str, int]]:
    """ZsRE edits from an EasyEdit/MEND JSON file, and the records (or prompts) dropped, by reason.
    Fields must have their types (null is refused naming file:line); a record whose `src` or `alt` is
    empty is dropped and counted, never scored."""
    edits, dropped = [], empty_drops()
    for index, (where, row) in enumerate(read_records(path, ("src", "alt", "rephrase", "loc", "loc_ans"), ZSRE_FORMAT)):
        prompt, target = (_required_text(row, k, where, ZSRE_FORMAT, dropped) for k in ("src", "alt"))
        if prompt is None or target is None:
            continue
        answers = _nonempty(_strings(row.get("answers"), "answers", where, ZSRE_FORMAT), dropped, "empty_answers")
        edits.append(Edit(
            id=f"zsre-{index}",
            prompt=prompt,
            target_new=target,
            rephrase_prompts=_nonempty(_strings(row["rephrase"], "rephrase", where, ZSRE_FORMAT), dropped, "empty_rephrase"),
            **_locality(_strings(row["loc"], "loc", where, ZSRE_FORMAT), _strings(row["loc_ans"], "loc_ans", where, ZSRE_FORMAT),
                        "nq", where, dropped),
            subject=text_field(row, "subject", where, ZSRE_FORMAT, optional=True),
            ground_truth=answers[0] if answers else None,
        ))
    return edits, dropped


def load_counterfact(path: str | Path) -> tuple[list[Edit], dict[str, int]]:
    """CounterFact edits from the flat JSON format, and the records (or prompts) dropped, by reason.
    A `case_id` seen twice is refused naming both file:lines: the two edits would share one id, so the
    second overwrote the first's pre-edit locality reference and edits.csv merged their rows."""
    required = ("prompt", "target_new", "rephrase_prompt", "locality_prompt", "locality_ground_truth")
    edits, dropped, ids = [], empty_drops(), FirstSeen("case_id")
    for index, (where, row) in enumerate(read_records(path, required, COUNTERFACT_FORMAT)):
        case_id = row.get("case_id", index)
        if isinstance(case_id, bool) or not isinstance(case_id, int | str) or not str(case_id).strip():
            raise DataError(f"{where}: field 'case_id' must be a number or a non-empty string, got {case_id!r}. "
                            f"Expected {COUNTERFACT_FORMAT}.")
        ids.add(str(case_id), where)  # before dropping: a duplicate is a data error even if one is empty
        prompt, target = (_required_text(row, k, where, COUNTERFACT_FORMAT, dropped) for k in ("prompt", "target_new"))
        if prompt is None or target is None:
            continue
        loc_prompts = _strings(row["locality_prompt"], "locality_prompt", where, COUNTERFACT_FORMAT)
        loc_answers = _strings(row["locality_ground_truth"], "locality_ground_truth", where, COUNTERFACT_FORMAT)
        edits.append(Edit(
            id=f"cf-{case_id}",
            prompt=prompt,
            target_new=target,
            rephrase_prompts=_nonempty(_strings(row["rephrase_prompt"], "rephrase_prompt", where, COUNTERFACT_FORMAT),
                                       dropped, "empty_rephrase"),
            **_locality(loc_prompts, loc_answers, "same_relation", where, dropped),
            subject=text_field(row, "subject", where, COUNTERFACT_FORMAT, optional=True),
            ground_truth=text_field(row, "ground_truth", where, COUNTERFACT_FORMAT, optional=True),
        ))
    return edits, dropped


# ---------------------------------------------------------------------- generated
def generate_synthetic_edits(
    n_edits: int,
    seed: int,
    question_template: str,
    general_questions: Sequence[Sequence[str]],
    id_prefix: str = "syn-edit",
) -> list[Edit]:
    """Deterministic in `seed`. Edit i sets one fact of fictional entity i; its locality prompts are the
    same question about a never-edited entity of the same kind, and general question i (cycled)."""
    kinds = len(KINDS)
    stride = -(-n_edits // kinds) * kinds  # a multiple of the kind cycle: entity stride + i has i's kind
    items = generate_items(2 * stride, max(len(r) for _, r in KINDS.values()), 0, seed, "")
    relations = {kind: relations_of(kind) for kind in KINDS}
    edits = []
    for i in range(n_edits):
        meta, neighbour = items[i].knowledge.meta, items[stride + i].knowledge.meta
        fact = meta["facts"][0]
        relation = relations[meta["kind"]][fact["relation"]]
        other = next(f for f in neighbour["facts"] if f["relation"] == fact["relation"])
        ask = lambda question, subject: question_template.format(question=question.format(s=subject))  # noqa: E731
        rephrasings = relation.test_questions + relation.train_questions[1:]
        loc_prompts, loc_answers, loc_kinds = [ask(relation.train_questions[0], other["subject"])], [other["value"]], ["same_relation"]
        if general_questions:
            question, answer = general_questions[i % len(general_questions)]
            loc_prompts.append(question_template.format(question=question))
            loc_answers.append(answer)
            loc_kinds.append("general")
        edits.append(Edit(
            id=f"{id_prefix}{seed}-{i}",
            prompt=ask(relation.train_questions[0], fact["subject"]),
            target_new=fact["value"],
            rephrase_prompts=tuple(ask(q, fact["subject"]) for q in rephrasings),
            locality_prompts=tuple(loc_prompts),
            locality_answers=tuple(loc_answers),
            locality_kinds=tuple(loc_kinds),
            subject=fact["subject"],
        ))
    return edits
