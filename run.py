"""Run one kbench experiment (or a sweep with -m): python run.py method=selfparam task=synthetic

A run whose config (run_id) already has a `done` record under `resume.search_dir` is skipped: its
folder gets a `record.json` link to that record (`force=true` runs it again). An unfinished earlier
attempt (killed, failed) is continued after its last checkpointed step. See docs/sweeps.md.
"""
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from core.records import git_commit
from runners import resume
from runners.experiment import Experiment, results_table, run_identity


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    names = {group: hydra_cfg.runtime.choices.get(group) for group in ("model", "method", "task")}
    output_dir = Path(hydra_cfg.runtime.output_dir)
    if hydra_cfg.mode == RunMode.MULTIRUN and "group" in (cfg.get("logger") or {}) and cfg.logger.group is None:
        with open_dict(cfg):
            cfg.logger.group = Path(hydra_cfg.sweep.dir).name  # W&B groups a sweep's runs

    run_id = run_identity(cfg)
    attempts = resume.earlier_attempts(cfg.resume.search_dir, run_id)
    done = next((a for a in attempts if a.done), None)
    if done is not None and not cfg.force:
        resume.link_record(done, output_dir)
        made_by, now = done.record.get("git_commit"), git_commit()
        stale = f"; it was computed by commit {made_by}, this is {now}" if made_by != now else ""
        print(f"skipped: run {run_id} ({names['method']} / {names['task']} / seed {cfg.seed}) is already done in "
              f"{done.directory}{stale} (force=true runs it again)")
        return
    resume_from = None
    unfinished = [a.directory for a in attempts if not a.done]
    if unfinished and not cfg.force:  # the newest attempt with a checkpoint; else the record says it started over
        resume_from = next((d for d in unfinished if resume.latest_checkpoint(d, run_id)), unfinished[0])
    record = Experiment(cfg, output_dir, names=names, resume_from=resume_from).run()
    print(results_table([record]))
    print(f"record: {output_dir}/record.json")


if __name__ == "__main__":
    main()
