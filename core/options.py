"""Validation of config values against type hints, with messages that name the key and what it accepts.

Shared by `runners.build` (every config node, before the model loads) and by the code that receives
nested option groups (`core.training.WeightUpdate`), so a value is refused with the same message
whether it came from a YAML file, the command line or Python.
"""
from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable
from typing import Any

import pydantic

from core.types import KBenchError


class ConfigError(KBenchError, ValueError):
    """A config value has the wrong type, is out of bounds, or is an unknown key."""


def is_model(hint: Any) -> bool:
    return inspect.isclass(hint) and issubclass(hint, pydantic.BaseModel)


def checkable(hint: Any) -> bool:
    """Only hints built from builtins, typing constructs and pydantic option models are checked;
    plugin classes (an `LM`, a `SentenceSource`) are not: they are built, not read from config."""
    if is_model(hint):
        return True
    origin = typing.get_origin(hint)
    if origin is None:
        return hint in (int, float, str, bool, type(None), dict, list, Any)
    if origin is typing.Literal:
        return True
    if origin is typing.Annotated:
        return checkable(typing.get_args(hint)[0])  # the rest are bounds, not types
    return all(checkable(arg) for arg in typing.get_args(hint) if arg is not Ellipsis)


def checked(prefix: str) -> Callable:
    """Decorate a plugin's `__init__` so a direct call (tests, scripts, another plugin) checks its
    typed arguments exactly as `runners.build` checks config: the same bounds, `Literal`s and option
    models, and the same message naming `prefix.key`. Hand-written range checks are not needed."""

    def wrap(init: Callable) -> Callable:
        signature = inspect.signature(init)

        @functools.wraps(init)
        def checked_init(self, *args: Any, **kwargs: Any) -> None:
            hints = typing.get_type_hints(init, include_extras=True)
            for name, value in signature.bind(self, *args, **kwargs).arguments.items():
                parameter = signature.parameters[name]
                if name in hints and parameter.kind not in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL) \
                        and checkable(hints[name]):
                    validate(hints[name], value.model_dump() if isinstance(value, pydantic.BaseModel) else value,
                             f"{prefix}.{name}")
            init(self, *args, **kwargs)

        return checked_init

    return wrap


def as_dict(options: pydantic.BaseModel | dict[str, Any] | None) -> dict[str, Any]:
    """An option group as a plain dict, whether Hydra passed a dict or Python an options model."""
    return options.model_dump() if isinstance(options, pydantic.BaseModel) else dict(options or {})


def validate(hint: Any, value: Any, key: str) -> Any:
    """`value` validated against `hint` (a nested option model at any depth included); the first
    error raises `ConfigError` naming the full key (`method.update.lora.r`) and what it accepts."""
    # a string never silently becomes a number ("8" -> 8): OmegaConf already types what the CLI gives
    strict = isinstance(value, str) and hint is not str and not is_model(hint)
    try:
        return pydantic.TypeAdapter(hint).validate_python(value, strict=strict)
    except pydantic.ValidationError as err:
        raise ConfigError(_explain(hint, err.errors()[0], key)) from None


def _explain(hint: Any, error: dict[str, Any], key: str) -> str:
    """One pydantic error as `key.sub.key: what is wrong; what it accepts, got what`."""
    where, leaf, model = key, hint, None
    for part in error["loc"]:
        model = _model_of(leaf)
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            if isinstance(part, int):  # a list position
                where, leaf = f"{where}[{part}]", _item_hint(leaf)
                continue
            if model is None and _is_union(leaf):
                break  # pydantic's tag of one union member ("list[constrained-str]"): describe the whole union
            where = f"{where}.{part}"  # an unknown key of `model`
            break
        field = model.model_fields[part]
        where, leaf = f"{where}.{part}", typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    value = error.get("input")
    if error["type"] == "extra_forbidden":
        return f"{where}: unknown option; known options: {sorted(model.model_fields) if model else []}"
    if error["type"] == "missing":
        return f"{where}: required option missing"
    shown = f"{value!r} ({type(value).__name__})" if not isinstance(value, dict) else f"{value!r}"
    return f"{where}: expected {describe_hint(leaf)}, got {shown}"


def _model_of(hint: Any) -> type[pydantic.BaseModel] | None:
    if is_model(hint):
        return hint
    for arg in typing.get_args(hint):  # Optional[Model], Annotated[Model, ...]
        if is_model(arg):
            return arg
    return None


def _is_union(hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Annotated:
        return _is_union(typing.get_args(hint)[0])
    return origin in (typing.Union, types.UnionType)


def _item_hint(hint: Any) -> Any:
    """The hint of one item of a list hint, through Optional[...] and Annotated[...]."""
    while typing.get_origin(hint) is typing.Annotated or _is_union(hint):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) is typing.Annotated:
            hint = args[0]
        elif len(args) == 1:
            hint = args[0]
        else:
            return hint
    args = typing.get_args(hint)
    return args[0] if typing.get_origin(hint) in (list, tuple, set) and args else hint


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def describe_hint(hint: Any) -> str:
    """A hint as a user reads it: `int >= 1`, `one of 'lora', 'full'`, `float in [0, 1)`, `str or None`."""
    if is_model(hint):
        return f"an option group with keys {sorted(hint.model_fields)}"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is typing.Annotated:
        bounds = []
        for meta in args[1:]:
            for item in getattr(meta, "metadata", None) or [meta]:  # FieldInfo holds its bounds in .metadata
                for attr, sign in _BOUNDS.items():
                    if getattr(item, attr, None) is not None:
                        bounds.append(f"{sign} {getattr(item, attr)}")
                if getattr(item, "min_length", None):
                    if args[0] is str:
                        return "non-empty str" if item.min_length == 1 else f"str of at least {item.min_length} characters"
                    bounds.append(f"with at least {item.min_length} item(s)")
                if getattr(item, "max_length", None):
                    bounds.append(f"at most {item.max_length}")
        return " ".join([describe_hint(args[0]), " and ".join(bounds)]).strip()
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe_hint(a) for a in args)
    if hint is type(None):
        return "None"
    if origin in (list, tuple, set) and args:
        return f"a list of {describe_hint(args[0])}"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
