"""Results tables and plots from the records on disk: `python -m runners.report DIR [DIR ...]`.

Reads every `record.json` under the given folders (a run folder, a multirun folder, or all of
`outputs/`); never from memory or W&B. One row per setting = (task, method, model, any other knob
that differs): each metric as mean ± std over the seeds that finished, `n` runs, inject time (seconds
for the whole run, mean over seeds) and the extra storage the method keeps beside the model.
Runs that failed or never finished are listed below the table with their reasons.

Metrics named `<group>/<name>` form column groups: each group's columns sit side by side after the
ungrouped metrics, and `--group` shows only the named groups (`side_effects` = near_miss, conflict
and drift, the side-effect probes of docs/side_effects.md).

Several records with the same `run_id` (a run re-launched, skipped as done, or forced again) count
once: the newest `done` one, else the newest attempt. `--plot` writes PNGs next to the output:
`retention_<task>.png` (QA-F1 after each step, one line per method; mean over seeds, band = std)
for tasks with more than one step, and `metrics_<task>.png` (method x metric bars; see `plot`).

    python -m runners.report outputs/multirun/2026-01-01_12-00-00
    python -m runners.report outputs --format latex --out table.tex
    python -m runners.report outputs --format csv --out results.csv --plot
    python -m runners.report outputs --group side_effects
"""
from __future__ import annotations

import argparse
import glob
import json
import logging
import math
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.io import stable_hash
from core.records import RECORD_FILE

log = logging.getLogger(__name__)

