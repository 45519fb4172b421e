"""Knowledge-editing metrics: reliability, generality and locality, teacher-forced and generated.

- Teacher-forced token accuracy (EasyEdit's `rewrite_acc` / `rephrase_acc`): the prompt followed by
  the target tokens is fed to the model; the score is the fraction of target positions whose argmax
  prediction equals the target token, acc = (1/n) Σ_t [argmax p(· | prompt, y_<t) = y_t].
  It is `core.types.TargetScore.token_accuracy`.
- Locality (EasyEdit's `locality` on `loc` + `loc_ans`): the locality prompt followed by its answer is
  fed to the model before and after editing; the score is the fraction of answer positions where the
  post-edit argmax token equals the pre-edit argmax token (not the gold answer: an edit should leave
  the model's behaviour unchanged, right or wrong), loc = (1/n) Σ_t [argmax_post_t = argmax_pre_t].
- Generated exact match / token F1: the greedy generation (cut at the first newline) against the
  target, SQuAD-normalised (`metrics.qa`).
- Each edit counts once: per-edit means over its probes, then the mean over edits (macro average).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from core.types import Answer, KBenchError, TargetScore
from metrics import qa


def argmax_ids(output: Answer | TargetScore, probe_id: str) -> tuple[int, ...]:
    """The teacher-forced argmax tokens of one probe's output, which locality (and drift's agreement)
    compares before and after injection. Raises KBenchError, naming `probe_id`, for a generated answer
    or a `TargetScore` without `predicted_ids` (a method that builds its own logits must keep them)."""
    if not isinstance(output, TargetScore):
        raise KBenchError(f"probe {probe_id!r}: agreement with the reference needs a teacher-forced score, got a "
                          "generated answer")
    if not output.predicted_ids:
        raise KBenchError(f"probe {probe_id!r}: the method's score() returned no predicted_ids (the argmax tokens "
                          "agreement compares); build TargetScores with core.lm.target_scores so they are kept")
    return tuple(output.predicted_ids)


def locality_agreement(pre_edit_ids: Sequence[int], post_edit_ids: Sequence[int]) -> float:
    """Fraction of target positions where the post-edit argmax token equals the pre-edit one."""
    if not pre_edit_ids or not post_edit_ids:
        raise ValueError(
            "locality needs the argmax tokens before and after editing (TargetScore.predicted_ids); "
            f"got {len(pre_edit_ids)} pre-edit and {len(post_edit_ids)} post-edit tokens"
        )
    if len(pre_edit_ids) != len(post_edit_ids):
        raise ValueError(
            f"pre-edit and post-edit predictions cover different target lengths ({len(pre_edit_ids)} vs "
            f"{len(post_edit_ids)}): the locality prompt was not scored on the same tokens"
        )
    return sum(a == b for a, b in zip(pre_edit_ids, post_edit_ids)) / len(pre_edit_ids)


def generated_scores(prediction: str, target: str) -> dict[str, float]:
    """Exact match and token F1 of a generated answer against the edit target (SQuAD-normalised)."""
    return {"em": qa.exact_match(prediction, target), "f1": qa.token_f1(prediction, target)}


def macro_average(values_by_edit: dict[str, list[float]]) -> float:
    """Mean over edits of each edit's mean value: every edit weighs the same, whatever its probe count."""
    means = [sum(values) / len(values) for values in values_by_edit.values() if values]
    if not means:
        raise ValueError("no values to average")
    return sum(means) / len(means)


def group_by_edit(pairs: Iterable[tuple[str, float]]) -> dict[str, list[float]]:
    """(edit id, value) pairs grouped into lists per edit id, in first-seen order."""
    grouped: dict[str, list[float]] = {}
    for edit_id, value in pairs:
        grouped.setdefault(edit_id, []).append(value)
    return grouped
