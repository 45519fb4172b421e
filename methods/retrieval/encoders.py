"""Text encoders of dense retrieval: questions and passages to vectors (sentence-transformers, DPR)."""
from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from core.progress import progress
from core.types import KBenchError


class TextEncoder:
    """Maps questions and passages to float32 vectors of size `dim` (unit length if `normalize`)."""

    name: str
    dim: int

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        raise NotImplementedError


def _encode_in_batches(encode, texts: Sequence[str], batch_size: int, desc: str) -> np.ndarray:
    """Call `encode` on slices of `texts` under a progress bar (long stores take minutes on CPU)."""
    block = batch_size * 16
    starts = range(0, len(texts), block)
    parts = [encode(list(texts[s : s + block])) for s in progress(starts, desc=desc, total=len(starts))]
    return np.concatenate(parts).astype(np.float32) if parts else np.zeros((0, 0), dtype=np.float32)


@functools.lru_cache(maxsize=2)
def _sentence_model(name_or_path: str, device: str):
    """Loaded once per process: methods are rebuilt per run of a sweep, and the weights never change."""
    from core.encoder import load_sentence_encoder

    return load_sentence_encoder(name_or_path, device=device)


class SentenceEncoder(TextEncoder):
    """Any sentence-transformers model by path; `embedded:all-minilm-l6-v2` loads offline (core.encoder)."""

    def __init__(self, name_or_path: str, normalize: bool = True, batch_size: int = 64, device: str = "cpu") -> None:
        self.name, self.normalize, self.batch_size = name_or_path, normalize, batch_size
        self.model = _sentence_model(name_or_path, device)
        dimension = getattr(self.model, "get_embedding_dimension", None) or self.model.get_sentence_embedding_dimension
        self.dim = int(dimension())

    def _encode(self, texts: list[str]) -> np.ndarray:
        return self.model.encode(texts, batch_size=self.batch_size, normalize_embeddings=self.normalize,
                                 convert_to_numpy=True, show_progress_bar=False)

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        return _encode_in_batches(self._encode, texts, self.batch_size, "encode queries").reshape(-1, self.dim)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        return _encode_in_batches(self._encode, texts, self.batch_size, "encode passages").reshape(-1, self.dim)


class DprEncoder(TextEncoder):
    """DPR proper: `DPRQuestionEncoder` for questions, `DPRContextEncoder` for passages (their pooled
    [CLS] output), each from a local folder holding the model and its tokenizer."""

    def __init__(self, question_encoder: str, context_encoder: str, normalize: bool = True, batch_size: int = 64,
                 device: str = "cpu", max_length: int = 512) -> None:
        from transformers import AutoTokenizer, DPRContextEncoder, DPRQuestionEncoder

        for role, path in (("dpr_question_encoder", question_encoder), ("dpr_context_encoder", context_encoder)):
            if not path or not Path(path).expanduser().is_dir():
                raise KBenchError(f"method.{role}: DPR needs a local model folder, got {path!r}")
        self.name = f"dpr:{question_encoder}|{context_encoder}"
        self.normalize, self.batch_size, self.device, self.max_length = normalize, batch_size, device, max_length
        from core.models import _weight_files  # safetensors only, as for models: a pickle can run code

        for path in (question_encoder, context_encoder):
            _weight_files(Path(path).expanduser(), False, f"DPR encoder {path}")
        load = dict(local_files_only=True)
        weights = dict(use_safetensors=True)
        self.question_model = DPRQuestionEncoder.from_pretrained(question_encoder, **load, **weights).to(device).eval()
        self.context_model = DPRContextEncoder.from_pretrained(context_encoder, **load, **weights).to(device).eval()
        self.question_tokenizer = AutoTokenizer.from_pretrained(question_encoder, **load)
        self.context_tokenizer = AutoTokenizer.from_pretrained(context_encoder, **load)
        self.dim = int(self.question_model.config.hidden_size)

    def _encoder(self, model, tokenizer):
        import torch

        @torch.inference_mode()
        def encode(texts: list[str]) -> np.ndarray:
            out = []
            for s in range(0, len(texts), self.batch_size):
                batch = tokenizer(texts[s : s + self.batch_size], padding=True, truncation=True,
                                  max_length=self.max_length, return_tensors="pt").to(self.device)
                vectors = model(**batch).pooler_output.float()
                if self.normalize:
                    vectors = torch.nn.functional.normalize(vectors, dim=-1)
                out.append(vectors.cpu().numpy())
            return np.concatenate(out)

        return encode

    def encode_queries(self, texts: Sequence[str]) -> np.ndarray:
        encode = self._encoder(self.question_model, self.question_tokenizer)
        return _encode_in_batches(encode, texts, self.batch_size, "encode queries").reshape(-1, self.dim)

    def encode_passages(self, texts: Sequence[str]) -> np.ndarray:
        encode = self._encoder(self.context_model, self.context_tokenizer)
        return _encode_in_batches(encode, texts, self.batch_size, "encode passages").reshape(-1, self.dim)
