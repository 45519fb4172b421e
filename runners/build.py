"""Build plugins from config with `hydra.utils.instantiate`, checking values against the target's type hints.

OmegaConf accepts `task.n_contexts=abc` for an untyped YAML node; the plugin would fail much later
with an obscure message. Before instantiating, every config value whose parameter carries a plain type
hint (int, float, str, bool, lists/dicts/optionals of those, Literal) is validated with pydantic, and
a mismatch raises `ConfigError` naming the key, the expected type and the value given.
"""
from __future__ import annotations

import inspect
import typing
from typing import Any

import pydantic
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from core.types import KBenchError


class ConfigError(KBenchError):
    """A config value has the wrong type or an unknown key."""


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
    return params, True


def _hints(target: Any) -> dict[str, Any]:
    functions = [k.__init__ for k in target.__mro__ if "__init__" in vars(k)] if inspect.isclass(target) else [target]
    hints: dict[str, Any] = {}
    for function in reversed(functions):
        try:
            hints |= typing.get_type_hints(function)
        except Exception:  # unresolvable forward references: skip checking those parameters
            continue
    return hints


def _checkable(hint: Any) -> bool:
    """Only hints built from builtins and typing constructs are checked; plugin classes are not."""
    origin = typing.get_origin(hint)
    if origin is None:
        return hint in (int, float, str, bool, type(None), dict, list, Any)
    if origin is typing.Literal:
        return True
    return all(_checkable(arg) for arg in typing.get_args(hint) if arg is not Ellipsis)


def check_config(node: DictConfig, key: str) -> None:
    """Raise `ConfigError` if a value in `node` does not fit the type hint of its target's parameter."""
    if "_target_" not in node:
        return
    target = get_object(node._target_)
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
            known = sorted(n for n, p in params.items() if p.kind is p.POSITIONAL_OR_KEYWORD or p.kind is p.KEYWORD_ONLY)
            raise ConfigError(f"{key}.{name}: unknown option for {node._target_}; known options: {known}")
        hint = hints.get(name)
        if hint is None or not _checkable(hint):
            continue
        plain = OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value
        try:
            pydantic.TypeAdapter(hint).validate_python(plain, strict=isinstance(plain, str) and hint is not str)
        except pydantic.ValidationError:
            raise ConfigError(
                f"{key}.{name}: expected {_describe(hint)}, got {plain!r} ({type(plain).__name__})"
            ) from None


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build(node: DictConfig, key: str, **runtime: Any) -> Any:
    """Check then instantiate a `_target_` node; plain Python containers are passed to the target."""
    check_config(node, key)
    return instantiate(node, _convert_="all", **runtime)
