"""A report's PNGs: retention curves of cumulative tasks, editing curves along the stream, and one panel per
metric (rates on a 0–1 axis, counts and ratios on their own); matplotlib is imported only here, when asked."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from runners.report.runs import group_columns, load_runs, metric_names, runs_frame, setting_id, variants
from runners.report.statistics import summarize

MAX_PLOT_INCHES = 15.0  # at PLOT_DPI: plots stay under 2000 px wide
PLOT_DPI = 120
PANELS_PER_ROW = 4


def plot(paths: Sequence[str | Path], out_dir: str | Path, curve_metric: str = "qa_f1",
         metrics: Sequence[str] | None = None, labels: Mapping[str, str] | None = None) -> list[Path]:
    """Write `retention_<task>.png` (tasks that inject cumulatively), `stream_<task>.png` (editing runs with
    `task.score_every`: reliability / generality / locality along the edit stream) and `metrics_<task>.png` (one small
    panel per metric, default every metric of the task) into `out_dir`; return the files written. `labels`
    {run folder: name}: as `load_runs`.

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

    runs = load_runs(paths, labels)
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
    labels = variants(records)
    rows = []
    for record in records:
        label = _label(record | {"variant": labels[setting_id(record)]})
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
    labels = variants(records)
    rows = []
    for record in records:
        stream = (record.get("task_report") or {}).get("stream") or {}
        label = _label(record | {"variant": labels[setting_id(record)]})
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
