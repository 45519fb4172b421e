"""Run one kbench experiment (or a sweep with -m): python run.py method=selfparam task=synthetic

A run whose config (run_id) already has a `done` record, in the folder this command writes to or under
`resume.search_dir`, is skipped if the files it read are unchanged: its folder gets a `record.json`
link to that record (`force=true` runs it again). An unfinished earlier attempt (killed, failed) is
continued after its last checkpointed step. A run holds its folder exclusively while it runs.
See docs/sweeps.md.
"""
import logging
import os
import sys
import threading
import time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

from core.environment import drift_message, version_drift
from core.records import git_commit
from core.types import KBenchError
from runners import resume
from runners.overrides import unknown_override
from runners.experiment import Experiment, results_table, run_identity

log = logging.getLogger("kbench")

# `${kbench_pid:}` in conf/config.yaml's default run and sweep folders: two launches in the same
# second get different folders (Hydra's ${now:} has second resolution). Cached, so every job of a
# sweep (joblib workers included: Hydra copies the resolver cache to each job's config) names the
# sweep folder after the launching process.
OmegaConf.register_new_resolver("kbench_pid", lambda: str(os.getpid()), use_cache=True, replace=True)


def say(message: str) -> None:
    """What the launch decided, for the user: Hydra's job logging shows it on the console (stdout) and
    keeps it in the job's run.log (and a SLURM / submitit job's log)."""
    log.info(message)


_WATCHED: set[int] = set()


def exit_with_parent() -> None:
    """joblib's workers (loky) outlive a SIGKILLed parent while a job runs: they only look for their
    parent between jobs, so each kept its model and computed for minutes. A daemon thread in the worker
    checks every second whether the launching process is gone (we were re-parented) and ends the worker
    at once: its record stays `running`, and the next launch continues it from its last checkpoint."""
    parent = os.getppid()
    if parent in _WATCHED or parent == 1:
        return
    _WATCHED.add(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(143)  # no clean-up: the run's files are already consistent after every write

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def parallel_jobs(hydra_cfg, multirun: bool) -> int:
    """How many jobs run at once on this machine: joblib's n_jobs in a joblib sweep (negative: counted from the cores, -1 = one per core),
    else 1. Recorded with the run's timings (`cost.shared_machine`), so timings of runs that shared the
    machine are not compared with those of runs that had it alone."""
    if not multirun or "joblib" not in str(hydra_cfg.launcher.get("_target_", "")):
        return 1
    n_jobs = int(hydra_cfg.launcher.get("n_jobs") or 1)
    return max((os.cpu_count() or 1) + 1 + n_jobs if n_jobs < 0 else n_jobs, 1)  # joblib: -1 = every core, -2 = all but one


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        launch(cfg)
    except KBenchError as error:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra reports the sweep's failed job; its record says why
        # a kbench error names the key, file:line or knob to fix: one line instead of Hydra's traceback
        sys.exit(f"{type(error).__name__}: {error}")


def launch(cfg: DictConfig) -> None:
    """One job: skip it if already done, continue an unfinished attempt, else run it; print its results."""
    hydra_cfg = HydraConfig.get()
    names = {group: hydra_cfg.runtime.choices.get(group) for group in ("model", "method", "task")}
    output_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun and "joblib" in str(hydra_cfg.launcher.get("_target_", "")):
        exit_with_parent()
    if multirun and "group" in (cfg.get("logger") or {}) and cfg.logger.group is None:
        with open_dict(cfg):
            cfg.logger.group = Path(hydra_cfg.sweep.dir).name  # W&B groups a sweep's runs

    if drift := drift_message(version_drift()):
        say(drift)  # the record lists the drift too (`version_drift`)
    run_id = run_identity(cfg)
    what = f"run {run_id} ({names['method']} / {names['task']} / seed {cfg.seed})"
    with resume.claim_folder(output_dir, run_id):
        # the folder this command writes to is always searched: a rerun finds its own records there
        own = Path(hydra_cfg.sweep.dir) if multirun else output_dir
        attempts = resume.earlier_attempts([own, cfg.resume.search_dir], run_id)
        if not cfg.force:
            for done in (a for a in attempts if a.done):
                changes = resume.input_changes(done.record)
                if changes:
                    say(f"not skipping {what}: its done record in {done.directory} read other inputs: "
                        f"{'; '.join(changes)}. Running it again.")
                    continue
                resume.link_record(done, output_dir)
                made_by, now = done.record.get("git_commit"), git_commit()
                stale = f"; it was computed by commit {made_by}, this is {now}" if made_by != now else ""
                say(f"skipped: {what} is already done in {done.directory}{stale} (force=true runs it again)")
                return
        resume_from = None
        if not cfg.force:
            unfinished = []
            for attempt in (a for a in attempts if not a.done):
                if attempt.directory.resolve() != output_dir.resolve() and resume.in_use(attempt.directory):
                    say(f"not continuing {attempt.directory}: that attempt of {what} is still running")
                elif changes := resume.input_changes(attempt.record):
                    say(f"not continuing {attempt.directory}: it read other inputs: {'; '.join(changes)}")
                else:
                    unfinished.append(attempt.directory)
            # the newest attempt with a checkpoint; else the record says it started over
            if unfinished:
                resume_from = next((d for d in unfinished if resume.latest_checkpoint(d, run_id)), unfinished[0])
                say(f"continuing {what} from {resume_from}")
        record = Experiment(cfg, output_dir, names=names, resume_from=resume_from,
                            parallel_jobs=parallel_jobs(hydra_cfg, multirun)).run()
    print(results_table([record]))
    say(f"record: {output_dir}/record.json")


if __name__ == "__main__":
    if message := unknown_override(sys.argv[1:], Path(__file__).parent / "conf"):
        sys.exit(f"ConfigError: {message}")  # before Hydra's "use +key" advice, which is wrong for a typo
    main()
