"""Build plugins from config with `hydra.utils.instantiate`, checking values against the target's type hints.

OmegaConf accepts `task.n_contexts=abc` for an untyped YAML node; the plugin would fail much later
with an obscure message. Before instantiating (and, through `check_config`, before the model loads),
every config value whose parameter carries a checkable type hint is validated with pydantic: plain
types (int, float, str, bool, lists/dicts/optionals of those), `Literal`, bounded types
(`Annotated[int, Field(ge=1)]`, `pydantic.PositiveInt`, ...) and nested option groups declared as
pydantic models (`update: UpdateOptions`), whose unknown keys are refused at every depth. A mismatch
raises `ConfigError` naming the full key, what it accepts and the value given.
"""
from __future__ import annotations

import inspect
import typing
from typing import Any

import pydantic
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from core.types import KBenchError, Options
from core.options import ConfigError, checkable, describe_hint, is_model, validate  # noqa: F401 (ConfigError: re-exported)


def kbench_cause(err: Exception) -> KBenchError | None:
    """The kbench error Hydra wrapped (in one or more InstantiationException / ImportError layers), if any."""
    cause = err.__cause__
    while isinstance(cause, (InstantiationException, ImportError)):
        cause = cause.__cause__
    return cause if isinstance(cause, KBenchError) else None


#: what the runner passes to `build` itself (`build(cfg.method, "method", lm=lm)`): never a config option
RUNTIME_ARGUMENTS = frozenset({"lm"})


def _init_parameters(target: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """Named parameters of a function or class __init__ (following **kwargs up the MRO), and whether
    the target still accepts arbitrary keywords after that (then unknown keys cannot be flagged)."""
    if not inspect.isclass(target):
        signature = inspect.signature(target).parameters
        return dict(signature), any(p.kind is p.VAR_KEYWORD for p in signature.values())
    params: dict[str, inspect.Parameter] = {}
    for klass in target.__mro__:
        if "__init__" not in vars(klass) or klass is object:
            continue
        signature = inspect.signature(klass.__init__).parameters
        params = {k: v for k, v in signature.items() if k != "self" and v.kind is not v.VAR_KEYWORD} | params
        if not any(p.kind is p.VAR_KEYWORD for p in signature.values()):
            return params, False
    # every __init__ passed **kwargs on (then anything may be accepted), or there was none but object's,
    # which takes no options: `+method.sentences.n=3` on TaskSentences must not be ignored
    return params, bool(params) or any("__init__" in vars(k) for k in target.__mro__ if k is not object)


def _hints(target: Any) -> dict[str, Any]:
    functions = [k.__init__ for k in target.__mro__ if "__init__" in vars(k)] if inspect.isclass(target) else [target]
    hints: dict[str, Any] = {}
    for function in reversed(functions):
        try:
            # include_extras keeps Annotated bounds (ge=1, ...), which get_type_hints strips by default
            hints |= typing.get_type_hints(function, include_extras=True)
        except Exception:  # unresolvable forward references: skip checking those parameters
            continue
    return hints


def check_config(node: DictConfig, key: str) -> None:
    """Raise `ConfigError` if a value in `node` does not fit the type hint of its target's parameter."""
    if "_target_" not in node:
        return
    try:
        target = get_object(node._target_)
    except ImportError as err:
        # Hydra reports any error raised while importing the target's module as "Are you sure that module
        # ... is installed?"; a kbench error there (a plugin written to an old guide) says what to change
        if (cause := kbench_cause(err)) is not None:
            raise cause from None
        raise
    params, accepts_any = _init_parameters(target)
    hints = _hints(target)
    for name in node:
        if name.startswith("_"):
            continue
        value = node[name]
        if isinstance(value, DictConfig) and "_target_" in value:
            check_config(value, f"{key}.{name}")
            continue
        if name not in params:
            if accepts_any:
                continue
            known = sorted(n for n, p in params.items() if n not in RUNTIME_ARGUMENTS
                           and (p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY))
            raise ConfigError(f"{key}.{name}: unknown option for {node._target_}; known options: {known}")
        hint = hints.get(name)
        if hint is None or not checkable(hint):
            continue
        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        validate(hint, plain, f"{key}.{name}")


class ResumeOptions(Options):
    """`resume`: conf/config.yaml documents each key."""

    search_dir: str | None = "outputs"
    checkpoint: bool = True
    keep_checkpoints: bool = False


def check_run(cfg: DictConfig) -> None:
    """Everything a run reads from config, at every depth, before any data or model is loaded: the
    model / method / task nodes against their targets, and the plain top-level options (a `+resume.x`
    added with Hydra's `+` would otherwise be accepted and ignored)."""
    for group in ("model", "method", "task"):
        check_config(cfg[group], group)
    validate(int, cfg.get("seed", 0), "seed")
    validate(bool, cfg.get("force", False), "force")
    if cfg.get("resume") is not None:
        validate(ResumeOptions, OmegaConf.to_container(cfg.resume, resolve=True), "resume")


def build(node: DictConfig, key: str, **runtime: Any) -> Any:
    """Check then instantiate a `_target_` node; plain Python containers are passed to the target."""
    check_config(node, key)
    try:
        return instantiate(node, _convert_="all", **runtime)
    except InstantiationException as err:
        # Hydra wraps what a constructor raises in "Error in call to target ...: ConfigError('...')";
        # a kbench error already says what is wrong and where (key, file:line): pass it on unwrapped.
        if (cause := kbench_cause(err)) is not None:
            raise cause from None
        raise
