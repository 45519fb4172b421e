"""The one experiment loop: build model, method and task; for each step inject, probe, score, log.

Nothing here is specific to a method or a task. The record (`record.json`) is rewritten atomically
after every step, so a crash loses at most the step in progress, and a failed run still says why.
A checkpoint follows every step but the last; a run given `resume_from` (an earlier, unfinished
attempt of the same config) continues after that attempt's last checkpoint (runners/resume.py).

The record also says what the config does not: the digests of the files the run read (`inputs`),
how many sequences were cut to fit the model (`truncation`), and whether training collapsed to a
uniform model (`diverged`: the run is then `failed`, so no table shows its numbers as a result).
"""
from __future__ import annotations

import logging
import math
import os
import time
import traceback
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import transformers
from omegaconf import DictConfig, OmegaConf

from core import cost
from core.io import append_jsonl, clear_inputs, default_modes, file_digest, noted_inputs, write_jsonl
from core.records import PREDICTIONS_FILE, RunRecord, utc_now
from core.types import Answer, KBenchError, ProbeSet, Step, TargetScore
from methods.base import Method
from runners import resume
from runners.build import build, check_run
from runners.results import (  # noqa: F401 (BOOKKEEPING_KEYS, run_identity: re-exported)
    BOOKKEEPING_KEYS, final_results, run_identity, score_probe_set, setting_identity,
)
from tasks.base import ProbeResult, Task

log = logging.getLogger(__name__)

# conf/hydra/launcher/{joblib,submitit_local,submitit_slurm}.yaml hold kbench's settings for the launcher
# plugins under the plugins' own names, so `hydra/launcher=joblib` picks them; Hydra still checks them
# against the plugins' schemas and warns, in every job, that this matching is deprecated. It is meant.
# The filter lives here because launcher workers import this module (unpickling run.py's main) before
# Hydra composes the job's config, so it covers them as well as run.py's own process.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema with the same name")


class DivergedError(KBenchError):
    """Training collapsed: the record keeps its numbers, but the run is `failed`, not a result."""


def probe(method: Method, probe_set: ProbeSet) -> list[Answer] | list[TargetScore]:
    queries = [p.query for p in probe_set.probes]
    if probe_set.output_type == "generate":
        return method.answer(queries, probe_set.generation)
    if any(not p.answers for p in probe_set.probes):
        raise ValueError(f"probe set {probe_set.name!r}: log-likelihood probes need a target in `answers`")
    targets = [p.answers[0] for p in probe_set.probes]
    if probe_set.output_type == "loglikelihood_bare":
        return method.loglikelihood_unaugmented(queries, targets)
    return method.loglikelihood(queries, targets)


