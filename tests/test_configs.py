"""Every config builds: a broken YAML fails here in seconds, not an hour into a sweep.

As lightning-hydra-template's tests/test_configs.py: every `conf/method/*` x `conf/task/*` pair composes
with `model=tiny` and passes the checks a run makes before loading anything (`runners.build.check_run`:
every value against its target's type hints, unknown keys refused); each method is then instantiated once
on one tiny LM, and each task once, with the project's own builder (`runners.build.build`). Nothing is
run. The YAMLs are listed when the tests are collected, so a config added by anyone is checked too.
A method built directly (`SelfParam(lm, sentences)` in a script) must be the method its YAML runs: each
class default equals the value its `conf/method/*.yaml` sets.

Configs that read `../shared` data (through `${oc.env:KBENCH_DATA,...}`) are built with KBENCH_DATA
pointing at the shared folder: missing it fails in CI and skips elsewhere (tests/conftest.py, shared_dir).
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from pydantic import BaseModel

from runners.build import _init_parameters, build, check_run
from tests.conftest import CONF, SHARED

METHODS = sorted(p.stem for p in (CONF / "method").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
BASE = ["model=tiny", "logger=none"]
DATA = SHARED / "data"  # what `${oc.env:KBENCH_DATA,../shared/data}` resolves to here


@pytest.fixture(scope="module")
def configs() -> Iterator[None]:
    """Hydra initialised once for the module (composing is then fast), with KBENCH_DATA at the shared data
    so a config's data paths do not depend on the folder pytest runs from."""
    previous = os.environ.get("KBENCH_DATA")
    os.environ["KBENCH_DATA"] = str(DATA)
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            yield
    finally:
        if previous is None:
            os.environ.pop("KBENCH_DATA", None)
        else:
            os.environ["KBENCH_DATA"] = previous


def composed(*overrides: str) -> DictConfig:
    return compose(config_name="config", overrides=[*BASE, *overrides])


def reads_shared_data(node: DictConfig) -> bool:
    """Whether a resolved config node names a file under the shared data folder."""
    return str(DATA) in json.dumps(OmegaConf.to_container(node, resolve=True), default=str)


@pytest.fixture(scope="module")
def lm(configs):
    """One tiny LM for every method (built as a run builds it); nothing is run, so they can share it."""
    return build(composed().model, "model")


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_and_task_compose_and_pass_the_run_checks(configs, method, task):
    check_run(composed(f"method={method}", f"task={task}"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_builds_on_the_tiny_model(configs, lm, method, request):
    cfg = composed(f"method={method}")
    if reads_shared_data(cfg.method):
        request.getfixturevalue("shared_dir")  # fails in CI, skips elsewhere, when the data is missing
    built = build(cfg.method, "method", lm=lm)
    assert built.lm is lm


@pytest.mark.parametrize("task", TASKS)
def test_every_task_builds(configs, task, request):
    cfg = composed(f"task={task}")
    if reads_shared_data(cfg.task):
        request.getfixturevalue("shared_dir")
    assert build(cfg.task, "task").steps  # a Task (its data is read when steps are asked for: not here)


def default_drift(value, default, key: str) -> list[str]:
    """Where a composed YAML value differs from a class default, as "key: yaml X, class Y" lines.
    Option groups (pydantic models, dicts) are compared key by key; values read from the environment
    (`${oc.env:...}`) and None defaults (resolved by the class itself) are not comparable and skipped."""
    if isinstance(default, BaseModel):
        default = default.model_dump()
    if isinstance(value, dict) and isinstance(default, dict):
        return [line for k, v in value.items() if k in default for line in default_drift(v, default[k], f"{key}.{k}")]
    if default is None or "${" in json.dumps(value, default=str):
        return []
    if isinstance(default, tuple):
        default = list(default)
    return [] if value == default else [f"{key}: yaml {value!r}, class {default!r}"]


@pytest.mark.parametrize("method", METHODS)
def test_a_method_built_directly_has_the_defaults_of_its_yaml(configs, method):
    node = OmegaConf.to_container(composed(f"method={method}").method, resolve=False)
    parameters, _ = _init_parameters(get_class(node["_target_"]))
    drift = [line for key, value in node.items()
             if key in parameters and parameters[key].default is not parameters[key].empty
             for line in default_drift(value, parameters[key].default, key)]
    assert not drift, f"conf/method/{method}.yaml and {node['_target_']} disagree: " + "; ".join(drift)
