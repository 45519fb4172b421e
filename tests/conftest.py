"""Shared fixtures: config composition in-process, the tiny model, the shared data folder, run helpers."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
SHARED = Path(os.environ.get("KBENCH_SHARED", ROOT.parent / "shared"))
# configs find shared data through ${oc.env:KBENCH_DATA,../shared/data}, relative to the working folder: point
# them at the folder the tests use, so a checkout elsewhere (KBENCH_SHARED set) reads the same files
os.environ.setdefault("KBENCH_DATA", str(SHARED / "data"))

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_report_header(config) -> list[str]:
    """The environment against the lock, first thing in the run (docs: README, "Dependencies")."""
    from core.environment import drift_message, version_drift

    message = drift_message(version_drift())
    return [message] if message else ["kbench: installed versions match requirements.lock"]


def pytest_terminal_summary(terminalreporter) -> None:
    """Repeat a drift at the end, where a failure is read, so it is not taken for a kbench bug."""
    from core.environment import drift_message, version_drift

    message = drift_message(version_drift())
    if message:
        terminalreporter.write_line(message, yellow=True, bold=True)


def compose_config(*overrides: str, hydra_node: bool = False) -> DictConfig:
    """The config `run.py` would see for these overrides (`hydra_node`: keep Hydra's own node)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_node)


@pytest.fixture(scope="session")
def tiny_lm_factory():
    """Builds a fresh tiny LM (same weights every time: seeded, cached on disk)."""
    from core.models import tiny_lm

    return tiny_lm


@pytest.fixture()
def tiny_lm(tiny_lm_factory):
    return tiny_lm_factory()


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """`../shared`: real data. Missing it is a failure in CI (never a silent skip), a skip elsewhere."""
    if not SHARED.is_dir():
        message = f"the shared data folder is missing: expected it at {SHARED} (set KBENCH_SHARED to its path)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return SHARED


def run_cli(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run `python run.py ARGS` as a user would (`env` values of None unset a variable)."""
    merged = os.environ | {"TQDM_DISABLE": "1", "HYDRA_FULL_ERROR": "0"} | (env or {})
    environment = {k: v for k, v in merged.items() if v is not None}
    if not any(arg.startswith("resume.search_dir=") for arg in args):
        args = (*args, "resume.search_dir=null")  # never skip or resume a test run because of records in outputs/
    return subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=timeout,
    )


def read_record(run_dir: Path) -> dict:
    return json.loads((run_dir / "record.json").read_text())
