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
    python -m runners.report outputs/a outputs/b --label outputs/b="reference preset"  # a name, not knobs
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.records import RECORD_FILE
from core.types import KBenchError
from runners.report.plots import plot
from runners.report.runs import group_columns, load_runs, metric_group, metric_names, runs_frame
from runners.report.statistics import baseline_marks, summarize
from runners.report.tables import cost_table, display_table, problems_text, to_latex, to_markdown, width_chunks


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
           cost: bool = False, labels: Mapping[str, str] | None = None) -> str:
    """The report text for the records under `paths` in format md, latex or csv: every metric, or the
    `metrics` named followed by the columns of the metric `groups` (`group_columns`).

    md and latex: one table per task, with only the metrics that task's runs have; a table whose rows
    would be wider than `MAX_ROW_CHARS` is split by metric group into several (each repeats the setting
    columns). csv: one machine-readable table of every task. Failed and unfinished runs are listed last,
    each with the root cause of its failure. `labels` {run folder: name} names those runs' variant."""
    runs = load_runs(paths, labels)
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
        chunks = width_chunks(rows, names)
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


def _label_arg(spec: str) -> tuple[str, str]:
    """`DIR=NAME` of --label; raises ValueError naming the malformed argument."""
    folder, sep, name = spec.partition("=")
    if not sep or not folder or not name.strip():
        raise ValueError(f"--label takes DIR=NAME, got {spec!r}")
    return folder, name.strip()


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
    parser.add_argument("--label", action="append", default=[], metavar="DIR=NAME",
                        help="show NAME as the variant of the runs under DIR (one setting) instead of the knobs "
                             "that differ; repeatable")
    parser.add_argument("--plot", action="store_true", help="also write PNG plots")
    parser.add_argument("--plot-dir", help="folder for the plots (default: beside --out, else the first path)")
    parser.add_argument("--plot-metric", default="qa_f1", help="metric of the retention curves (default: qa_f1)")
    args = parser.parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",")] if args.metrics else None
    groups = [g.strip() for g in args.group.split(",")] if args.group else None
    try:
        labels = dict(_label_arg(spec) for spec in args.label)
        if args.compare:
            text = compare_text(args.paths, args.compare, metrics)
        else:
            text = render(args.paths, args.format, metrics, groups, args.ci, args.baseline, args.cost, labels)
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
        for path in plot(args.paths, Path(args.plot_dir) if args.plot_dir else default_dir, args.plot_metric, metrics,
                         labels):
            print(f"wrote {path}")
    return 0
