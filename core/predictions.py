"""A line of predictions.jsonl, both ways: written from one probe's method output after a step, and read
back into that output without the model (runners.rescore rescoring a run, runners.resume reusing the
steps an earlier attempt finished). Both directions live here so the two cannot drift apart."""
from __future__ import annotations

from typing import Any

from core.types import Answer, DataError, Probe, TargetScore


class PredictionError(DataError):
    """A predictions line the method output cannot be rebuilt from exactly (the message names file:line)."""


def prediction_row(step: int, probe_set: str, probe: Probe, output: Answer | TargetScore,
                   metrics: dict[str, float]) -> dict[str, Any]:
    """The predictions.jsonl line of one probe after one step (docs/records.md)."""
    row: dict[str, Any] = {
        "step": step,
        "probe_set": probe_set,
        "probe_id": probe.query.id,
        "knowledge_id": probe.knowledge_id,
        "prompt": probe.query.prompt,
        "gold": list(probe.answers),
        "metrics": metrics,
    }
    if isinstance(output, Answer):
        row["prediction"] = output.text
        if output.meta:
            row["method_meta"] = output.meta
    else:
        row["target_logprob"] = output.logprob
        row["target_tokens"] = output.n_tokens
        # every field of the TargetScore, so `output_of` rebuilds it without the model
        row["target_token_accuracy"] = output.token_accuracy
        row["target_predicted_ids"] = list(output.predicted_ids)
        if output.meta:
            row["method_meta"] = output.meta
    if probe.meta:
        row["probe_meta"] = probe.meta
    return row


def output_of(row: dict[str, Any], where: str) -> Answer | TargetScore:
    """The method output a predictions row was written from (`prediction_row`); `where` (file:line) names
    the row in the `PredictionError` raised for a row that cannot be rebuilt."""
    if "prediction" in row:
        return Answer(text=row["prediction"], meta=row.get("method_meta") or {})
    if "target_logprob" in row:
        if "target_token_accuracy" not in row:
            raise PredictionError(f"{where}: a log-likelihood prediction without target_token_accuracy (written by "
                                  "an older kbench); it cannot be rebuilt exactly")
        # float(): a non-finite value is written as "-Infinity" / "NaN" (strict JSON, docs/records.md)
        return TargetScore(logprob=float(row["target_logprob"]), n_tokens=row["target_tokens"],
                           token_accuracy=float(row["target_token_accuracy"]),
                           predicted_ids=tuple(row.get("target_predicted_ids") or ()))
    raise PredictionError(f"{where}: neither 'prediction' nor 'target_logprob': not a kbench predictions line")
