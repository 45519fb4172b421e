"""What the experiment loop and the offline rescorer share: a run's identity, and turning outputs into
scored results. Kept free of model code (no torch / transformers import), so rescoring starts fast.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from core.io import stable_hash
from core.records import BOOKKEEPING_KEYS  # keys that do not change what a run computes
from core.types import Answer, ProbeSet, Step, TargetScore
from metrics.uncertainty import DEFAULT_RESAMPLES, bootstrap_mean
from tasks.base import ProbeResult, Task



def run_identity(cfg: DictConfig) -> str:
    config = OmegaConf.to_container(cfg, resolve=True)
    return stable_hash({k: v for k, v in config.items() if k not in BOOKKEEPING_KEYS})


def setting_identity(cfg: DictConfig) -> str:
    """`run_identity` with the run seed left out: runs that differ only in `seed` (and in what is
    interpolated from it, e.g. `method.seed: ${seed}`) share it; the report averages over them."""
    seedless = copy.deepcopy(cfg)
    with open_dict(seedless):
        seedless.seed = "<seed>"
    return run_identity(seedless)


def score_probe_set(
    task: Task, step_index: int, probe_set: ProbeSet, outputs: Sequence[Answer | TargetScore],
    earlier: Sequence[ProbeResult] = (),
) -> list[ProbeResult]:
    """The task's per-probe metrics for one probe set's outputs, as `ProbeResult`s; `earlier`: the results of
    the run's earlier steps (`Task.process_results`)."""
    if len(outputs) != len(probe_set.probes):
        raise ValueError(f"probe set {probe_set.name!r}: {len(outputs)} outputs for {len(probe_set.probes)} probes")
    scores = task.process_results(probe_set, outputs, earlier)
    return [ProbeResult(step_index, probe_set.name, p, out, s) for p, out, s in zip(probe_set.probes, outputs, scores)]


def score_in_run_order(
    task: Task, probe_outputs: Iterable[tuple[Step, ProbeSet, Sequence[Answer | TargetScore]]]
) -> Iterator[list[ProbeResult]]:
    """`score_probe_set` over stored outputs in the order the run asked them (steps in order), giving each
    probe set the results of the steps before its own, as the run did; yields each set's results. For
    the resumer and the rescorer, which score outputs read back from predictions.jsonl."""
    earlier: list[ProbeResult] = []
    current: list[ProbeResult] = []
    index: int | None = None
    for step, probe_set, outputs in probe_outputs:
        if step.index != index:
            earlier += current
            current, index = [], step.index
        scored = score_probe_set(task, step.index, probe_set, outputs, earlier)
        current += scored
        yield scored


def metric_uncertainty(task: Task, results: Sequence[ProbeResult], metrics: dict[str, float],
                       n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> dict[str, dict[str, Any]]:
    """`{metric: {"se", "ci95": [lo, hi], "n_units", "unit"}}`: the cluster-bootstrap standard error and 95 %
    percentile interval of each final metric that is a mean over the task's sample of it
    (`Task.metric_samples`: questions, edits, dialogues). A metric whose sample does not average to its
    value (a ratio, a retention AUC, a perplexity) or holds a non-finite value gets none. Deterministic:
    fixed `seed`."""
    out: dict[str, dict[str, Any]] = {}
    for name, sample in task.metric_samples(results).items():
        value = metrics.get(name)
        if not isinstance(value, (int, float)) or not sample.values or not all(map(math.isfinite, sample.values)):
            continue
        interval = bootstrap_mean(sample.values, sample.units, n_resamples=n_resamples, seed=seed)
        if not math.isclose(interval.mean, value, rel_tol=1e-9, abs_tol=1e-12):
            continue  # not the mean of this sample: no interval rather than a wrong one
        out[name] = {"se": interval.se, "ci95": [interval.low, interval.high], "n_units": interval.n_units,
                     "unit": sample.unit}
    return out


def final_results(task: Task, results: Sequence[ProbeResult], output_dir: Path,
                  method_deviations: dict[str, str] | None = None) -> dict[str, Any]:
    """The record's `metrics`, `metric_protocols`, `metric_uncertainty` and `task_report` from every probe
    result of a run. `method_deviations` (`Method.reference_deviations`) are appended to every metric's
    protocol: a method run with knobs off its reference is a different protocol."""
    metrics = task.summarize(results)
    protocols = task.metric_protocols(results)
    if method_deviations:
        tail = "; method deviates from its reference: " + ", ".join(f"{k}={v}" for k, v in sorted(method_deviations.items()))
        protocols = {name: protocol + tail for name, protocol in protocols.items()}
    return {
        "metrics": metrics,
        "metric_protocols": protocols,
        "metric_uncertainty": metric_uncertainty(task, results, metrics),
        "task_report": task.report(results, output_dir),
    }
