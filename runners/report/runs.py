"""The records a report reads: found on disk (one attempt per run), told apart by setting (a label naming the
knobs that differ), and laid out as one row per run with its metric, uncertainty and cost columns."""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.io import stable_hash
from core.records import BOOKKEEPING_KEYS, find_records

SETTING = ["task", "method", "model", "variant"]
# `--group` names that stand for several metric groups
GROUP_ALIASES = {"side_effects": ("near_miss", "conflict", "drift")}
# the record's `cost` keys the `--cost` table shows (docs/records.md)
COST_COLUMNS = ("inject_seconds_per_item", "answer_seconds_per_query", "peak_rss_bytes", "peak_gpu_bytes",
                "extra_storage_bytes", "parallel_jobs", "max_load_average", "cpu_count", "torch_threads",
                "shared_machine")


@dataclass
class Runs:
    """Every run found: the one attempt that counts per run_id, and what could not be read."""

    records: list[dict[str, Any]] = field(default_factory=list)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)
    superseded: int = 0  # earlier attempts of a run that has a newer or a finished record


def load_runs(paths: Iterable[str | Path], labels: Mapping[str | Path, str] | None = None) -> Runs:
    """Read every record under `paths` (`core.records.find_records`); keep one attempt per run_id (newest
    done, else newest). `labels` {folder: name}: the records under a folder show `name` as their variant
    (`--label DIR=name`) instead of the knobs that tell them apart.

    Raises ValueError when a labelled folder holds runs of more than one setting (their seeds would be
    averaged together under one name) or holds no record."""
    runs = Runs()
    by_id: dict[str, list[dict[str, Any]]] = {}
    for found in find_records(paths):
        record = found.record
        if record is None or "run_id" not in record:
            runs.unreadable.append((found.file, found.problem or "KeyError: 'run_id'"))
            continue
        record["_path"] = str(found.directory)
        by_id.setdefault(record["run_id"], []).append(record)
    for attempts in by_id.values():
        done = [r for r in attempts if r.get("status") == "done"]
        pool = done or attempts
        chosen = max(pool, key=lambda r: (r.get("finished_at") or "", r.get("started_at") or ""))
        runs.records.append(chosen)
        runs.superseded += len(attempts) - 1
    runs.records.sort(key=lambda r: (r.get("task", ""), r.get("method", ""), r.get("seed", 0), r["_path"]))
    for folder, name in (labels or {}).items():
        root = Path(folder).resolve()
        inside = [r for r in runs.records if root == Path(r["_path"]).resolve()
                  or root in Path(r["_path"]).resolve().parents]
        settings = {setting_id(r) for r in inside}
        if not inside:
            raise ValueError(f"--label {folder}={name}: no record under {folder}")
        if len(settings) > 1:
            raise ValueError(f"--label {folder}={name}: the folder holds {len(settings)} settings (runs that differ in "
                             f"more than the seed); label each run folder instead")
        for record in inside:
            record["_label"] = name
    return runs


# config keys that never distinguish two settings: bookkeeping (core.records.BOOKKEEPING_KEYS), and every
# `seed` leaf (the run seed and its interpolations such as `method.seed: ${seed}`; seeds are what a row averages over)
def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if (not prefix and key in BOOKKEEPING_KEYS) or key == "seed":
            continue
        if isinstance(value, dict):
            flat |= _flat(value, f"{name}.")
        else:
            flat[name] = value
    return flat


def setting_id(record: dict[str, Any]) -> str:
    """Runs that differ only in their seed share this id (`group_id`, or from the config for older records)."""
    return record.get("group_id") or stable_hash(_flat(record.get("config", {})))


def variants(records: Sequence[dict[str, Any]]) -> dict[str, str]:
    """A short label per setting id naming the knobs that tell settings of one (task, method, model) apart,
    and the non-method knobs (task data, size, protocol) that differ anywhere in the task's table. A name
    given with `--label` (`load_runs`) stands in for the method knobs."""
    labels: dict[str, str] = {}
    families: dict[tuple, dict[str, dict[str, Any]]] = {}
    names = {setting_id(r): r["_label"] for r in records if r.get("_label")}
    for record in records:
        key = (record.get("task"), record.get("method"), record.get("model"))
        families.setdefault(key, {})[setting_id(record)] = _flat(record.get("config", {}))
    for (task, _, _), settings in families.items():
        # knobs outside the method (task.n_edits, task.source, ...) that differ between any two rows of the
        # task's table are named in every row of it: methods scored on different data are not comparable
        tasks_settings = {sid: flat for (t, _, _), family in families.items() if t == task for sid, flat in family.items()}
        shared = [k for k in _differing(tasks_settings) if not k.startswith(("method.", "model."))]
        own = _differing(settings) if len(settings) > 1 else []
        for sid, flat in settings.items():
            keys = list(dict.fromkeys([*shared, *own]))
            knobs = [f"{k}={flat.get(k)}" for k in (shared if sid in names else keys)]
            labels[sid] = ", ".join([names[sid], *knobs] if sid in names else knobs) or (
                sid[:8] if len(settings) > 1 else "")
    return labels


def _differing(settings: dict[str, dict[str, Any]]) -> list[str]:
    """The flat config keys whose values are not the same in every one of `settings`."""
    keys = sorted({k for flat in settings.values() for k in flat})
    return [k for k in keys if len({json.dumps(flat.get(k), sort_keys=True) for flat in settings.values()}) > 1]


def runs_frame(records: Sequence[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: setting columns, seed, status, error, folder, `inject_s`, `extra_storage_bytes`,
    and one column per metric."""
    labels = variants(records)
    rows = []
    for record in records:
        rows.append({
            "task": record.get("task"), "method": record.get("method"), "model": record.get("model"),
            "variant": labels[setting_id(record)], "seed": record.get("seed"),
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
