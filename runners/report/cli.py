"""Results tables and plots from the records on disk: `python -m runners.report DIR [DIR ...]`.

Reads every `record.json` under the given folders (a run folder, a multirun folder, or all of
`outputs/`); never from memory or W&B. One row per setting = (task, method, model, any other knob
that differs): each metric as mean ± se over the seeds that finished (the records' bootstrap SE, seeds
combined: docs/records.md#uncertainty; ± std "sd" where no record holds one; `--ci`: [lo, hi]), `n` runs, inject time (seconds
for the whole run, mean over seeds) and the extra storage the method keeps beside the model.
One table per task, with only that task's metrics (a table wider than 200 characters is split by metric
group). Runs that failed or never finished are listed below the tables with the root cause of the failure.

Metrics named `<group>/<name>` form column groups: each group's columns sit side by side after the
ungrouped metrics, and `--group` shows only the named groups (`side_effects` = near_miss, conflict
and drift, the side-effect probes of docs/side_effects.md).

Several records with the same `run_id` (a run re-launched, skipped as done, or forced again) count
once: the newest `done` one, else the newest attempt. `--plot` writes PNGs (under 2000 px wide) next
to the output: `retention_<task>.png` (QA-F1 after each injection, one line per method; mean over
seeds, band = std) for tasks that inject cumulatively (sequential), and `metrics_<task>.png` (one
panel per metric, rates on a 0–1 axis, counts and ratios on their own; see `plot`).

    python -m runners.report outputs/multirun/2026-01-01_12-00-00
    python -m runners.report outputs --format latex --out table.tex
    python -m runners.report outputs --format csv --out results.csv --plot
    python -m runners.report outputs --group side_effects
    python -m runners.report outputs --baseline base          # * = differs from base, paired p < 0.05
    python -m runners.report outputs --compare base,selfparam  # paired test on the shared probes
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.io import stable_hash
from core.types import KBenchError
from core.records import RECORD_FILE

log = logging.getLogger(__name__)

SETTING = ["task", "method", "model", "variant"]
# config keys that never distinguish two settings: bookkeeping, and every `seed` leaf (the run seed and
# its interpolations such as `method.seed: ${seed}`; seeds are what a row averages over)
IGNORED_KEYS = ("logger", "output_dir", "force", "resume", "hydra")
# `--group` names that stand for several metric groups
GROUP_ALIASES = {"side_effects": ("near_miss", "conflict", "drift")}
# the record's `cost` keys the `--cost` table shows (docs/records.md)
COST_COLUMNS = ("inject_seconds_per_item", "answer_seconds_per_query", "peak_rss_bytes", "peak_gpu_bytes",
                "extra_storage_bytes", "parallel_jobs")


@dataclass
class Runs:
    """Every run found: the one attempt that counts per run_id, and what could not be read."""

    records: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    superseded: int = 0  # earlier attempts of a run that has a newer or a finished record


def find_record_files(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            # glob, not Path.rglob: rglob drops broken links, which must be reported
            files += sorted(Path(f) for f in glob.glob(str(path / "**" / RECORD_FILE), recursive=True))
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return files


def load_runs(paths: Iterable[str | Path]) -> Runs:
    """Read every record under `paths`; keep one attempt per run_id (newest done, else newest)."""
    runs = Runs()
    by_id: dict[str, list[dict[str, Any]]] = {}
    seen: set[Path] = set()
    for file in find_record_files(paths):
        target = file.resolve()
        if not target.is_file():
            runs.unreadable.append((file, "broken link: the record it points to was deleted"))
            continue
        if target in seen:  # a skipped job's record.json links to the done record
            continue
        seen.add(target)
        try:
            record = json.loads(target.read_text(encoding="utf-8"))
            run_id = record["run_id"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            runs.unreadable.append((file, f"{type(err).__name__}: {err}"))
            continue
        record["_path"] = str(target.parent)
        by_id.setdefault(run_id, []).append(record)
    for attempts in by_id.values():
        done = [r for r in attempts if r.get("status") == "done"]
        pool = done or attempts
        chosen = max(pool, key=lambda r: (r.get("finished_at") or "", r.get("started_at") or ""))
        runs.records.append(chosen)
        runs.superseded += len(attempts) - 1
    runs.records.sort(key=lambda r: (r.get("task", ""), r.get("method", ""), r.get("seed", 0), r["_path"]))
    return runs


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if (not prefix and key in IGNORED_KEYS) or key == "seed":
            continue
        if isinstance(value, dict):
            flat |= _flat(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def setting_id(record: dict[str, Any]) -> str:
    """Runs that differ only in their seed share this id (`group_id`, or from the config for older records)."""
    return record.get("group_id") or stable_hash(_flat(record.get("config", {})))


def _variants(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """A short label per setting id naming the knobs that tell settings of one (task, method, model) apart."""
    labels: dict[str, str] = {}
    families: dict[tuple, dict[str, dict[str, Any]]] = {}
    for record in records:
        key = (record.get("task"), record.get("method"), record.get("model"))
        families.setdefault(key, {})[setting_id(record)] = _flat(record.get("config", {}))
    for settings in families.values():
        if len(settings) == 1:
            labels |= {sid: "" for sid in settings}
            continue
        keys = sorted({k for flat in settings.values() for k in flat})
        differing = [k for k in keys if len({json.dumps(flat.get(k), sort_keys=True) for flat in settings.values()}) > 1]
        for sid, flat in settings.items():
            labels[sid] = ", ".join(f"{k}={flat.get(k)}" for k in differing) or sid[:8]
    return labels


def runs_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: setting columns, seed, status, error, folder, `inject_s`, `extra_storage_bytes`,
    and one column per metric."""
    variants = _variants(records)
    rows = []
    for record in records:
        rows.append({
            "task": record.get("task"), "method": record.get("method"), "model": record.get("model"),
            "variant": variants[setting_id(record)], "seed": record.get("seed"),
            "status": record.get("status"), "error": record.get("error"), "path": record["_path"],
            "traceback": (record.get("method_info") or {}).get("traceback"),
            "inject_s": (record.get("timings") or {}).get("inject"),
            "extra_storage_bytes": record.get("extra_storage_bytes"),
            "deviations": ", ".join(f"{k}={v}" for k, v in sorted((record.get("method_deviations") or {}).items())),
            **{f"metric/{k}": _number(v) for k, v in (record.get("metrics") or {}).items()},
            **_uncertainty_columns(record),
            **{f"cost/{k}": v for k, v in (record.get("cost") or {}).items() if k in COST_COLUMNS},
        })
    return pd.DataFrame(rows, columns=None if rows else [*SETTING, "seed", "status", "error", "path", "traceback"])


