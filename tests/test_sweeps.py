"""Sweeps through the real launchers (basic, joblib, submitit's local executor), skipping finished runs,
surviving a killed sweep and failed jobs, W&B grouping, and the `+experiment=paper_*` presets."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from core.io import cache_dir
from runners import report
from runners.build import check_config
from tests.conftest import CONF, ROOT, compose_config, read_record, run_cli

TINY = ["model=tiny", "logger=none"]
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def records_in(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/record.json"))


def test_submitit_local_sweep_of_2_methods_x_2_seeds_reports_2_rows(tmp_path):
    """Acceptance 1: the SLURM launcher's engine, run locally for real."""
    result = run_cli("-m", "hydra/launcher=submitit_local", *TINY, "method=base,context", "seed=0,1", "task.limit=2",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(p.read_text()) for p in records_in(tmp_path)]
    assert len(records) == 4 and all(r["status"] == "done" for r in records)
    assert len(list((tmp_path / ".submitit").rglob("*_log.out"))) == 4  # where submitit puts each job's stdout
    table = report.summarize(report.runs_frame(report.load_runs([tmp_path]).records))
    assert sorted(table["method"]) == ["base", "context"] and list(table["n"]) == [2, 2]
    assert "| base " in report.render([tmp_path]) and "Failed" not in report.render([tmp_path])


def test_a_killed_joblib_sweep_reruns_exactly_the_missing_runs(tmp_path):
    """Acceptance 2: SIGKILL a 6-run joblib sweep (parent and workers) half way; the same
    command again executes only the runs without a `done` record; no record is ever corrupt."""
    def command(sweep_dir: Path) -> list[str]:
        return ["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "method=ft_context", "method.epochs=3",
                "seed=0,1,2,3,4,5", "task.limit=2", f"resume.search_dir={tmp_path}", f"hydra.sweep.dir={sweep_dir}"]

    first = tmp_path / "first"
    log = (tmp_path / "first.log").open("w")
    process = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *command(first)], cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT, start_new_session=True, env=os.environ | {"TQDM_DISABLE": "1"})
    deadline = time.monotonic() + 300
    while True:  # half way: 2 runs done and another one running
        statuses = [json.loads(p.read_text())["status"] for p in records_in(first)]
        if statuses.count("done") >= 2 and "running" in statuses:
            break
        assert process.poll() is None, "the sweep ended before it could be killed"
        assert time.monotonic() < deadline, "the sweep did not get half way in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    before = [json.loads(p.read_text()) for p in records_in(first)]  # a corrupt record would raise here
    finished = {r["run_id"] for r in before if r["status"] == "done"}
    assert 2 <= len(finished) < 6 and any(r["status"] == "running" for r in before)

    second = tmp_path / "second"
    result = run_cli(*command(second))
    assert result.returncode == 0, result.stderr[-3000:]
    executed = [p for p in records_in(second) if not p.is_symlink()]
    skipped = [p for p in records_in(second) if p.is_symlink()]
    assert len(executed) == 6 - len(finished) and len(skipped) == len(finished)
    assert {json.loads(p.read_text())["run_id"] for p in executed}.isdisjoint(finished)
    assert {json.loads(p.read_text())["run_id"] for p in skipped} == finished
    runs = report.load_runs([tmp_path])
    assert len(runs.records) == 6 and all(r["status"] == "done" for r in runs.records)
    assert not runs.unreadable


@pytest.mark.parametrize("launcher", ["basic", pytest.param("joblib", marks=pytest.mark.slow),
                                      pytest.param("submitit_local", marks=pytest.mark.slow)])
def test_a_failed_job_does_not_lose_the_others_and_the_report_says_why(tmp_path, launcher):
    result = run_cli("-m", f"hydra/launcher={launcher}", *TINY, "method=base", "task.limit=1", "task.n_contexts=2,abc",
                     f"hydra.sweep.dir={tmp_path}")
    assert result.returncode == 1
    statuses = sorted(json.loads(p.read_text())["status"] for p in records_in(tmp_path))
    assert statuses == ["done", "failed"]
    text = report.render([tmp_path])
    assert "Failed or unfinished runs (1):" in text and "ConfigError: task.n_contexts: expected int >= 1, got 'abc'" in text


def test_a_done_run_is_skipped_a_changed_one_runs_and_force_reruns(tmp_path):
    def run(name: str, *extra: str):
        result = run_cli(*TINY, "method=base", "task.limit=1", f"resume.search_dir={tmp_path}",
                         f"hydra.run.dir={tmp_path / name}", *extra)
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run("first")
    again = run("again", "resume.checkpoint=false")  # a bookkeeping key: the same run
    assert "skipped: run" in again.stdout and "force=true" in again.stdout
    link = tmp_path / "again" / "record.json"
    assert link.is_symlink() and link.resolve() == (tmp_path / "first" / "record.json").resolve()
    assert not (tmp_path / "again" / "predictions.jsonl").exists()

    changed = run("changed", "task.limit=2")
    assert "skipped: run" not in changed.stdout and read_record(tmp_path / "changed")["status"] == "done"

    forced = run("forced", "force=true")
    assert "skipped: run" not in forced.stdout and not (tmp_path / "forced" / "record.json").is_symlink()
    assert read_record(tmp_path / "forced")["run_id"] == read_record(tmp_path / "first")["run_id"]
    assert len(report.load_runs([tmp_path]).records) == 2  # first/forced/again are one run; changed is another


def test_sweep_runs_are_grouped_in_wandb_by_sweep(tmp_path):
    sweep = tmp_path / "2026-01-01_00-00-00_mysweep"
    result = run_cli("-m", "model=tiny", "method=base,context", "task.limit=1", f"hydra.sweep.dir={sweep}",
                     env={"WANDB_API_KEY": None, "WANDB_MODE": None, "HOME": str(tmp_path),
                          "KBENCH_CACHE": str(cache_dir())})
    assert result.returncode == 0, result.stderr[-3000:]
    for path in records_in(sweep):
        logger = json.loads(path.read_text())["config"]["logger"]
        assert logger["group"] == sweep.name and logger["job_type"] == "synthetic" and logger["mode"] == "offline"
        assert logger["tags"][1] == "tiny" and logger["tags"][0] in ("base", "context")
        assert list((path.parent / "wandb").glob("offline-run-*/*.wandb"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_with_every_swept_value(preset):
    """A preset naming a method or task that does not exist, or a knob its target does not take, fails here."""
    cfg = compose_config(f"+experiment={preset}", hydra_node=True)
    params = dict(cfg.hydra.sweeper.params or {})
    if preset.startswith("reference_"):  # one method as its reference trains it: a run, not a sweep
        assert not params, f"{preset} is a single-run preset but sweeps {sorted(params)}"
        check_config(cfg.method, "method")
        check_config(cfg.task, "task")
        return
    assert "method" in params, f"{preset} sweeps no methods"
    assert preset.endswith("_smoke") or f"{preset}_smoke" in PRESETS
    parser = OverridesParser.create()
    for key, values in params.items():
        override = parser.parse_override(f"{key}={values}")
        for value in override.sweep_string_iterator() if override.is_sweep_override() else [str(values)]:
            composed = compose_config(f"+experiment={preset}", f"{key}={value}")
            check_config(composed.method, "method")
            check_config(composed.task, "task")
