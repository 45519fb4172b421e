"""Resumable runs: find earlier attempts of the same run, skip finished ones, continue unfinished ones.

A run is identified by its `run_id` (hash of the resolved config minus bookkeeping keys). Hydra names
output folders by time, so a re-launched sweep writes into new folders; earlier attempts are found by
scanning, for `record.json` files with the same run_id, the folder the command writes to (the sweep
folder, or the run folder: a command given `hydra.sweep.dir=...` finds its own earlier records wherever
that is) and `resume.search_dir` (default `outputs/`):

- one says `done` -> the job does nothing but link its folder's `record.json` to that record, so the
  new sweep folder still holds every run (`force=true` runs it again);
- else the newest attempt with a checkpoint (killed: `running`, or `failed`) is continued after its
  last checkpointed step, in the new folder; without a checkpoint the run starts over. Either way the
  new record's `resumed_from` says which attempt it continued and from where.

Checkpoints. After step k the runner writes `checkpoints/step-<k>/` into the run folder:
`checkpoint.json` (written last: its presence marks a complete checkpoint) and, when the next step
does not reset the method, the method's own state (`Method.save_state`) in `method/`. Steps that
reset first need no state, so every single-injection run is resumable whatever the method. Older
checkpoints are deleted once a newer one is complete; all are deleted when the run is done.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from core.io import atomic_write_json, default_modes, file_digest
from core.predictions import output_of  # a predictions line -> the method output, as offline rescoring does
from core.records import BROKEN_LINK, PREDICTIONS_FILE, RECORD_FILE, find_records
from core.types import Answer, KBenchError, ProbeSet, Step, TargetScore
from runners.results import score_in_run_order
from tasks.base import ProbeResult, Task

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
CHECKPOINT_FILE = "checkpoint.json"
LOCK_FILE = ".kbench.lock"


@dataclass
class Attempt:
    """An earlier record of the same run."""

    directory: Path
    record: dict[str, Any]

    @property
    def done(self) -> bool:
        return self.record.get("status") == "done"


def earlier_attempts(search_dirs: str | Path | None | Iterable[str | Path | None], run_id: str) -> list[Attempt]:
    """Records with this run_id under the search folders (recursively), newest first; a record reached
    twice (a link, or nested folders) counts once."""
    if search_dirs is None or isinstance(search_dirs, (str, Path)):
        search_dirs = [search_dirs]
    attempts = []
    for found in find_records(search_dirs, missing_ok=True, containing=run_id):
        if found.record is None:
            if found.problem != BROKEN_LINK:  # a link left by a deleted done run is no record at all
                log.warning("ignoring unreadable record %s: %s", found.file, found.problem)
        elif found.record.get("run_id") == run_id:
            attempts.append(Attempt(found.directory, found.record))
    return sorted(attempts, key=lambda a: a.record.get("started_at") or "", reverse=True)


def input_changes(record: dict[str, Any]) -> list[str]:
    """How the files an earlier attempt read differ from them now ([]: the same). A record without
    `inputs` (written before kbench recorded them) cannot vouch for its data, so it counts as changed."""
    if "inputs" not in record:
        return ["its record lists no input digests (written before kbench recorded them)"]
    changes = []
    for path, then in (record.get("inputs") or {}).items():
        now = file_digest(path)
        if now is None:
            changes.append(f"{path} is gone")
        elif now["sha256"] != then.get("sha256"):
            changes.append(f"{path} changed (sha256 {str(then.get('sha256'))[:12]} -> {now['sha256'][:12]}, "
                           f"{then.get('bytes')} -> {now['bytes']} bytes)")
    return changes


# ------------------------------------------------------------------ owning a folder
class FolderInUse(KBenchError):
    """Another live run holds this folder, or it holds the record of another run."""


def claim_folder(output_dir: Path, run_id: str) -> IO[str]:
    """Lock `output_dir` for this run until the returned handle is closed (or the process dies: the
    kernel drops an flock with its holder, so a killed run never leaves a stale lock). Refuses a folder
    that another live run holds, or that holds the (real, not linked) record of a different run_id:
    two launches into one folder would interleave predictions.jsonl and overwrite each other's record.
    flock is per machine on most network file systems; use distinct folders across machines."""
    output_dir.mkdir(parents=True, exist_ok=True)
    handle = (output_dir / LOCK_FILE).open("a+", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUse(f"{output_dir} is in use by a run still going ({holder}); two runs never share a "
                          "folder: wait for it, or give this one another hydra.run.dir / hydra.sweep.dir") from None
    record = output_dir / RECORD_FILE
    if record.is_file() and not record.is_symlink():
        try:
            other = json.loads(record.read_text(encoding="utf-8")).get("run_id")
        except (OSError, ValueError, AttributeError):
            other = None  # unreadable: nothing worth keeping
        if other and other != run_id:
            handle.close()
            raise FolderInUse(f"{output_dir} holds the record of another run ({other}; this is {run_id}): not "
                              "overwriting it. Give this run another hydra.run.dir / hydra.sweep.dir")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {os.uname().nodename}, run {run_id}\n")
    handle.flush()
    return handle


def in_use(directory: Path) -> bool:
    """Whether a live run holds `directory` (never ask about a folder this process holds: flock
    conflicts between two descriptors of one process, so it would say yes)."""
    lock = Path(directory) / LOCK_FILE
    if not lock.is_file():
        return False
    with lock.open("a", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False


def link_record(done: Attempt, output_dir: Path) -> Path:
    """Make `output_dir/record.json` a relative link to the done record (nothing to do if it is that record)."""
    link = output_dir / RECORD_FILE
    target = done.directory / RECORD_FILE
    if link.resolve() == target.resolve():
        return link
    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = output_dir / f".{RECORD_FILE}.link"
    temporary.unlink(missing_ok=True)
    temporary.symlink_to(os.path.relpath(target, output_dir))
    os.replace(temporary, link)
    return link


# ------------------------------------------------------------------ checkpoints
@dataclass
class Checkpoint:
    directory: Path
    steps_done: int  # steps 0 .. steps_done-1 are complete (positions in `Task.steps()`)
    method_state: Path | None  # the method's saved state, when the next step does not reset


def write_checkpoint(output_dir: Path, run_id: str, steps_done: int, method: Any, with_state: bool) -> Checkpoint | None:
    """Checkpoint after `steps_done` steps; with `with_state`, also the method's state. Returns None (and
    keeps the older checkpoint) when the method cannot save its state."""
    root = output_dir / CHECKPOINTS
    directory = root / f"step-{steps_done:05d}"
    shutil.rmtree(directory, ignore_errors=True)  # a half-written one from a killed attempt in this folder
    directory.mkdir(parents=True)
    state = directory / "method" if with_state else None
    if state is not None:
        state.mkdir()
        if not method.save_state(state):
            shutil.rmtree(directory)
            return None
    default_modes(directory)  # safetensors writes 0600: the checkpoint reads like the rest of the folder
    atomic_write_json(directory / CHECKPOINT_FILE, {
        "run_id": run_id, "steps_done": steps_done, "method_state": state.name if state else None,
    })
    for older in root.iterdir():
        if older != directory and older.name.startswith("step-"):
            shutil.rmtree(older, ignore_errors=True)
    return Checkpoint(directory, steps_done, state)


def latest_checkpoint(run_dir: Path, run_id: str) -> Checkpoint | None:
    """The newest complete checkpoint of this run in `run_dir`, if any."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    for directory in sorted(root.glob("step-*"), reverse=True):
        try:
            meta = json.loads((directory / CHECKPOINT_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue  # incomplete: killed while writing it
        if meta.get("run_id") != run_id:
            continue
        state = directory / meta["method_state"] if meta.get("method_state") else None
        return Checkpoint(directory, int(meta["steps_done"]), state)
    return None


def remove_checkpoints(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / CHECKPOINTS, ignore_errors=True)


# ------------------------------------------------------------------ reusing finished steps
class ResumeError(KBenchError):
    """An earlier attempt cannot be continued (the message says why); the run starts over."""


@dataclass
class FinishedSteps:
    """What an earlier attempt completed before its checkpoint, read back from its files."""

    checkpoint: Checkpoint
    entries: list[dict[str, Any]]  # the record's `steps` entries
    rows: list[dict[str, Any]]  # their predictions.jsonl lines, in file order
    outputs: list[tuple[Step, ProbeSet, list[Answer | TargetScore]]]  # per probe set, in run order


def recorded_steps(attempt_dir: Path) -> list[dict[str, Any]]:
    """The `steps` entries of an attempt's record ([] if it cannot be read)."""
    try:
        return json.loads((Path(attempt_dir) / RECORD_FILE).read_text(encoding="utf-8")).get("steps", [])
    except (OSError, json.JSONDecodeError, AttributeError):
        return []


def finished_steps(attempt_dir: Path, recorded: list[dict[str, Any]], run_id: str, steps: list[Step]) -> FinishedSteps:
    """The steps an earlier attempt of this run finished (`recorded`: its record's `steps`), with the
    method output of every probe, so the task can score them again exactly as the attempt did.
    Raises `ResumeError` if the attempt's files do not cover its last checkpoint."""
    checkpoint = latest_checkpoint(attempt_dir, run_id)
    if checkpoint is None:
        raise ResumeError(f"no checkpoint in {attempt_dir}: the attempt stopped before finishing a step, or its "
                          "method cannot save its state (Method.save_state) before a step without reset")
    done = steps[: checkpoint.steps_done]
    entries = recorded[: len(done)]
    if [e.get("index") for e in entries] != [s.index for s in done]:
        raise ResumeError(f"{attempt_dir / RECORD_FILE} does not list the {len(done)} checkpointed steps")
    indices = {s.index for s in done}
    rows, by_key = [], {}
    predictions = attempt_dir / PREDICTIONS_FILE
    for line_no, line in enumerate(predictions.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # torn last line of the step that was running when the attempt died
        if row.get("step") in indices:
            rows.append(row)
            by_key[(row["step"], row["probe_set"], row["probe_id"])] = (row, f"{predictions}:{line_no}")
    outputs = []
    for step in done:
        for probe_set in step.probe_sets:
            found = [by_key.get((step.index, probe_set.name, p.query.id)) for p in probe_set.probes]
            if any(f is None for f in found):
                raise ResumeError(f"{predictions} lacks predictions of step {step.index}, probe set {probe_set.name!r}")
            outputs.append((step, probe_set, [output_of(row, where) for row, where in found]))
    return FinishedSteps(checkpoint, entries, rows, outputs)


def score_again(task: Task, finished: FinishedSteps) -> dict[int, list[ProbeResult]]:
    """The task's scores of the finished steps' outputs, per step index, each probe set given the results
    of the steps before it (`Task.process_results`), exactly as the attempt scored them."""
    by_step: dict[int, list[ProbeResult]] = {}
    for (step, _, _), scored in zip(finished.outputs, score_in_run_order(task, finished.outputs)):
        by_step.setdefault(step.index, []).extend(scored)
    return by_step
