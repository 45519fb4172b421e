"""The numbers of a report row: mean, std and standard error over a setting's seeds (seeds combined with each
record's bootstrap SE, docs/records.md#uncertainty), and the paired-test marks against a baseline method."""
from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from core.types import KBenchError
from metrics.uncertainty import mean_se
from runners.report.runs import SETTING, metric_names


def combined_se(means: Sequence[float], within_se: Sequence[float]) -> float:
    """The standard error of the mean over seeds of runs that asked the same probes (docs/records.md,
    Uncertainty): sqrt(mean(se_i^2) + s_between^2 / n). The probe-sampling error is shared by every seed,
    so it does not shrink with n; the seeds' own spread does. NaN if any run has no SE."""
    means, within = [float(m) for m in means], [float(v) for v in within_se]
    n = len(means)
    if n == 0 or any(math.isnan(v) for v in within):
        return math.nan
    between = mean_se(means)["se"] or 0.0  # s_between / sqrt(n); none with one seed
    return math.sqrt(sum(v * v for v in within) / n + between ** 2)


def summarize(frame: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean and std over seeds of every metric, per setting, for finished runs only (numeric columns:
    `<metric>_mean`, `<metric>_std`, `<metric>_se`, `<metric>_lo`, `<metric>_hi`, `n`, `inject_s_mean`,
    `extra_storage_bytes_mean`)."""
    done = frame[frame["status"] == "done"] if len(frame) else frame
    metrics = list(metrics) if metrics else metric_names(done)
    missing = [m for m in metrics if f"metric/{m}" not in done.columns]
    if missing:
        raise ValueError(f"no finished run has metric(s) {missing}; available: {metric_names(done)}")
    if done.empty:  # every run failed (e.g. diverged): an empty table, and the failures listed below it
        return pd.DataFrame(columns=[*SETTING, "n", "inject_s_mean", "extra_storage_bytes_mean"])
    grouped = done.groupby(SETTING, sort=True, dropna=False)
    table = grouped.size().rename("n").to_frame()
    columns: dict[str, pd.Series] = {}  # joined at once: a column at a time fragments a wide frame
    for metric in metrics:
        columns[f"{metric}_mean"] = grouped[f"metric/{metric}"].mean()
        columns[f"{metric}_std"] = grouped[f"metric/{metric}"].std(ddof=1)
        columns |= _uncertainty(table.index, grouped, metric)
    columns["inject_s_mean"] = grouped["inject_s"].mean()
    columns["extra_storage_bytes_mean"] = grouped["extra_storage_bytes"].mean()
    return pd.concat([table, pd.DataFrame(columns, index=table.index)], axis=1).reset_index()


def _uncertainty(index: pd.Index, grouped: Any, metric: str) -> dict[str, pd.Series]:
    """`<metric>_se` (seeds combined, `combined_se`) and the 95 % interval `<metric>_lo` / `_hi`: one run's
    stored bootstrap interval, or mean ± 1.96 se over several seeds. NaN where a run has no SE."""
    se, low, high = {}, {}, {}
    for key, runs in grouped:
        values = runs[f"metric/{metric}"].astype(float).tolist()
        within = runs[f"se/{metric}"].astype(float).tolist() if f"se/{metric}" in runs else [math.nan] * len(values)
        se[key] = combined_se(values, within)
        if len(values) == 1:
            low[key] = float(runs[f"lo/{metric}"].iloc[0]) if f"lo/{metric}" in runs else math.nan
            high[key] = float(runs[f"hi/{metric}"].iloc[0]) if f"hi/{metric}" in runs else math.nan
        else:
            mean = sum(values) / len(values)
            low[key], high[key] = mean - 1.96 * se[key], mean + 1.96 * se[key]
    return {f"{metric}_{suffix}": pd.Series(column, dtype=float).reindex(index)
            for suffix, column in (("se", se), ("lo", low), ("hi", high))}


def baseline_marks(frame: pd.DataFrame, rows: pd.DataFrame, baseline: str, metrics: Sequence[str],
                   alpha: float = 0.05) -> dict[tuple[int, str], str]:
    """`{(row index, metric): "*"}` for the cells of `rows` (one task's summary) that differ from method
    `baseline` (same task and model) in a paired test on their shared probes (runners.compare): marked when
    every seed's test has p < alpha and the differences agree in sign. A run is paired with the baseline
    run of its seed, else the baseline's first run (a deterministic baseline has one). Metrics that are
    not per-probe (retention summaries, ratios) are never marked."""
    from runners.compare import compare_runs

    done = frame[frame["status"] == "done"]
    marks: dict[tuple[int, str], str] = {}
    for index, row in rows.iterrows():
        base = done[(done["task"] == row["task"]) & (done["model"] == row["model"]) & (done["method"] == baseline)]
        if row["method"] == baseline or base.empty:
            continue
        mine = done[(done[SETTING].astype(str) == row[SETTING].astype(str)).all(axis=1)]
        for metric in metrics:
            tests = []
            for run in mine.itertuples():
                same_seed = base[base["seed"] == run.seed]
                partner = (same_seed if len(same_seed) else base).iloc[0]
                try:
                    tests.append(compare_runs(Path(partner["path"]), Path(run.path), [metric]).iloc[0])
                except (KBenchError, OSError, ValueError):
                    tests = []  # no per-probe values of this metric to pair: no mark
                    break
            if tests and all(t.p_value < alpha for t in tests) and (
                    all(t.difference > 0 for t in tests) or all(t.difference < 0 for t in tests)):
                marks[(index, metric)] = "*"
    return marks
