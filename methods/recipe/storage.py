"""RECIPE's trained module on disk: safetensors whose metadata says what it was trained for, so a file
trained for another model or other knobs is refused by name instead of loading garbage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from core.cache import Tensors, read_tensors
from core.io import note_input
from core.types import KBenchError

FORMAT = "kbench-recipe-2"  # bump when the saved module's layout changes


def module_file(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Tensors:
    """What a saved module holds: the module's state (the encoder's under `encoder.`) and `metadata` tagged
    with the format."""
    return tensors, {"format": FORMAT} | metadata


def split_module(path: str | Path, saved: Tensors, shapes: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(module tensors, encoder tensors) of a module read from `path`. Raises KBenchError when it is of
    another format or trained for other `shapes` (naming its model and encoder)."""
    tensors, metadata = saved
    if metadata.get("format") != FORMAT:
        raise KBenchError(f"{path} is not a kbench RECIPE module (format {metadata.get('format')!r}, expected {FORMAT})")
    if json.loads(metadata["shapes"]) != shapes:
        raise KBenchError(
            f"{path} was trained for {metadata['shapes']} (model {metadata.get('model')}, encoder "
            f"{metadata.get('encoder')}), but this run needs {json.dumps(shapes)}"
        )
    encoder = {n.removeprefix("encoder."): t for n, t in tensors.items() if n.startswith("encoder.")}
    return {n: t for n, t in tensors.items() if not n.startswith("encoder.")}, encoder


def read_module(path: str | Path) -> Tensors:
    """A saved module given as `method.checkpoint`; raises KBenchError when there is no file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KBenchError(f"method.checkpoint: no trained RECIPE module at {path}")
    note_input(path)  # a trained module read from disk is an input of the run, like its data
    return read_tensors(path)
