"""A report's text: `mean ± se` cells, markdown and LaTeX tables (split by width), the cost table, and the
list of failed runs with the root cause of each failure."""
from __future__ import annotations

import math
import re
from collections.abc import Sequence

import pandas as pd

from runners.report.runs import SETTING, Runs, metric_group


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
    memory (CUDA runs), extra storage, and whether the runs shared the machine (joblib n_jobs > 1, load)
    and ran on fewer torch threads than cores."""
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
        loads = pd.to_numeric(runs.get("cost/max_load_average", pd.Series(dtype=float)), errors="coerce").dropna()
        shared = runs.get("cost/shared_machine", pd.Series(dtype=object)).dropna().astype(bool)
        why = [f"n_jobs {','.join(map(str, values))}"] if values != [1] else []
        if shared.any() and len(loads):
            why.append(f"load ≤ {loads.max():.1f}")
        # fewer torch threads than cores (OMP_NUM_THREADS) change CPU timings as much as sharing does
        threads = pd.to_numeric(runs.get("cost/torch_threads", pd.Series(dtype=float)), errors="coerce").dropna()
        cpus = pd.to_numeric(runs.get("cost/cpu_count", pd.Series(dtype=float)), errors="coerce").dropna()
        few = sorted({int(t) for t in threads} - {int(c) for c in cpus})
        suffix = f", {','.join(map(str, few))} of {int(cpus.max())} torch threads" if few and len(cpus) else ""
        if why:
            return f"shared ({'; '.join(why)}){suffix}"
        # a record without a load sample (older records; an OS with no load average) cannot show it ran alone
        return ("alone" if len(loads) == len(runs) else "unknown (no load sampled)") + suffix

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


def width_chunks(rows: pd.DataFrame, names: Sequence[str]) -> list[list[str]]:
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
