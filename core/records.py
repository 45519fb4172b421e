"""The run record: one self-describing JSON file per run, rewritten atomically as the run progresses.

Schema (top-level keys; documented in docs/records.md):
    schema_version  int     bumped on any incompatible change
    status          str     "running" | "done" | "failed"
    error           str     the reason, when failed (exception type and message); else null
    run_id          str     hash of the resolved config minus bookkeeping keys (same config -> same id)
    group_id        str     the same hash with the run seed left out: runs that differ only in seed share it
    config          dict    the resolved Hydra config
    method, task, model  str  short names, for tables
    seed            int
    metrics         dict    final flat metrics, e.g. {"qa_f1": 0.61, "exact_match": 0.4, "contains": 0.7}
    metric_protocols dict   how each metric was computed, e.g. {"qa_f1": "generate/squad-token-f1"}
    method_deviations dict  knobs set off the method's reference implementation: {knob: "value (reference: r)"};
                            also appended to every metric protocol (`Method.reference`, docs/adding_a_method.md)
    metric_uncertainty dict  per metric that is a mean over independent units: {"se", "ci95", "n_units", "unit"}
    steps           list    per injection step: {"index", "label", "metrics", "inject_seconds", "eval_seconds"}
    task_report     dict    structured results from the task beyond flat metrics (e.g. a retention matrix)
    timings         dict    {"inject": s, "eval": s, "total": s, "load_model": s}
    extra_storage_bytes int  storage the method needs beside the base model, after the last step
    cost            dict    measured the same way for every method: inject_seconds_per_item, answer_seconds_per_query,
                            peak_rss_bytes (+ scope), peak_gpu_bytes on CUDA, extra_storage_bytes, parallel_jobs,
                            shared_machine (docs/records.md)
    method_info     dict    whatever the method reports about itself (e.g. {"merged": true})
    versions        dict    python, torch, transformers, peft, accelerate, tokenizers, sentence-transformers, kbench
    version_drift   list    packages whose installed release differs from requirements.lock, e.g.
                            ["transformers 5.17.0 (lock: 5.24.0)"]; [] for the tested set (core/environment.py)
    git_commit      str     commit of the code (with "-dirty" when the tree had uncommitted changes)
    started_at, finished_at  str  ISO-8601 UTC
    resumed_from    dict    set when this run continued an earlier, unfinished attempt of the same run_id:
                            {"directory", "steps_reused", "note"} (steps_reused 0: it started over)
    inputs          dict    the files the run read (data, cached sentences, regularisation texts, model
                            weights): {absolute path: {"sha256", "bytes"}}; a later launch re-hashes them
    truncation      dict    sequences cut to fit model.max_length and tokens dropped, by phase
                            (prepare / inject / probes); {} when nothing was cut
    diverged        dict    set when training ended at the uniform-distribution loss or every generated
                            answer is empty: {"reason", "step"}; the run is then `failed`
Per-probe predictions go to `predictions.jsonl` beside the record. Every JSON file is RFC 8259: a
non-finite float is written as the string "NaN", "Infinity" or "-Infinity" (core.io.to_json).
"""
from __future__ import annotations

import datetime as dt
import glob
import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.environment import version_drift
from core.io import atomic_write_json

SCHEMA_VERSION = 1
RECORD_FILE = "record.json"
PREDICTIONS_FILE = "predictions.jsonl"
# top-level config keys that do not change what a run computes: left out of its `run_id` / `group_id`
# (runners.results) and never what tells two settings apart in a report (runners.report).
# `hardware` is left out: its values reach the run through model.* / method.* interpolations, which count
BOOKKEEPING_KEYS = ("logger", "output_dir", "force", "resume", "hydra", "hardware")


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("torch", "transformers", "peft", "accelerate", "tokenizers", "sentence-transformers", "kbench"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def git_commit(repo: Path | None = None) -> str:
    """HEAD of the code's repository, suffixed "-dirty" when tracked files have uncommitted changes."""
    cwd = repo or Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


@dataclass
class RunRecord:
    run_id: str
    config: dict[str, Any]
    method: str
    task: str
    model: str
    seed: int
    status: str = "running"
    error: str | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    metric_protocols: dict[str, str] = field(default_factory=dict)
    method_deviations: dict[str, str] = field(default_factory=dict)
    metric_uncertainty: dict[str, dict[str, Any]] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    task_report: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra_storage_bytes: int = 0
    cost: dict[str, Any] = field(default_factory=dict)
    method_info: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=package_versions)
    version_drift: list[str] = field(default_factory=version_drift)
    git_commit: str = field(default_factory=git_commit)
    started_at: str = field(default_factory=utc_now)
    finished_at: str | None = None
    group_id: str = ""
    resumed_from: dict[str, Any] | None = None
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    truncation: dict[str, dict[str, int]] = field(default_factory=dict)
    diverged: dict[str, Any] | None = None
    schema_version: int = SCHEMA_VERSION

    def write(self, directory: Path) -> Path:
        path = Path(directory) / RECORD_FILE
        atomic_write_json(path, asdict(self))
        return path

BROKEN_LINK = "broken link: the record it points to was deleted"


@dataclass
class FoundRecord:
    """A `record.json` found on disk: its parsed content, or why it could not be read."""

    file: Path  # where it was found (a skipped run's folder holds a link to the done record)
    record: dict[str, Any] | None  # None when unreadable
    problem: str | None = None  # why it is unreadable

    @property
    def directory(self) -> Path:
        """The run folder the record really lives in (links resolved)."""
        return self.file.resolve().parent


def find_records(paths: Iterable[str | Path | None], missing_ok: bool = False,
                 containing: str | None = None) -> Iterator[FoundRecord]:
    """Every `record.json` under `paths` (searched recursively; a file path is taken as a record), each
    real file once: a link to a record already found (a skipped run's folder) and nested search folders
    count once. A broken link or a file that is not a JSON object comes back with `problem` set.

    missing_ok: skip paths that do not exist (and None) instead of raising FileNotFoundError.
    containing: skip, before parsing, records whose text does not contain this string (a run_id)."""
    seen: set[Path] = set()
    for path in paths:
        if path is None and missing_ok:
            continue
        path = Path(path)
        if path.is_file():
            files = [path]
        elif path.is_dir():
            # glob, not Path.rglob: rglob drops broken links, which must be reported
            files = sorted(Path(f) for f in glob.glob(str(path / "**" / RECORD_FILE), recursive=True))
        elif missing_ok:
            continue
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
        for file in files:
            target = file.resolve()
            if not target.is_file():
                yield FoundRecord(file, None, BROKEN_LINK)
                continue
            if target in seen:
                continue
            seen.add(target)
            try:
                text = target.read_text(encoding="utf-8")
                if containing is not None and containing not in text:  # cheap filter before parsing
                    continue
                record = json.loads(text)
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                yield FoundRecord(file, None, f"{type(err).__name__}: {err}")
                continue
            if not isinstance(record, dict):
                yield FoundRecord(file, None, f"not a JSON object (a {type(record).__name__})")
                continue
            yield FoundRecord(file, record)
