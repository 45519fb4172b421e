"""Run one kbench experiment (or a sweep with -m): python run.py method=selfparam task=synthetic"""
import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runners.experiment import Experiment, results_table


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    names = {group: hydra_cfg.runtime.choices.get(group) for group in ("model", "method", "task")}
    record = Experiment(cfg, hydra_cfg.runtime.output_dir, names=names).run()
    print(results_table([record]))
    print(f"record: {hydra_cfg.runtime.output_dir}/record.json")


if __name__ == "__main__":
    main()
