"""Recompute a finished run's metrics from its stored predictions, without the model.

    python -m runners.rescore RUN_DIR_OR_PREDICTIONS_FILE [task.KEY=VALUE ...] [--out DIR]

The task is rebuilt from the record's resolved config with the overrides applied (Hydra override
syntax, `task.*` keys only: predictions fix everything a model or method did). Its steps and probes
are regenerated (they depend only on the config) and every probe is matched to its prediction by
(step, probe_set, probe_id); a missing, duplicate or unmatched prediction, or one made for another
prompt, is an error, so an override that changes *what was asked* (not how it is scored) is refused.
Each prediction becomes an `Answer` (text and method meta) or a `TargetScore` again, and the task's
own `process_results`, `step_metrics`, `summarize`, `metric_protocols` and `report` produce the new numbers, as
in the run itself (`runners.results`).

Output: a new directory `rescored-<hash of the overrides>/` beside the original record (or `--out`),
holding `record.json` (the original record with the new config, run_id, metrics, per-step metrics and
task report, plus a `rescore` block naming the source record, the overrides, the original metrics
and the rescoring code's commit), `predictions.jsonl` with the new per-probe metrics, and any file
the task's report writes (e.g. `retention.png`). The original files are never touched.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, InstantiationException
from omegaconf import DictConfig, OmegaConf

from core.io import atomic_write_json, read_json, read_jsonl_numbered, stable_hash, write_jsonl
from core.predictions import output_of
from core.records import PREDICTIONS_FILE, RECORD_FILE, SCHEMA_VERSION, git_commit, utc_now
from core.types import KBenchError
from runners.build import build
from runners.results import final_results, run_identity, score_in_run_order
from tasks.base import ProbeResult, Task

Key = tuple[int, str, str]
_ABSENT = object()


class RescoreError(KBenchError):
    """The predictions cannot be rescored as asked (the message says why and what to do)."""


# ------------------------------------------------------------------ inputs
def locate(path: str | Path) -> tuple[Path, Path]:
    """(record.json, predictions.jsonl) of a run directory, or of a predictions file and its directory."""
    path = Path(path).expanduser()
    predictions = path / PREDICTIONS_FILE if path.is_dir() else path
    record = predictions.parent / RECORD_FILE
    for needed in (predictions, record):
        if not needed.is_file():
            raise RescoreError(f"{needed} not found: give a run directory holding {RECORD_FILE} and "
                               f"{PREDICTIONS_FILE}, or the predictions file inside one")
    return record, predictions


def apply_overrides(config: dict[str, Any], overrides: Sequence[str]) -> DictConfig:
    """The record's config with `task.KEY=VALUE` overrides applied; unknown keys and any other kind of
    override (groups, +add, ~delete, sweeps, other top-level keys) are refused."""
    cfg = OmegaConf.create(config)
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException as err:
        raise RescoreError(f"cannot parse the overrides: {err}") from None
    for override in parsed:
        key = override.key_or_group
        if override.is_sweep_override() or override.is_add() or override.is_delete() or override.package:
            raise RescoreError(f"{override.input_line!r}: only plain task.KEY=VALUE overrides can be rescored")
        if not key.startswith("task."):
            raise RescoreError(f"{override.input_line!r}: only task.* keys change scoring; the predictions fix "
                               "the model, the method and everything else")
        if OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            parent = key.rsplit(".", 1)[0]
            known = OmegaConf.select(cfg, parent, default=None)
            options = sorted(known) if isinstance(known, DictConfig) else []
            raise RescoreError(f"{key}: not in the run's config; known keys under {parent}: {options}")
        OmegaConf.update(cfg, key, override.value(), merge=False)
    return cfg


def index_predictions(path: Path) -> dict[Key, tuple[dict[str, Any], str]]:
    """Rows keyed by (step, probe_set, probe_id), each with its file:line for error messages."""
    rows: dict[Key, tuple[dict[str, Any], str]] = {}
    fields = ("step", "probe_set", "probe_id", "prompt")
    for where, row in read_jsonl_numbered(path, required=fields, expected_format="kbench predictions.jsonl"):
        key = (int(row["step"]), str(row["probe_set"]), str(row["probe_id"]))
        if key in rows:
            raise RescoreError(f"{where}: duplicate prediction for step {key[0]}, probe set {key[1]!r}, probe "
                               f"{key[2]!r} (first at {rows[key][1]})")
        rows[key] = (row, where)
    return rows


# ------------------------------------------------------------------ rescoring
def match(task: Task, rows: dict[Key, tuple[dict[str, Any], str]]):
    """Yield (step, probe_set, outputs, rows) with every probe of the rebuilt task matched to its row."""
    used: set[Key] = set()
    for step in task.steps():
        for probe_set in step.probe_sets:
            outputs, matched = [], []
            for probe in probe_set.probes:
                key = (step.index, probe_set.name, probe.query.id)
                if key not in rows:
                    raise RescoreError(
                        f"no prediction for step {step.index} ({step.label}), probe set {probe_set.name!r}, probe "
                        f"{probe.query.id!r}: the run did not finish, or the overrides change the steps or probes")
                row, where = rows[key]
                if row["prompt"] != probe.query.prompt:
                    raise RescoreError(
                        f"{where}: the prediction answers another prompt than the rebuilt probe {probe.query.id!r} "
                        f"({row['prompt']!r} vs {probe.query.prompt!r}); rescoring cannot change what was asked")
                outputs.append(output_of(row, where))
                matched.append(row)
                used.add(key)
            yield step, probe_set, outputs, matched
    extra = sorted(set(rows) - used)
    if extra:
        raise RescoreError(f"{len(extra)} prediction(s) match no probe of the rebuilt task, e.g. step {extra[0][0]}, "
                           f"probe set {extra[0][1]!r}, probe {extra[0][2]!r}: the overrides change the steps or probes")


def rescore(path: str | Path, overrides: Sequence[str] = (), out: str | Path | None = None) -> tuple[dict, Path]:
    """Rescore a run; returns the new record and the directory it was written to."""
    record_path, predictions_path = locate(path)
    original = read_json(record_path, expected_format=f"a kbench {RECORD_FILE}")
    if original.get("schema_version") != SCHEMA_VERSION:
        raise RescoreError(f"{record_path}: record schema {original.get('schema_version')}, this kbench reads "
                           f"{SCHEMA_VERSION}")
    if original.get("status") != "done":
        raise RescoreError(f"{record_path}: the run's status is {original.get('status')!r} "
                           f"({original.get('error')}); only finished runs can be rescored")
    overrides = list(overrides)
    cfg = apply_overrides(original["config"], overrides)
    output_dir = Path(out) if out else record_path.parent / f"rescored-{stable_hash(overrides, length=10)}"
    if output_dir.resolve() == record_path.parent.resolve():
        raise RescoreError("--out must not be the original run directory: rescoring never overwrites a record")

    task: Task = build(cfg.task, "task")
    rows = index_predictions(predictions_path)
    results: list[ProbeResult] = []
    by_step: dict[int, list[ProbeResult]] = {step.index: [] for step in task.steps()}
    new_rows: list[dict[str, Any]] = []
    matches = list(match(task, rows))
    scored_sets = score_in_run_order(task, ((step, probe_set, outputs) for step, probe_set, outputs, _ in matches))
    for (step, probe_set, outputs, matched), scored in zip(matches, scored_sets):
        results += scored
        by_step[step.index] += scored
        new_rows += [row | {"gold": list(r.probe.answers), "metrics": r.metrics} for row, r in zip(matched, scored)]

    old_steps = {s["index"]: s for s in original.get("steps", [])}
    steps, earlier = [], []
    for step in task.steps():
        steps.append(old_steps.get(step.index, {"index": step.index, "label": step.label})
                     | {"metrics": task.step_metrics(by_step[step.index], earlier)})
        earlier += by_step[step.index]
    output_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused rescoring leaves nothing behind
    final = final_results(task, results, output_dir, original.get("method_deviations"))
    record = original | final | {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "run_id": run_identity(cfg),
        # rescorings of one setting's seeds with the same overrides form a setting of their own
        "group_id": stable_hash([original.get("group_id", ""), overrides]) if overrides else original.get("group_id", ""),
        "steps": steps,
        "rescore": {
            "source_record": str(record_path.resolve()),
            "source_run_id": original.get("run_id"),
            "overrides": overrides,
            "original_metrics": original.get("metrics", {}),
            "rescored_at": utc_now(),
            "git_commit": git_commit(),
        },
    }
    record["method_info"] = original.get("method_info", {}) | {"task": task.describe()}
    write_jsonl(output_dir / PREDICTIONS_FILE, new_rows)
    atomic_write_json(output_dir / RECORD_FILE, record)
    return record, output_dir


def comparison(record: dict[str, Any]) -> str:
    """Original and rescored metrics side by side."""
    before, after = record["rescore"]["original_metrics"], record["metrics"]
    names = list(after) + [name for name in before if name not in after]
    width = max(len(n) for n in names) if names else 6
    lines = [f"{'metric':<{width}}  {'original':>10}  {'rescored':>10}"]
    for name in names:
        cells = [f"{d[name]:>10.4f}" if isinstance(d.get(name), (int, float)) else f"{'-':>10}" for d in (before, after)]
        lines.append(f"{name:<{width}}  {cells[0]}  {cells[1]}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m runners.rescore",
        description="Recompute a run's metrics from its predictions.jsonl without the model, optionally with "
                    "changed scoring settings (task.KEY=VALUE); writes a new record beside the original.",
    )
    parser.add_argument("path", help="run directory (with record.json and predictions.jsonl) or its predictions file")
    parser.add_argument("overrides", nargs="*", help="task.KEY=VALUE scoring overrides (Hydra syntax)")
    parser.add_argument("--out", help="output directory (default: RUN_DIR/rescored-<hash of the overrides>)")
    args = parser.parse_args(argv)
    try:
        record, output_dir = rescore(args.path, args.overrides, args.out)
    except (KBenchError, ValueError, InstantiationException) as err:  # bad input: the message says what to fix; no traceback
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(comparison(record))
    print(f"record: {output_dir / RECORD_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