def _uncertainty_columns(record: dict[str, Any]) -> dict[str, float]:
    """`se/<metric>`, `lo/<metric>`, `hi/<metric>` from the record's `metric_uncertainty` (docs/records.md)."""
    columns: dict[str, float] = {}
    for name, entry in (record.get("metric_uncertainty") or {}).items():
        if isinstance(entry, dict) and "se" in entry:
            low, high = entry.get("ci95") or (math.nan, math.nan)
            columns |= {f"se/{name}": _number(entry["se"]), f"lo/{name}": _number(low), f"hi/{name}": _number(high)}
    return columns


def combined_se(means: Sequence[float], within_se: Sequence[float]) -> float:
    """The standard error of the mean over seeds of runs that asked the same probes (docs/records.md,
    Uncertainty): sqrt(mean(se_i^2) + s_between^2 / n). The probe-sampling error is shared by every seed,
    so it does not shrink with n; the seeds' own spread does. NaN if any run has no SE."""
    means, within = [float(m) for m in means], [float(v) for v in within_se]
    n = len(means)
    if n == 0 or any(math.isnan(v) for v in within):
        return math.nan
    between = sum((m - sum(means) / n) ** 2 for m in means) / (n - 1) if n > 1 else 0.0
    return math.sqrt(sum(v * v for v in within) / n + between / n)


def _number(value):
    """A metric as a float: records write non-finite numbers as "NaN" / "Infinity" / "-Infinity"
    (RFC 8259 JSON, docs/records.md), which float() reads back."""
    return float(value) if value in ("NaN", "Infinity", "-Infinity") else value


