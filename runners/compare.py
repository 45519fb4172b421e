"""Paired comparison of two runs on the probes they share.

    python -m runners.compare RUN_A RUN_B [--metrics qa_f1,exact_match] [--unit auto|probe|knowledge]
                              [--steps all|last] [--resamples 2000] [--seed 0]

RUN_A / RUN_B are run directories (with `record.json` and `predictions.jsonl`). Probes are matched by
(step, probe_set, probe_id) and must have asked the same prompt; for each metric both runs scored, it
prints mean A, mean B, the difference B − A with its 95 % paired cluster-bootstrap interval, and the
two-sided paired permutation p-value (metrics/uncertainty.py). The resampled unit is the independent
one: `knowledge` (an edit with all its probes; a dialogue) for editing and CRS tasks, `probe` (a
question) otherwise; `--unit` overrides it. `--steps last` keeps each probe's last evaluation only
(sequential tasks re-ask earlier probes after every step).
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from core.io import read_json, read_jsonl
from core.types import KBenchError
from metrics.uncertainty import DEFAULT_RESAMPLES, paired_difference

KNOWLEDGE_UNIT_TASKS = ("editing", "inspired", "redial")  # task names whose probes share their knowledge unit


def _load(run: Path) -> tuple[dict, dict[tuple, dict]]:
    record = read_json(run / "record.json", "a kbench run record (record.json)")
    rows: dict[tuple, dict] = {}
    for row in read_jsonl(run / "predictions.jsonl", ("step", "probe_set", "probe_id", "metrics"),
                          "kbench predictions (predictions.jsonl)"):
        key = (row["step"], row["probe_set"], row["probe_id"])
        if key in rows:
            raise KBenchError(f"{run}/predictions.jsonl: probe {key} appears twice")
        rows[key] = row
    return record, rows


def _last_only(rows: dict[tuple, dict]) -> dict[tuple, dict]:
    last: dict[tuple, tuple] = {}
    for step, probe_set, probe_id in sorted(rows):
        last[(probe_set, probe_id)] = (step, probe_set, probe_id)
    return {key: rows[key] for key in last.values()}


def compare_runs(
    run_a: Path,
    run_b: Path,
    metrics: Sequence[str] | None = None,
    unit: str = "auto",
    steps: str = "all",
    n_resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
) -> pd.DataFrame:
    """One row per metric: n_probes, n_units, mean_a, mean_b, difference, ci95_low, ci95_high, p_value.

    Raises KBenchError when the runs share no probe, a shared probe asked different prompts, or a
    requested metric is missing from a shared probe."""
    record_a, rows_a = _load(Path(run_a))
    record_b, rows_b = _load(Path(run_b))
    if steps == "last":
        rows_a, rows_b = _last_only(rows_a), _last_only(rows_b)
    shared = sorted(set(rows_a) & set(rows_b), key=str)
    if not shared:
        raise KBenchError(f"{run_a} and {run_b} share no probe (matched by step, probe_set, probe_id)")
    for key in shared:
        if rows_a[key].get("prompt") != rows_b[key].get("prompt"):
            raise KBenchError(f"probe {key} asked different prompts in the two runs: not a paired comparison")
    if unit == "auto":
        unit = "knowledge" if record_a.get("task") in KNOWLEDGE_UNIT_TASKS else "probe"
    if unit not in ("probe", "knowledge"):
        raise KBenchError(f"--unit must be auto, probe or knowledge, got {unit!r}")
    # default: every metric both runs scored on some shared probe (an editing run's probe sets score
    # different metrics, so the metrics common to *every* probe would be none)
    names = list(metrics) if metrics else sorted(set.union(*(set(rows_a[k]["metrics"]) & set(rows_b[k]["metrics"]) for k in shared)))
    table = []
    for name in names:
        keys = [k for k in shared if name in rows_a[k]["metrics"] and name in rows_b[k]["metrics"]]
        if not keys:
            raise KBenchError(f"metric {name!r} is in no probe both runs share")
        units = [k[2] if unit == "probe" else rows_a[k].get("knowledge_id") or k[2] for k in keys]
        a = [float(rows_a[k]["metrics"][name]) for k in keys]
        b = [float(rows_b[k]["metrics"][name]) for k in keys]
        result = paired_difference(a, b, units, n_resamples=n_resamples, seed=seed)
        table.append({
            "metric": name, "n_probes": result.n_probes, "n_units": result.n_units, "unit": unit,
            "mean_a": sum(a) / len(a), "mean_b": sum(b) / len(b), "difference": result.difference,
            "ci95_low": result.low, "ci95_high": result.high, "p_value": result.p_value,
        })
    return pd.DataFrame(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Paired comparison of two kbench runs on their shared probes.")
    parser.add_argument("run_a", type=Path, help="run directory A (the reference, e.g. base)")
    parser.add_argument("run_b", type=Path, help="run directory B; the difference is B − A")
    parser.add_argument("--metrics", default="", help="comma-separated; default: every metric both runs scored")
    parser.add_argument("--unit", default="auto", choices=("auto", "probe", "knowledge"),
                        help="the resampled unit; auto: an edit / dialogue for editing and CRS, else a question")
    parser.add_argument("--steps", default="all", choices=("all", "last"),
                        help="last: each probe's last evaluation only (sequential tasks re-ask earlier probes)")
    parser.add_argument("--resamples", type=int, default=DEFAULT_RESAMPLES, help="bootstrap and permutation resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    args = parser.parse_args(argv)
    try:
        table = compare_runs(args.run_a, args.run_b, [m for m in args.metrics.split(",") if m] or None,
                             args.unit, args.steps, args.resamples, args.seed)
    except KBenchError as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    print(f"A = {args.run_a}\nB = {args.run_b}\ndifference = B − A; 95 % paired cluster-bootstrap interval; "
          f"two-sided paired permutation p-value. Its floor: 2 / 2^n_units when 2^n_units <= {args.resamples} "
          f"(the test is then exact: 0.25 for 3 units, 0.0625 for 5), else {2 / (args.resamples + 1):.4f} "
          f"(read that value as p <= {2 / (args.resamples + 1):.4f}). With fewer than about 10 units the bootstrap "
          "interval is too narrow (it can exclude 0 while p is large): trust the p-value there")
    print(table.to_markdown(index=False, floatfmt=".4f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
