"""The one on-disk cache of things a method builds once and reuses across runs (generated sentences, sampled
texts, trained modules, key statistics): `$KBENCH_CACHE/<namespace>/<key>.<json|safetensors>`.

Entries are written atomically (`core.io.atomic_write`), so a run killed while writing leaves no half file
for the next one to trust; they are JSON or safetensors, never pickle, so reading one runs no code. A file a
run reads from the cache, or writes there for later runs to read, is noted as an input of the run
(`core.io.note_input`): deleting or editing a cache entry then shows in the record's input digests.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch

from core.io import atomic_write, atomic_write_json, cache_dir, note_input, read_json

log = logging.getLogger(__name__)

T = TypeVar("T")
Format = Literal["json", "safetensors"]
#: a safetensors entry: its tensors and the string metadata of its header
Tensors = tuple[dict[str, torch.Tensor], dict[str, str]]


def cache_entry(namespace: str, key: str, format: Format = "json") -> Path:
    """The path of entry `key` (a file stem: a hash, or a prefix and a hash) in `namespace`."""
    return cache_dir(namespace) / f"{key}.{format}"


def read_tensors(path: str | Path) -> Tensors:
    """(tensors on the CPU, header metadata) of a safetensors file."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    return load_file(str(path)), metadata


def write_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` (moved to the CPU, made contiguous) as safetensors with `metadata`, atomically."""
    from safetensors.torch import save_file

    with atomic_write(path, suffix=".safetensors") as staging:
        save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, str(staging), metadata=metadata)


def read_entry(path: Path, format: Format, what: str) -> Any:
    """The value stored at `path`: any JSON value, or `Tensors`."""
    return read_tensors(path) if format == "safetensors" else read_json(path, what)


def write_entry(path: Path, value: Any, format: Format) -> None:
    """Store `value` at `path` (`read_entry`'s inverse) and note it as an input of the run."""
    if format == "safetensors":
        write_tensors(path, *value)
    else:
        atomic_write_json(path, value)
    note_input(path)  # what later runs read from the cache: part of this run's inputs too


def disk_cached(namespace: str, key: str, build: Callable[[], T], *, what: str, format: Format = "json",
                valid: Callable[[Any], bool] | None = None, enabled: bool = True) -> T:
    """The value of entry `key` in `namespace`: read when it exists (and `valid(value)`), else `build()`,
    stored, and returned. `what` names the entry in messages ("a cached JSON list of sentences"). An
    entry that fails `valid` (edited or cut short by hand) is logged and built again, never trusted.
    With `enabled=False` nothing is read or written (a method's `cache=false`).

    JSON values come back as JSON would (tuples as lists); `format="safetensors"` stores `Tensors`."""
    path = cache_entry(namespace, key, format)
    if enabled and path.is_file():
        value = read_entry(path, format, what)
        if valid is None or valid(value):
            note_input(path)
            return value
        log.warning("%s is not %s; building it again", path, what)
    value = build()
    if enabled:
        write_entry(path, value, format)
    return value


def text_list(value: Any, non_empty: bool = False) -> bool:
    """True for a list of strings (each with non-space text, and at least one, when `non_empty`): the
    `valid` check of cached generated texts."""
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        return False
    return not non_empty or (bool(value) and all(v.strip() for v in value))