def metric_names(frame: pd.DataFrame) -> list[str]:
    return [c.removeprefix("metric/") for c in frame.columns if c.startswith("metric/")]


def metric_group(name: str) -> str:
    """The column group of a metric: the part before its first `/` (none for plain names)."""
    return name.split("/", 1)[0] if "/" in name else ""


def group_columns(names: Sequence[str], groups: Sequence[str] | None = None) -> list[str]:
    """`names` with each group's metrics side by side: ungrouped first, then the groups in first-seen
    order (order within a group kept). With `groups` (aliases such as `side_effects` expanded), only
    the metrics of those groups; a group that matches nothing is an error."""
    order = list(dict.fromkeys(metric_group(n) for n in names))
    ranked = sorted(names, key=lambda n: order.index(metric_group(n)) if metric_group(n) else -1)
    if not groups:
        return ranked
    wanted = [g for group in groups for g in GROUP_ALIASES.get(group, (group,))]
    chosen = [n for n in ranked if metric_group(n) in wanted]
    if not chosen:
        raise ValueError(f"no metric in group(s) {list(groups)}; groups found: {[g for g in order if g] or 'none'}")
    return chosen


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


def human_bytes(n: float) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _cell(row: pd.Series, metric: str, pm: str, interval: bool) -> str:
    """`mean ± se` (bootstrap SE, seeds combined), with `interval` `mean [lo, hi]`; where no record of the row
    holds an SE, `mean ± std sd` (spread over seeds) or the bare mean."""
    mean, se = row[f"{metric}_mean"], row.get(f"{metric}_se", math.nan)
    if mean is None or math.isnan(mean):
        return "–"
    if interval and not math.isnan(row.get(f"{metric}_lo", math.nan)):
        return f"{mean:.3f} [{row[f'{metric}_lo']:.3f}, {row[f'{metric}_hi']:.3f}]"
    if se is not None and not math.isnan(se):
        return f"{mean:.3f}{pm}{se:.3f}"
    std = row[f"{metric}_std"]
    return f"{mean:.3f}" if std is None or math.isnan(std) else f"{mean:.3f}{pm}{std:.3f} sd"


def display_table(table: pd.DataFrame, metrics: Sequence[str], pm: str = " ± ", storage: bool = True,
                  interval: bool = False, marks: dict[tuple[int, str], str] | None = None) -> pd.DataFrame:
    """The summary as text cells: `mean ± se` per metric (`_cell`), a mark from `marks` ({(row index,
    metric): "*"}) appended, then (with `storage`) inject seconds and human-readable extra storage."""
    columns = [c for c in SETTING if c != "variant" or table["variant"].astype(bool).any()]
    shown = table[columns + ["n"]].copy()
    marks = marks or {}
    for metric in metrics:
        shown[metric] = [_cell(row, metric, pm, interval) + marks.get((index, metric), "")
                         for index, row in table.iterrows()]
    if storage:
        shown["inject s"] = [f"{s:.1f}" if pd.notna(s) else "–" for s in table["inject_s_mean"]]
        shown["extra storage"] = [human_bytes(b) for b in table["extra_storage_bytes_mean"]]
    return shown


_CHAIN = ("The above exception was the direct cause of the following exception:",
          "During handling of the above exception, another exception occurred:")
_REPR = re.compile(r"^([A-Za-z_][\w.]*)\((['\"])(.*)\2,?\)$")


def root_cause(error: str | None, trace: str | None = None) -> str:
    """The innermost exception of a failure as one line `Type: message`.

    A wrapper's message (Hydra's `InstantiationException: Error in call to target ...` with the reason on a
    later line) is not the reason: the first exception of a chained traceback is (Python prints the
    innermost first); without a traceback, the `Type('message')` line Hydra puts inside its message."""
    if not error:
        return "no error recorded"
    if trace and any(marker in trace for marker in _CHAIN):
        first = re.split("|".join(map(re.escape, _CHAIN)), trace)[0].strip().splitlines()
        started = False
        for line in first:
            if started and line and not line[0].isspace() and not line.startswith(("^", "~")):
                return line.strip()
            started = started or line.startswith("Traceback")
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    for line in lines[1:]:
        match = _REPR.match(line)
        if match:
            return f"{match.group(1)}: {match.group(3)}"
    return lines[0]