class Experiment:
    """Runs one (model, method, task) configuration and writes its record into `output_dir`."""

    def __init__(self, cfg: DictConfig, output_dir: str | Path, names: dict[str, str] | None = None,
                 resume_from: str | Path | None = None, parallel_jobs: int = 1) -> None:
        """`names` are the short names of the chosen model/method/task configs (Hydra's choices);
        `resume_from` is the folder of an earlier, unfinished attempt of this run to continue;
        `parallel_jobs` how many jobs the launcher runs at once on this machine (joblib's n_jobs)."""
        self.cfg = cfg
        self.parallel_jobs = parallel_jobs
        self._cost = {"items": 0, "inject_s": 0.0, "queries": 0, "answer_s": 0.0}  # steps run in this process
        self._load = cost.LoadMonitor()
        self._rss_scope = "process"
        self.resume_from = Path(resume_from) if resume_from else None
        # read now: this run's own record may replace it (same folder) before it is used
        self._earlier_steps = resume.recorded_steps(self.resume_from) if self.resume_from else []
        names = names or {}
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.record = RunRecord(
            run_id=run_identity(cfg),
            group_id=setting_identity(cfg),
            config=OmegaConf.to_container(cfg, resolve=True),
            method=names.get("method") or _short(cfg.method._target_),
            task=names.get("task") or _short(cfg.task._target_),
            model=names.get("model") or str(cfg.model.get("name_or_path", _short(cfg.model._target_))),
            seed=cfg.seed,
        )
        self.wandb_run: Any = None
        self.lm: Any = None

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunRecord:
        clear_inputs()  # a joblib worker runs several jobs: only this run's reads count
        self._rss_scope = cost.reset_peaks()  # and only this run's memory peak, where the OS allows
        self._write()
        started = time.perf_counter()
        try:
            with self._load:  # other work on the machine, watched for the whole run (cost.shared_machine)
                self._run()
            self.record.status = "done"
            if not self.cfg.get("resume", {}).get("keep_checkpoints", False):
                resume.remove_checkpoints(self.output_dir)
                if self.resume_from is not None:
                    resume.remove_checkpoints(self.resume_from)  # that attempt is finished now, here
        except BaseException as err:  # KeyboardInterrupt too: the record must say the run did not finish
            self.record.status = "failed"
            self.record.error = f"{type(err).__name__}: {err}"
            self.record.method_info["traceback"] = traceback.format_exc(limit=20)
            raise
        finally:
            self.record.timings["total"] = round(time.perf_counter() - started, 3)
            self.record.finished_at = utc_now()
            default_modes(self.output_dir)  # what methods and tasks saved (safetensors: 0600) reads like the rest
            self._write()
            self._finish_logger()
        return self.record

    def _run(self) -> None:
        cfg, record = self.cfg, self.record
        transformers.set_seed(cfg.seed)
        check_run(cfg)  # every knob at every depth, before any data or model is loaded
        task: Task = build(cfg.task, "task")
        steps = task.steps()
        record.method_info["task"] = task.describe()

        started = time.perf_counter()
        lm = self.lm = build(cfg.model, "model")
        record.timings["load_model"] = round(time.perf_counter() - started, 3)
        method: Method = build(cfg.method, "method", lm=lm)
        if cfg.get("logger") and "_target_" in cfg.logger:
            self.wandb_run = build(cfg.logger, "logger")
            self.wandb_run.config.update(record.config)

        started, cut = time.perf_counter(), self._cut()
        method.prepare(task.training_knowledge())
        record.timings["prepare"] = round(time.perf_counter() - started, 3)
        self._count_truncation("prepare", cut)

        predictions = self.output_dir / PREDICTIONS_FILE
        record.timings |= {"inject": 0.0, "eval": 0.0}
        all_results, first = self._reuse_finished_steps(method, task, steps)
        for position in range(first, len(steps)):
            step = steps[position]
            step_results, inject_s, eval_s = self._run_step(method, task, step, all_results)
            metrics = task.step_metrics(step_results, all_results)
            all_results += step_results
            record.timings["inject"] = round(record.timings["inject"] + inject_s, 3)
            record.timings["eval"] = round(record.timings["eval"] + eval_s, 3)
            record.steps.append({
                "index": step.index, "label": step.label, "metrics": metrics,
                "inject_seconds": round(inject_s, 3), "eval_seconds": round(eval_s, 3),
                "extra_storage_bytes": method.extra_storage_bytes(),
            })
            record.extra_storage_bytes = method.extra_storage_bytes()
            append_jsonl(predictions, [r.to_row() for r in step_results])
            self._check_divergence(method, step.index)
            self._write()
            self._checkpoint(method, steps, position)
            self._log_step(record.steps[-1])

        record.method_deviations = method.reference_deviations()
        final = final_results(task, all_results, self.output_dir, record.method_deviations)
        record.metrics, record.metric_protocols = final["metrics"], final["metric_protocols"]
        record.metric_uncertainty = final["metric_uncertainty"]
        record.task_report = final["task_report"]
        record.method_info |= method.info()
        method_report = method.report(self.output_dir)
        if method_report:
            record.method_info["report"] = method_report
        record.cost = self._costs(method)
        if record.diverged is None and _all_empty(all_results) and record.method_info.get("final_train_loss") is not None:
            record.diverged = {"reason": "every generated answer is empty after training", "step": None}
        if record.diverged is not None:
            raise DivergedError(f"{record.diverged['reason']}; its metrics are not a result (record.diverged)")

    # ------------------------------------------------------------------ what the config does not say
    def _write(self) -> None:
        """Write the record with the digests of the files read so far (outside the run's own folders:
        a resumed method state is not an input)."""
        own = [self.output_dir.resolve()] + ([self.resume_from.resolve()] if self.resume_from else [])
        for path in noted_inputs():
            if path not in self.record.inputs and not any(Path(path).is_relative_to(d) for d in own):
                digest = file_digest(path)
                if digest is not None:
                    self.record.inputs[path] = digest
        self.record.write(self.output_dir)

    def _cut(self) -> dict[str, int]:
        """The LM's truncation counters now (an LM without them counts nothing)."""
        return dict(getattr(self.lm, "truncation", None) or {})

    def _count_truncation(self, phase: str, before: dict[str, int]) -> None:
        """Add what was cut since `before` to `record.truncation[phase]`, and warn once per phase."""
        now = self._cut()
        added = {k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)}
        if not added:
            return
        if phase not in self.record.truncation:
            log.warning("%s: %d sequence(s) longer than model.max_length=%s were cut (%d tokens dropped; counted in "
                        "record.truncation)", phase, added.get("sequences", 0), getattr(self.lm, "max_length", "?"),
                        added.get("tokens_dropped", 0))
        total = self.record.truncation.setdefault(phase, {})
        for key, value in added.items():
            total[key] = total.get(key, 0) + value

    def _check_divergence(self, method: Method, step_index: int) -> None:
        """Training that collapsed to a uniform model (issue 13: lr=1e9 finished `done`, every answer
        empty, drift 'improved' 35x). A uniform prediction scores exactly ln(vocab) per token, so:
        - the last optimiser steps sit at ln(vocab) (within 0.2%: a collapsed model is uniform to the
          fourth decimal, lr=1e9 on the tiny model gave 5.95064 for ln 384 = 5.95064), or
        - the loss exploded past uniform (>= 1.5 x ln(vocab)) and ended above where it started, or
        - the loss is not finite.
        Merely being near ln(vocab) is not flagged: the tiny test model, trained only to copy random
        tokens, starts within 1% of uniform on prose and legitimately stays there for a few steps."""
        info = method.info()
        losses = [float(x) for x in (getattr(method, "losses", None) or [])]  # per optimiser step, if kept
        if not losses and isinstance(info.get("final_train_loss"), (int, float)):
            losses = [float(info["final_train_loss"])]
        vocab = getattr(getattr(getattr(self.lm, "causal_lm", None), "config", None), "vocab_size", None)
        if self.record.diverged is not None or not losses or not vocab:
            return
        uniform, last = math.log(vocab), losses[-1]
        reason = None
        if not math.isfinite(last):
            reason = f"the final train loss is {last}"
        elif all(abs(x - uniform) <= 0.002 * uniform for x in losses[-2:]):
            reason = f"the train loss sits at ln(vocab) = {uniform:.3f}, a uniform model's (last: {last:.3f})"
        elif len(losses) > 1 and last >= 1.5 * uniform and last > losses[0]:
            reason = (f"the train loss rose from {losses[0]:.3f} to {last:.3f}, past 1.5 x ln(vocab) = "
                      f"{1.5 * uniform:.3f} (a uniform model scores {uniform:.3f})")
        if reason:
            self.record.diverged = {"reason": f"training diverged: {reason}", "step": step_index}
            log.warning("step %d: %s", step_index, self.record.diverged["reason"])

    def _log_step(self, entry: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.log({f"step/{k}": v for k, v in entry["metrics"].items()}
                               | {"step/inject_seconds": entry["inject_seconds"]}, step=entry["index"])
        # a step without probes (editing scores after the last edit) says what it did instead of ending in ": "
        shown = _fmt(entry["metrics"]) or f"injected in {entry['inject_seconds']:.1f} s, not scored at this step"
        log.info("step %d (%s): %s", entry["index"], entry["label"], shown)

    # ------------------------------------------------------------------ resuming
    def _checkpoint(self, method: Method, steps: Sequence[Step], position: int) -> None:
        """What a new process needs to continue at the next step: the step count, and the method's
        state only if that step continues from it (no reset first). None after the last step."""
        if position + 1 >= len(steps) or not self.cfg.get("resume", {}).get("checkpoint", True):
            return
        with_state = not steps[position + 1].reset_before
        saved = resume.write_checkpoint(self.output_dir, self.record.run_id, position + 1, method, with_state)
        if saved is None and not getattr(self, "_said_no_state", False):
            self._said_no_state = True  # once per run: the same is true of every later step
            log.warning("%s cannot save its state (Method.save_state): if this run is killed, it resumes from "
                        "an earlier checkpoint or starts over", type(method).__name__)

    def _reuse_finished_steps(self, method: Method, task: Task, steps: Sequence[Step]) -> tuple[list[ProbeResult], int]:
        """Continue `resume_from` after its last checkpoint: the task scores the finished steps' stored
        outputs again, their record entries and prediction lines are carried over, the method's state
        is loaded. Returns the results so far and the position of the first step to run."""
        predictions, record = self.output_dir / PREDICTIONS_FILE, self.record
        if self.resume_from is None:
            write_jsonl(predictions, [])
            return [], 0
        try:
            finished = resume.finished_steps(self.resume_from, self._earlier_steps, record.run_id, list(steps))
            by_step = resume.score_again(task, finished)
        except (KBenchError, OSError, ValueError, KeyError) as err:
            write_jsonl(predictions, [])
            record.resumed_from = {"directory": str(self.resume_from), "steps_reused": 0, "note": f"started over: {err}"}
            log.warning("could not continue %s, starting over: %s", self.resume_from, err)
            return [], 0
        results: list[ProbeResult] = []
        for entry in finished.entries:
            step_results = by_step.get(entry["index"], [])
            record.steps.append(entry | {"metrics": task.step_metrics(step_results, results)})
            results += step_results
            record.timings["inject"] = round(record.timings["inject"] + entry.get("inject_seconds", 0.0), 3)
            record.timings["eval"] = round(record.timings["eval"] + entry.get("eval_seconds", 0.0), 3)
            record.extra_storage_bytes = entry.get("extra_storage_bytes", 0)
            self._log_step(record.steps[-1])
        if finished.checkpoint.method_state is not None:
            method.load_state(finished.checkpoint.method_state)
        write_jsonl(predictions, finished.rows)
        restored = " (method state restored)" if finished.checkpoint.method_state is not None else ""
        record.resumed_from = {"directory": str(self.resume_from), "steps_reused": len(finished.entries),
                               "note": "continued after the last checkpoint" + restored}
        self._write()
        log.info("continuing %s after %d finished step(s)%s", self.resume_from, len(finished.entries), restored)
        return results, len(finished.entries)

    def _costs(self, method: Method) -> dict[str, Any]:
        """The record's `cost` (docs/records.md): per injected item and per query, over the steps this
        process ran (a resumed run's reused steps are not timed again), peak memory, extra storage."""
        c = self._cost
        return {
            "inject_seconds_per_item": round(c["inject_s"] / c["items"], 6) if c["items"] else None,
            "items_injected": c["items"],
            "answer_seconds_per_query": round(c["answer_s"] / c["queries"], 6) if c["queries"] else None,
            "queries": c["queries"],
            **cost.peaks(self._rss_scope),
            "extra_storage_bytes": method.extra_storage_bytes(),
            "parallel_jobs": self.parallel_jobs,
            "max_load_average": None if self._load.max is None else round(self._load.max, 2),
            "cpu_count": os.cpu_count(),
            "torch_threads": cost.torch_threads(),
            "shared_machine": cost.machine_shared(self.parallel_jobs, self._load.max, threads=cost.torch_threads()),
        }

    def _run_step(self, method: Method, task: Task, step,
                  earlier: Sequence[ProbeResult]) -> tuple[list[ProbeResult], float, float]:
        """Inject one step's knowledge, ask its probe sets and score them (`earlier`: the results of the
        run's earlier steps, which scoring may compare with). Returns the results, inject and eval seconds."""
        if step.reset_before:
            method.reset()
        started, cut = time.perf_counter(), self._cut()
        if step.knowledge:
            method.inject(step.knowledge)
        inject_s = time.perf_counter() - started
        self._load.sample()
        self._cost["items"] += len(step.knowledge)
        self._cost["inject_s"] += inject_s
        self._count_truncation("inject", cut)
        started, cut = time.perf_counter(), self._cut()
        results: list[ProbeResult] = []
        for probe_set in step.probe_sets:
            answering = time.perf_counter()
            outputs = probe(method, probe_set)  # the method's answering alone: scoring is the task's cost
            self._cost["answer_s"] += time.perf_counter() - answering
            self._cost["queries"] += len(probe_set.probes)
            results += score_probe_set(task, step.index, probe_set, outputs, earlier)
        self._count_truncation("probes", cut)
        self._load.sample()
        return results, inject_s, time.perf_counter() - started

    def _finish_logger(self) -> None:
        if self.wandb_run is None:
            return
        record = self.record
        self.wandb_run.summary.update({**record.metrics, "status": record.status,
                                       "extra_storage_bytes": record.extra_storage_bytes,
                                       **{f"time/{k}": v for k, v in record.timings.items()},
                                       **{f"cost/{k}": v for k, v in record.cost.items() if isinstance(v, (int, float))}})
        self.wandb_run.save(str(self.output_dir / "record.json"), base_path=str(self.output_dir), policy="now")
        self.wandb_run.finish(exit_code=0 if record.status == "done" else 1)


def _all_empty(results: Sequence[ProbeResult]) -> bool:
    """Whether the run generated answers and every one is empty (a collapsed model emits only EOS)."""
    answers = [r.output for r in results if isinstance(r.output, Answer)]
    return bool(answers) and all(not a.text.strip() for a in answers)


def _short(target: str) -> str:
    return target.rsplit(".", 1)[-1]


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.3f}" for k, v in metrics.items())


def results_table(records: Sequence[RunRecord]) -> str:
    """A small plain-text table of finished runs (printed at the end of `run.py`)."""
    import pandas as pd

    rows = [
        {"method": r.method, "task": r.task, "model": r.model, "status": r.status,
         **{k: round(v, 3) for k, v in r.metrics.items()},
         "inject_s": r.timings.get("inject"), "extra_storage_B": r.extra_storage_bytes}
        for r in records
    ]
    return pd.DataFrame(rows).to_string(index=False)
