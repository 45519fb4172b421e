"""Cost columns (issue 20 item 3): every method's run records the same cost keys, measured the same way."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from run import parallel_jobs
from runners.experiment import Experiment
from tests.conftest import CONF, compose_config, read_record

SLOW = {"memoir", "recipe", "selfparam", "ft_sentences"}  # one to four minutes each on two shared cores
METHODS = [pytest.param(m, marks=pytest.mark.slow) if m in SLOW else m
           for m in sorted(p.stem for p in (CONF / "method").glob("*.yaml"))]
COST_KEYS = {"inject_seconds_per_item", "items_injected", "answer_seconds_per_query", "queries", "peak_rss_bytes",
             "peak_rss_scope", "extra_storage_bytes", "parallel_jobs", "max_load_average", "cpu_count", "torch_threads",
             "shared_machine"}


@pytest.mark.parametrize("method", METHODS)
def test_every_method_records_its_cost_on_the_tiny_model(method, tmp_path: Path):
    # one paragraph of 4 facts, single mode: one item injected, its 4 questions asked once
    cfg = compose_config("model=tiny", "logger=none", f"method={method}", "task.n_contexts=1")
    Experiment(cfg, tmp_path, names={"method": method, "task": "synthetic", "model": "tiny"}).run()
    record = read_record(tmp_path)
    assert record["status"] == "done", record["error"]
    cost = record["cost"]
    assert COST_KEYS <= set(cost), set(cost)
    assert (cost["items_injected"], cost["queries"]) == (1, 4)
    # the timed parts lie within the run's own inject / eval totals
    assert 0 <= cost["inject_seconds_per_item"] <= record["timings"]["inject"] + 1e-3
    assert 0 < cost["answer_seconds_per_query"] * 4 <= record["timings"]["eval"] + 1e-3
    assert cost["peak_rss_bytes"] > 50_000_000 and cost["peak_rss_scope"] in ("run", "process")
    assert cost["extra_storage_bytes"] == record["extra_storage_bytes"]
    # one job: the machine counts as shared only when the load sampled during the run said so
    assert cost["parallel_jobs"] == 1 and cost["max_load_average"] >= 0
    assert cost["torch_threads"] >= 1
    assert cost["shared_machine"] == (cost["max_load_average"] > cost["torch_threads"] + 0.5 * cost["cpu_count"])


def test_a_busy_machine_is_shared_even_with_one_job():
    from core.cost import machine_shared

    assert machine_shared(1, 2.9, cpus=2) is False
    assert machine_shared(1, None, cpus=2) is None  # no load sampled: unknown, never "alone"
    assert machine_shared(1, 3.1, cpus=2)      # more runnable threads than the run's own can account for
    assert machine_shared(2, 0.0, cpus=2)      # the launcher ran two jobs at once
    # a run on one torch thread accounts for one runnable thread: a second busy one is other work
    assert machine_shared(1, 1.4, cpus=2, threads=1) is False
    assert machine_shared(1, 2.1, cpus=2, threads=1)


def test_a_joblib_sweep_with_several_jobs_shares_the_machine():
    def hydra(target: str, n_jobs: int | None = None):
        return OmegaConf.create({"launcher": {"_target_": target} | ({"n_jobs": n_jobs} if n_jobs is not None else {})})

    joblib = "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert parallel_jobs(hydra(joblib, 2), multirun=True) == 2
    assert parallel_jobs(hydra(joblib, 1), multirun=True) == 1
    assert parallel_jobs(hydra(joblib, 2), multirun=False) == 1  # a single run is one job
    assert parallel_jobs(hydra("hydra._internal.core_plugins.basic_launcher.BasicLauncher"), multirun=True) == 1
    assert parallel_jobs(hydra(joblib, -1), multirun=True) >= 1


def test_the_load_monitor_catches_competing_work_between_step_boundaries(monkeypatch):
    """A burst of other work inside one long step (between the samples a run takes at its step
    boundaries) must still mark the run as shared."""
    import itertools
    import time

    import core.cost as cost

    # the OS's load average, as another job starts and ends inside a step: 0.9 at the step's start, 3.6 while
    # both run, 1.0 again at the step's end
    readings = itertools.chain([0.9], itertools.repeat(3.6, 3), itertools.repeat(1.0))
    monkeypatch.setattr(cost, "load_average", lambda: next(readings))
    monitor = cost.LoadMonitor(interval=0.01)
    with monitor:
        time.sleep(0.2)
    assert monitor.max == 3.6
    assert cost.machine_shared(1, monitor.max, cpus=2) is True