def problems_text(frame: pd.DataFrame, runs: Runs, style: str) -> list[str]:
    """Lines listing failed / unfinished runs with their reasons, and unreadable records."""
    bad = frame[frame["status"] != "done"] if len(frame) else frame
    lines: list[str] = []
    if len(bad):
        lines.append(f"Failed or unfinished runs ({len(bad)}):")
        for row in bad.itertuples():
            if row.status == "running":
                reason = "unfinished: the record still says `running` (the run was killed, or is still running)"
            else:
                reason = root_cause(row.error, row.traceback)
            lines.append(f"- {row.method} / {row.task} / {row.model} / seed {row.seed}: {row.status}: {reason} ({row.path})")
    for path, reason in runs.unreadable:
        lines.append(f"- unreadable record {path}: {reason}")
    if runs.superseded:
        lines.append(f"({runs.superseded} earlier attempt(s) of the same runs were superseded and not counted)")
    if style == "latex":
        lines = [f"% {line}" for line in lines]
    return lines


def to_markdown(shown: pd.DataFrame) -> str:
    return shown.to_markdown(index=False, disable_numparse=True)


def to_latex(shown: pd.DataFrame) -> str:
    """A plain `tabular` (no booktabs): \\hline rules, every text cell escaped for LaTeX."""
    styler = shown.style.hide(axis="index").format(escape="latex")
    styler = styler.format_index(escape="latex", axis=1)
    styler.set_table_styles([{"selector": name, "props": ":hline;"} for name in ("toprule", "midrule", "bottomrule")])
    latex = styler.to_latex(column_format="l" * len(shown.columns))
    return latex.replace(" ± ", r" $\pm$ ")


MAX_ROW_CHARS = 199  # a markdown row longer than this is split into several tables (same rows, other columns)


def cost_table(frame: pd.DataFrame, task: str, reference: str = "base") -> pd.DataFrame:
    """One task's `--cost` table: per setting, means over its finished runs of the record's `cost`: inject
    seconds per injected item (context or edit), answering ms per query and its overhead over `reference`
    (same task and model; shown only when both ran under the same machine sharing), peak RSS, peak GPU
    memory (CUDA runs), extra storage, and whether the runs shared the machine (joblib n_jobs > 1)."""
    done = frame[(frame["status"] == "done") & (frame["task"] == task)]
    columns = [c for c in SETTING if c != "variant" or done["variant"].astype(bool).any()]
    grouped = done.groupby(SETTING, sort=True, dropna=False)

    def mean(runs: pd.DataFrame, key: str) -> float:
        column = f"cost/{key}"
        return float(pd.to_numeric(runs[column], errors="coerce").mean()) if column in runs else math.nan

    def jobs(runs: pd.DataFrame) -> str:
        values = sorted({int(v) for v in runs.get("cost/parallel_jobs", pd.Series(dtype=float)).dropna()})
        if not values:
            return "–"
        return "alone" if values == [1] else ("shared (n_jobs " + ",".join(map(str, values)) + ")")

    rows = []
    for key, runs in grouped:
        rows.append(dict(zip(SETTING, key)) | {"n": len(runs), "_answer": mean(runs, "answer_seconds_per_query"),
                                               "_jobs": jobs(runs), "runs": runs})
    out = []
    for row in rows:
        runs = row["runs"]
        ref = next((r for r in rows if r["method"] == reference and r["model"] == row["model"]), None)
        if ref is None or math.isnan(row["_answer"]) or math.isnan(ref["_answer"]):
            overhead = "–"
        elif ref["_jobs"] != row["_jobs"]:
            overhead = "– (machine differs)"
        else:
            overhead = f"{1000 * (row['_answer'] - ref['_answer']):+.1f}"
        inject, gpu = mean(runs, "inject_seconds_per_item"), mean(runs, "peak_gpu_bytes")
        out.append({c: row[c] for c in columns} | {
            "n": row["n"],
            "inject s/item": "–" if math.isnan(inject) else f"{inject:.2f}",
            "answer ms/query": "–" if math.isnan(row["_answer"]) else f"{1000 * row['_answer']:.1f}",
            f"vs {reference} ms/query": overhead,
            "peak RSS": human_bytes(mean(runs, "peak_rss_bytes")),
            **({"peak GPU": human_bytes(gpu)} if not math.isnan(gpu) else {}),
            "extra storage": human_bytes(mean(runs, "extra_storage_bytes")),
            "machine": row["_jobs"],
        })
    return pd.DataFrame(out)


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