SETTING = ["task", "method", "model", "variant"]
# config keys that never distinguish two settings: bookkeeping, and every `seed` leaf (the run seed and
# its interpolations such as `method.seed: ${seed}`; seeds are what a row averages over)
IGNORED_KEYS = ("logger", "output_dir", "force", "resume", "hydra")
# `--group` names that stand for several metric groups
GROUP_ALIASES = {"side_effects": ("near_miss", "conflict", "drift")}


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
            "inject_s": (record.get("timings") or {}).get("inject"),
            "extra_storage_bytes": record.get("extra_storage_bytes"),
            **{f"metric/{k}": v for k, v in (record.get("metrics") or {}).items()},
        })
    return pd.DataFrame(rows, columns=None if rows else [*SETTING, "seed", "status", "error", "path"])


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
    `<metric>_mean`, `<metric>_std`, `n`, `inject_s_mean`, `extra_storage_bytes_mean`)."""
    done = frame[frame["status"] == "done"] if len(frame) else frame
    metrics = list(metrics) if metrics else metric_names(done)
    missing = [m for m in metrics if f"metric/{m}" not in done.columns]
    if missing:
        raise ValueError(f"no finished run has metric(s) {missing}; available: {metric_names(done)}")
    if done.empty:
        return pd.DataFrame(columns=[*SETTING, "n"])
    grouped = done.groupby(SETTING, sort=True, dropna=False)
    table = grouped.size().rename("n").to_frame()
    for metric in metrics:
        table[f"{metric}_mean"] = grouped[f"metric/{metric}"].mean()
        table[f"{metric}_std"] = grouped[f"metric/{metric}"].std(ddof=1)
    table["inject_s_mean"] = grouped["inject_s"].mean()
    table["extra_storage_bytes_mean"] = grouped["extra_storage_bytes"].mean()
    return table.reset_index()


def human_bytes(n: float) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return "–"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def _mean_std(mean: float, std: float, pm: str) -> str:
    if mean is None or math.isnan(mean):
        return "–"
    return f"{mean:.3f}" if std is None or math.isnan(std) else f"{mean:.3f}{pm}{std:.3f}"


def display_table(table: pd.DataFrame, metrics: Sequence[str], pm: str = " ± ") -> pd.DataFrame:
    """The summary as text cells: `mean ± std` per metric, seconds, human-readable storage."""
    columns = [c for c in SETTING if c != "variant" or table["variant"].astype(bool).any()]
    shown = table[columns + ["n"]].copy()
    for metric in metrics:
        shown[metric] = [_mean_std(m, s, pm) for m, s in zip(table[f"{metric}_mean"], table[f"{metric}_std"])]
    shown["inject s"] = [f"{s:.1f}" if pd.notna(s) else "–" for s in table["inject_s_mean"]]
    shown["extra storage"] = [human_bytes(b) for b in table["extra_storage_bytes_mean"]]
    return shown


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
                reason = (row.error or "no error recorded").strip().splitlines()[0]
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


def render(paths: Sequence[str | Path], fmt: str = "md", metrics: Sequence[str] | None = None,
           groups: Sequence[str] | None = None) -> str:
    """The report text for the records under `paths` in format md, latex or csv: every metric, or the
    `metrics` named followed by the columns of the metric `groups` (`group_columns`)."""
    runs = load_runs(paths)
    frame = runs_frame(runs.records)
    if not runs.records:
        raise FileNotFoundError(f"no {RECORD_FILE} found under {', '.join(map(str, paths))}")
    if groups:  # the named metrics first, then the groups' columns
        found = group_columns(metric_names(frame[frame["status"] == "done"].dropna(axis=1, how="all")), groups)
        metrics = list(dict.fromkeys([*(metrics or []), *found]))
    table = summarize(frame, metrics)
    metrics = list(metrics) if metrics else group_columns(
        [c.removesuffix("_mean") for c in table.columns
         if c.endswith("_mean") and c not in ("inject_s_mean", "extra_storage_bytes_mean")])
    if fmt == "csv":
        return table.to_csv(index=False)
    shown = display_table(table, metrics)
    body = to_latex(shown) if fmt == "latex" else to_markdown(shown)
    problems = problems_text(frame, runs, fmt)
    return body.rstrip("\n") + "\n" + ("\n" + "\n".join(problems) + "\n" if problems else "")


# ---------------------------------------------------------------------------------------------- plots
def plot(paths: Sequence[str | Path], out_dir: str | Path, curve_metric: str = "qa_f1",
         metrics: Sequence[str] | None = None) -> list[Path]:
    """Write `retention_<task>.png` (tasks whose records have several steps) and `metrics_<task>.png`
    (bars of `metrics`, default every metric of the task) into `out_dir`; return the files written.

    A curve point is one step of `steps[*].metrics`: x is the step's `injections` value when the task
    logs one (sequential tasks: contexts injected so far), else the step number; y is
    `<curve_metric>_injected` when logged (mean over the contexts injected so far), else `<curve_metric>`.
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
        if curves["x"].nunique() > 1:
            fig, ax = plt.subplots(figsize=(6, 4))
            for label, curve in curves.groupby("label", sort=True):
                stats = curve.groupby("x")["value"].agg(["mean", "std"]).fillna(0.0)
                ax.plot(stats.index, stats["mean"], marker="o", label=label)
                ax.fill_between(stats.index, stats["mean"] - stats["std"], stats["mean"] + stats["std"], alpha=0.15)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(xlabel=curves["x_name"].iloc[0], ylabel=curve_metric, title=f"{task}: {curve_metric} after each step")
            ax.legend(fontsize="small")
            written.append(_save(fig, out_dir / f"retention_{task}.png"))
        names = [m for m in (metrics or metric_names(task_frame)) if f"metric/{m}" in task_frame.columns]
        if not names:
            continue
        rows = summarize(task_frame, names).to_dict("records")
        fig, ax = plt.subplots(figsize=(max(6.0, 0.5 * len(names) * len(rows)), 4))
        width = 0.8 / len(rows)
        for i, row in enumerate(rows):
            means = [row[f"{n}_mean"] for n in names]
            stds = [0.0 if pd.isna(row[f"{n}_std"]) else row[f"{n}_std"] for n in names]
            ax.bar([j + i * width for j in range(len(names))], means, width, yerr=stds, label=_label(row), capsize=2)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, rotation=30, ha="right")
        ax.set(title=f"{task}: mean over seeds (error bar = std)")
        ax.legend(fontsize="small")
        written.append(_save(fig, out_dir / f"metrics_{task}.png"))
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


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
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
    parser.add_argument("--plot", action="store_true", help="also write PNG plots")
    parser.add_argument("--plot-dir", help="folder for the plots (default: beside --out, else the first path)")
    parser.add_argument("--plot-metric", default="qa_f1", help="metric of the retention curves (default: qa_f1)")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    groups = [g.strip() for g in args.group.split(",")] if args.group else None
    try:
        text = render(args.paths, args.format, metrics, groups)
    except (FileNotFoundError, ValueError) as err:
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
