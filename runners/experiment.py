"""The one experiment loop: build model, method and task; for each step inject, probe, score, log.

Nothing here is specific to a method or a task. The record (`record.json`) is rewritten atomically
after every step, so a crash loses at most the step in progress, and a failed run still says why.
"""
from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import transformers
from omegaconf import DictConfig, OmegaConf

from core.records import PREDICTIONS_FILE, RunRecord, utc_now
from core.types import Answer, ProbeSet, TargetScore
from methods.base import Method
from runners.build import build
from runners.results import BOOKKEEPING_KEYS, final_results, run_identity, score_probe_set  # noqa: F401 (re-export)
from tasks.base import ProbeResult, Task

log = logging.getLogger(__name__)


def probe(method: Method, probe_set: ProbeSet) -> list[Answer] | list[TargetScore]:
    queries = [p.query for p in probe_set.probes]
    if probe_set.output_type == "generate":
        return method.answer(queries, probe_set.generation)
    if any(not p.answers for p in probe_set.probes):
        raise ValueError(f"probe set {probe_set.name!r}: log-likelihood probes need a target in `answers`")
    return method.score(queries, [p.answers[0] for p in probe_set.probes])


class Experiment:
    """Runs one (model, method, task) configuration and writes its record into `output_dir`."""

    def __init__(self, cfg: DictConfig, output_dir: str | Path, names: dict[str, str] | None = None) -> None:
        """`names` are the short names of the chosen model/method/task configs (Hydra's choices)."""
        self.cfg = cfg
        names = names or {}
        self.output_dir = Path(output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.record = RunRecord(
            run_id=run_identity(cfg),
            config=OmegaConf.to_container(cfg, resolve=True),
            method=names.get("method") or _short(cfg.method._target_),
            task=names.get("task") or _short(cfg.task._target_),
            model=names.get("model") or str(cfg.model.get("name_or_path", _short(cfg.model._target_))),
            seed=cfg.seed,
        )
        self.wandb_run: Any = None

    # ------------------------------------------------------------------ main loop
    def run(self) -> RunRecord:
        self.record.write(self.output_dir)
        started = time.perf_counter()
        try:
            self._run()
            self.record.status = "done"
        except BaseException as err:  # KeyboardInterrupt too: the record must say the run did not finish
            self.record.status = "failed"
            self.record.error = f"{type(err).__name__}: {err}"
            self.record.method_info["traceback"] = traceback.format_exc(limit=20)
            raise
        finally:
            self.record.timings["total"] = round(time.perf_counter() - started, 3)
            self.record.finished_at = utc_now()
            self.record.write(self.output_dir)
            self._finish_logger()
        return self.record

    def _run(self) -> None:
        cfg, record = self.cfg, self.record
        transformers.set_seed(cfg.seed)
        task: Task = build(cfg.task, "task")
        steps = task.steps()
        record.method_info["task"] = task.describe()

        started = time.perf_counter()
        lm = build(cfg.model, "model")
        record.timings["load_model"] = round(time.perf_counter() - started, 3)
        method: Method = build(cfg.method, "method", lm=lm)
        if cfg.get("logger") and "_target_" in cfg.logger:
            self.wandb_run = build(cfg.logger, "logger")
            self.wandb_run.config.update(record.config)

        started = time.perf_counter()
        method.prepare(task.training_knowledge())
        record.timings["prepare"] = round(time.perf_counter() - started, 3)

        predictions = self.output_dir / PREDICTIONS_FILE
        predictions.write_text("")
        all_results: list[ProbeResult] = []
        record.timings |= {"inject": 0.0, "eval": 0.0}
        for step in steps:
            step_results, inject_s, eval_s = self._run_step(method, task, step)
            all_results += step_results
            record.timings["inject"] = round(record.timings["inject"] + inject_s, 3)
            record.timings["eval"] = round(record.timings["eval"] + eval_s, 3)
            metrics = task.step_metrics(step_results)
            record.steps.append({
                "index": step.index, "label": step.label, "metrics": metrics,
                "inject_seconds": round(inject_s, 3), "eval_seconds": round(eval_s, 3),
                "extra_storage_bytes": method.extra_storage_bytes(),
            })
            record.extra_storage_bytes = method.extra_storage_bytes()
            with predictions.open("a", encoding="utf-8") as handle:
                handle.writelines(json.dumps(r.to_row(), ensure_ascii=False, default=str) + "\n" for r in step_results)
            record.write(self.output_dir)
            if self.wandb_run is not None:
                self.wandb_run.log({f"step/{k}": v for k, v in metrics.items()} | {"step/inject_seconds": inject_s},
                                   step=step.index)
            log.info("step %d (%s): %s", step.index, step.label, _fmt(metrics))

        final = final_results(task, all_results, self.output_dir)
        record.metrics, record.metric_protocols = final["metrics"], final["metric_protocols"]
        record.task_report = final["task_report"]
        record.method_info |= method.info()

    def _run_step(self, method: Method, task: Task, step) -> tuple[list[ProbeResult], float, float]:
        if step.reset_before:
            method.reset()
        started = time.perf_counter()
        if step.knowledge:
            method.inject(step.knowledge)
        inject_s = time.perf_counter() - started
        started = time.perf_counter()
        results: list[ProbeResult] = []
        for probe_set in step.probe_sets:
            results += score_probe_set(task, step.index, probe_set, probe(method, probe_set))
        return results, inject_s, time.perf_counter() - started

    def _finish_logger(self) -> None:
        if self.wandb_run is None:
            return
        record = self.record
        self.wandb_run.summary.update({**record.metrics, "status": record.status,
                                       "extra_storage_bytes": record.extra_storage_bytes,
                                       **{f"time/{k}": v for k, v in record.timings.items()}})
        self.wandb_run.save(str(self.output_dir / "record.json"), base_path=str(self.output_dir), policy="now")
        self.wandb_run.finish(exit_code=0 if record.status == "done" else 1)


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