def compare_text(paths: Sequence[str | Path], spec: str, metrics: Sequence[str] | None = None) -> str:
    """`--compare A,B`: runners.compare on run folders A and B, or on every (task, model, seed) that methods
    A and B both ran among the records under `paths`, one table per pair."""
    from runners.compare import compare_runs

    names = [part.strip() for part in spec.split(",")]
    if len(names) != 2 or not all(names):
        raise ValueError(f"--compare takes two method names or run folders, A,B; got {spec!r}")
    if all(Path(name).is_dir() for name in names):
        pairs = [(Path(names[0]), Path(names[1]), "")]
    else:
        frame = runs_frame(load_runs(paths).records)
        done = frame[frame["status"] == "done"]

        def runs_of(name: str) -> dict[tuple, str]:
            if Path(name).is_dir():
                record = json.loads((Path(name) / RECORD_FILE).read_text(encoding="utf-8"))
                return {(record.get("task"), record.get("model"), record.get("seed")): str(name)}
            chosen = done[done["method"] == name]
            if chosen.empty:
                raise ValueError(f"--compare: no finished run of method {name!r} (methods: {sorted(set(done['method']))})")
            runs: dict[tuple, str] = {}
            for r in chosen.itertuples():
                key = (r.task, r.model, r.seed)
                if key in runs:  # two settings of the method (a knob differs): which one is meant is not known
                    raise ValueError(f"--compare: method {name!r} has several runs for task {r.task}, model {r.model}, "
                                     f"seed {r.seed} ({runs[key]}, {r.path}): name run folders instead")
                runs[key] = r.path
            return runs

        runs_a, runs_b = runs_of(names[0]), runs_of(names[1])
        shared = sorted(set(runs_a) & set(runs_b), key=str)
        if not shared:
            raise ValueError(f"--compare: {names[0]} and {names[1]} share no (task, model, seed)")
        pairs = [(Path(runs_a[k]), Path(runs_b[k]), f"{k[0]} / {k[1]} / seed {k[2]}: ") for k in shared]
    blocks = []
    for a, b, label in pairs:
        table = compare_runs(a, b, metrics)
        blocks.append(f"### {label}{names[1]} − {names[0]}\n\nA = {a}\nB = {b}\n\n"
                      + table.to_markdown(index=False, floatfmt=".4f"))
    legend = ("difference = B − A on the probes both runs answered; 95 % paired cluster-bootstrap interval; "
              "two-sided paired permutation p-value (runners.compare)")
    return "\n\n".join(blocks) + "\n\n" + legend + "\n"


