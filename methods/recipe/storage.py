"""RECIPE's trained module on disk: safetensors whose metadata says what it was trained for, so a file
trained for another model or other knobs is refused by name instead of loading garbage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from core.io import atomic_write, note_input
from core.types import KBenchError

FORMAT = "kbench-recipe-2"  # bump when the saved module's layout changes


def save_module(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """Write `tensors` (the module's state, the encoder's under `encoder.`) with `metadata` and the format tag."""
    with atomic_write(path, suffix=".safetensors") as staging:
        save_file({n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}, str(staging),
                  metadata={"format": FORMAT} | metadata)


def load_module(path: str | Path, shapes: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(module tensors, encoder tensors, metadata) of a file written by `save_module`. Raises KBenchError when
    the file is missing, of another format, or trained for other `shapes` (naming its model and encoder)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KBenchError(f"method.checkpoint: no trained RECIPE module at {path}")
    note_input(path)  # a trained module read from disk is an input of the run, like its data
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise KBenchError(f"{path} is not a kbench RECIPE module (format {metadata.get('format')!r}, expected {FORMAT})")
    if json.loads(metadata["shapes"]) != shapes:
        raise KBenchError(
            f"{path} was trained for {metadata['shapes']} (model {metadata.get('model')}, encoder "
            f"{metadata.get('encoder')}), but this run needs {json.dumps(shapes)}"
        )
    tensors = load_file(str(path))
    encoder = {n.removeprefix("encoder."): t for n, t in tensors.items() if n.startswith("encoder.")}
    module = {n: t for n, t in tensors.items() if not n.startswith("encoder.")}
    return module, encoder, metadata