def render(paths: Sequence[str | Path], fmt: str = "md", metrics: Sequence[str] | None = None,
           groups: Sequence[str] | None = None, interval: bool = False, baseline: str | None = None,
           cost: bool = False) -> str:
    """The report text for the records under `paths` in format md, latex or csv: every metric, or the
    `metrics` named followed by the columns of the metric `groups` (`group_columns`).

    md and latex: one table per task, with only the metrics that task's runs have; a table whose rows
    would be wider than `MAX_ROW_CHARS` is split by metric group into several (each repeats the setting
    columns). csv: one machine-readable table of every task. Failed and unfinished runs are listed last,
    each with the root cause of its failure."""
    runs = load_runs(paths)
    frame = runs_frame(runs.records)
    if not runs.records:
        raise FileNotFoundError(f"no {RECORD_FILE} found under {', '.join(map(str, paths))}")
    done = frame[frame["status"] == "done"]
    if groups:  # the named metrics first, then the groups' columns
        found = group_columns(metric_names(done.dropna(axis=1, how="all")), groups)
        metrics = list(dict.fromkeys([*(metrics or []), *found]))
    table = summarize(frame, metrics)
    if fmt == "csv":
        return table.to_csv(index=False)
    blocks = []
    for task in sorted(done["task"].dropna().unique()):
        own = metric_names(done[done["task"] == task].dropna(axis=1, how="all"))
        names = [m for m in metrics if m in own] if metrics else group_columns(own)
        if not names:
            continue
        rows = table[table["task"] == task].reset_index(drop=True)
        chunks = _width_chunks(rows, names)
        marks = baseline_marks(frame, rows, baseline, names) if baseline else {}
        for index, chunk in enumerate(chunks):
            shown = display_table(rows, chunk, storage=index == 0, interval=interval, marks=marks)
            groups_shown = ", ".join(dict.fromkeys(metric_group(n) or "metrics" for n in chunk))
            title = task + (f" (continued {index + 1}/{len(chunks)}: {groups_shown})" if index else "")
            body = to_latex(shown) if fmt == "latex" else to_markdown(shown)
            blocks.append((f"% {title}\n" if fmt == "latex" else f"### {title}\n\n") + body.rstrip("\n"))
        if cost:
            shown = cost_table(frame, task)
            body = to_latex(shown) if fmt == "latex" else to_markdown(shown)
            blocks.append((f"% {task}: cost\n" if fmt == "latex" else f"### {task}: cost\n\n") + body.rstrip("\n"))
    if not blocks:
        blocks.append("% no finished run" if fmt == "latex" else "(no finished run)")
    legend = ("± = bootstrap standard error over the metric's units, seeds combined; [lo, hi] = 95 % interval "
              "(docs/records.md#uncertainty); `sd` = std over seeds where no record holds an SE")
    if baseline:
        legend += f"; * = differs from {baseline} in a paired test on shared probes, p < 0.05 in every seed"
    deviating = done[done["deviations"].astype(bool)] if "deviations" in done else done.iloc[:0]
    for (method, variant), runs_of in deviating.groupby(["method", "variant"], sort=True):
        label = " ".join(filter(None, [method, variant]))
        legend += f"\n\n{label}: deviates from its reference: " + " | ".join(sorted(set(runs_of["deviations"])))
    problems = problems_text(frame, runs, fmt)
    if fmt == "latex":  # comment lines under the tables, with the failures
        problems.insert(0, "\n".join(f"% {line}" for line in legend.splitlines() if line))
    else:
        blocks.append(legend)
    return "\n\n".join(blocks) + "\n" + ("\n" + "\n".join(problems) + "\n" if problems else "")


def _width_chunks(rows: pd.DataFrame, names: Sequence[str]) -> list[list[str]]:
    """`names` cut into consecutive pieces whose markdown rows stay within `MAX_ROW_CHARS` (a piece
    preferably ends where a metric group ends; a single metric too wide for it is a piece of its own)."""
    def width(chunk: list[str], first: bool) -> int:
        return max(map(len, to_markdown(display_table(rows, chunk, storage=first)).splitlines()))

    chunks: list[list[str]] = []
    current: list[str] = []
    for name in names:
        if current and width(current + [name], not chunks) > MAX_ROW_CHARS:
            # cut at the last group boundary inside the piece when there is one, else here
            cut = max((i for i in range(1, len(current)) if metric_group(current[i]) != metric_group(current[i - 1])),
                      default=len(current))
            chunks.append(current[:cut])
            current = current[cut:]
            while current and width(current + [name], False) > MAX_ROW_CHARS:
                chunks.append(current)
                current = []
        current.append(name)
    return chunks + [current] if current else chunks


# ---------------------------------------------------------------------------------------------- plots
MAX_PLOT_INCHES = 15.0  # at PLOT_DPI: plots stay under 2000 px wide
PLOT_DPI = 120
PANELS_PER_ROW = 4


def plot(paths: Sequence[str | Path], out_dir: str | Path, curve_metric: str = "qa_f1",
         metrics: Sequence[str] | None = None) -> list[Path]:
    """Write `retention_<task>.png` (tasks that inject cumulatively), `stream_<task>.png` (editing runs with
    `task.score_every`: reliability / generality / locality along the edit stream) and `metrics_<task>.png` (one small
    panel per metric, default every metric of the task) into `out_dir`; return the files written.

    Every panel has its own y axis: rates (every value in [0, 1]) are drawn on a fixed 0–1 axis, counts and
    ratios on their own scale, so the two never share an axis. Panels wrap `PANELS_PER_ROW` to a row and the
    figure stays under 2000 px wide.

    A curve point is one step of `steps[*].metrics` of a task whose steps log `injections` (sequential
    tasks: contexts injected so far, without a reset in between); y is `<curve_metric>_injected` when
    logged (mean over the contexts injected so far), else `<curve_metric>`. Single- and batch-injection
    tasks reset before every step, so a line across their steps would mean nothing: no retention plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = load_runs(paths)
    frame = runs_frame(runs.records)
    done = [r for r in runs.records if r.get("status") == "done"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for task in sorted({r["task"] for r in done}):
        task_frame = frame[(frame["task"] == task) & (frame["status"] == "done")].dropna(axis=1, how="all")
        curves = _step_curves([r for r in done if r["task"] == task], curve_metric)
        curves = curves[curves["x_name"] == "contexts injected"]
        if curves["x"].nunique() > 1:
            fig, ax = plt.subplots(figsize=(7, 4.5))
            for label, curve in curves.groupby("label", sort=True):
                stats = curve.groupby("x")["value"].agg(["mean", "std"]).fillna(0.0)
                ax.plot(stats.index, stats["mean"], marker="o", label=label)
                ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.15)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(xlabel="contexts injected", ylabel=curve_metric, title=f"{task}: {curve_metric} after each injection")
            ax.legend(fontsize="small")
            written.append(_save(fig, out_dir / f"retention_{task}.png"))
        stream = _stream_curves([r for r in done if r["task"] == task])
        if not stream.empty:
            families = sorted(stream["family"].unique())
            fig, axes = plt.subplots(1, len(families), figsize=(4.2 * len(families), 3.8), squeeze=False)
            for ax, family in zip(axes[0], families):
                for label, curve in stream[stream["family"] == family].groupby("label", sort=True):
                    stats = curve.groupby("x")["value"].agg(["mean", "std"]).fillna(0.0)
                    ax.plot(stats.index, stats["mean"], marker="o", label=label)
                    ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.15)
                ax.set(xlabel="edits injected", ylabel=family, ylim=(-0.02, 1.02), title=f"{family} along the stream")
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
                ax.grid(alpha=0.3)
            axes[0][0].legend(fontsize="small")
            written.append(_save(fig, out_dir / f"stream_{task}.png"))
        names = [m for m in (metrics or group_columns(metric_names(task_frame))) if f"metric/{m}" in task_frame.columns]
        if not names:
            continue
        rows = summarize(task_frame, names).to_dict("records")
        rates = [n for n in names if task_frame[f"metric/{n}"].dropna().between(0.0, 1.0).all()]
        names = rates + [n for n in names if n not in rates]  # rates first, then counts and ratios
        columns = min(PANELS_PER_ROW, len(names))
        lines = -(-len(names) // columns)
        panel_width = min(3.6, MAX_PLOT_INCHES / columns)
        fig, axes = plt.subplots(lines, columns, figsize=(panel_width * columns, 3.2 * lines + 0.6), squeeze=False)
        labels = [_label(row) for row in rows]
        colors = [f"C{i % 10}" for i in range(len(rows))]
        for ax, name in zip(axes.flat, names):
            means = [row[f"{name}_mean"] for row in rows]
            stds = [0.0 if pd.isna(row[f"{name}_std"]) else row[f"{name}_std"] for row in rows]
            ax.bar(range(len(rows)), means, yerr=stds, color=colors, capsize=2)
            ax.set_title(name if name in rates else f"{name} (count / ratio)", fontsize=9)
            ax.set_xticks(range(len(rows)), [row["method"] for row in rows], rotation=45, ha="right", fontsize=7)
            if name in rates:
                ax.set_ylim(0.0, 1.0)
            ax.tick_params(axis="y", labelsize=7)
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors]
        fig.legend(handles, labels, loc="lower center", ncol=min(4, len(labels)), fontsize="small", frameon=False)
        fig.suptitle(f"{task}: mean over seeds (error bar = std)")
        fig.tight_layout(rect=(0, 0.04 + 0.025 * (-(-len(labels) // 4)), 1, 1))
        written.append(_save(fig, out_dir / f"metrics_{task}.png", tight=False))
    plt.close("all")
    return written


def _label(row: dict[str, Any]) -> str:
    return " ".join(filter(None, [row["method"], row.get("variant")])) + f" ({row['model']})"


def _step_curves(records: Sequence[dict[str, Any]], metric: str) -> pd.DataFrame:
    variants = _variants(records)
    rows = []
    for record in records:
        label = _label(record | {"variant": variants[setting_id(record)]})
        for position, step in enumerate(record.get("steps") or []):
            values = step.get("metrics") or {}
            value = values.get(f"{metric}_injected", values.get(metric))
            if value is not None:
                x_name = "contexts injected" if "injections" in values else "step"
                rows.append({"label": label, "x": values.get("injections", position + 1), "x_name": x_name, "value": value})
    return pd.DataFrame(rows, columns=["label", "x", "x_name", "value"])


def _stream_curves(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """Editing runs scored along the stream (`task.score_every`): per setting and teacher-forced metric, the
    macro-average over the edits injected so far at each scoring (`task_report.stream.curves`)."""
    variants = _variants(records)
    rows = []
    for record in records:
        stream = (record.get("task_report") or {}).get("stream") or {}
        label = _label(record | {"variant": variants[setting_id(record)]})
        for family, curve in (stream.get("curves") or {}).items():
            if family in ("reliability_tf", "generality_tf", "locality"):
                rows += [{"label": label, "family": family, "x": x, "value": v}
                         for x, v in zip(stream.get("edits_injected", []), curve) if v is not None]
    return pd.DataFrame(rows, columns=["label", "family", "x", "value"])


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=PLOT_DPI)
    return path


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m runners.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders, multirun folders or `outputs` (searched recursively)")
    parser.add_argument("--format", choices=["md", "latex", "csv"], default="md")
    parser.add_argument("--out", help="write the table to this file instead of stdout")
    parser.add_argument("--metrics", help="comma-separated metrics to show (default: every metric found)")
    parser.add_argument("--group", help="comma-separated metric groups to show (after any --metrics), e.g. "
                                        "side_effects (= near_miss, conflict, drift) or drift")
    parser.add_argument("--ci", action="store_true", help="show the 95 %% interval [lo, hi] instead of ± se")
    parser.add_argument("--baseline", help="method name: mark (*) cells that differ from it in a paired test, p < 0.05")
    parser.add_argument("--cost", action="store_true", help="also a cost table per task (the records' `cost`: "
                                                           "seconds per item and per query, peak memory, storage)")
    parser.add_argument("--compare", metavar="A,B", help="paired comparison of two methods (or run folders) on "
                                                         "their shared probes, instead of the tables")
    parser.add_argument("--plot", action="store_true", help="also write PNG plots")
    parser.add_argument("--plot-dir", help="folder for the plots (default: beside --out, else the first path)")
    parser.add_argument("--plot-metric", default="qa_f1", help="metric of the retention curves (default: qa_f1)")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    groups = [g.strip() for g in args.group.split(",")] if args.group else None
    try:
        if args.compare:
            text = compare_text(args.paths, args.compare, metrics)
        else:
            text = render(args.paths, args.format, metrics, groups, args.ci, args.baseline, args.cost)
    except (FileNotFoundError, ValueError, KBenchError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text, encoding="utf-8")
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    if args.plot:
        first = Path(args.paths[0])
        default_dir = Path(args.out).parent if args.out else (first if first.is_dir() else first.parent)
        for path in plot(args.paths, Path(args.plot_dir) if args.plot_dir else default_dir, args.plot_metric, metrics):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
