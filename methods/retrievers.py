"""The retrieval machinery behind `methods/rag.py`: chunking, BM25 indexes, sentence encoders, faiss indexes.

Every index grows with `add`, answers `search(query, k) -> (row ids, scores)` best first, reports the
bytes it would save (`nbytes`, measured from the arrays / faiss's own serialisation) and saves to /
loads from a folder without pickles (npz + JSON, `faiss.write_index`).

BM25 (Okapi, as `rank_bm25.BM25Okapi` computes it) for query tokens q and a passage D:
    score(D, q) = Σ_{t ∈ q} idf(t) · f(t, D) · (k1 + 1) / (f(t, D) + k1 · (1 − b + b · |D| / avgdl))
    idf(t) = ln(N − n(t) + 0.5) − ln(n(t) + 0.5), floored at ε · mean_t idf(t) where negative
(f: term count in D, n(t): passages containing t, N: passages, avgdl: mean passage length in tokens;
a query token repeated counts twice). Two interchangeable backends:
- `rank_bm25`: the reference library. It scores every passage in a Python loop and its index cannot
  be extended, so it is rebuilt (O(store)) at the first search after each `add`.
- `sparse`: the same formula over a term-count matrix. Passages are appended as new CSC segments and
  segments of similar size are merged (a binary counter, as in log-structured indexes), so a run that
  adds passages one by one costs O(n log n) in total rather than O(n²); document frequencies and
  lengths are kept as running counts, and idf / avgdl are recomputed from them when the store changed,
  so scores always equal a from-scratch rebuild. A query touches only its terms' columns.
"""
from __future__ import annotations

import functools
import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from core.progress import progress
from core.types import KBenchError

# ---------------------------------------------------------------------------------------------- chunking


def chunk_spans(n_tokens: int, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows [start, end) of at most `chunk_tokens` covering `n_tokens`, consecutive windows
    sharing `overlap` tokens; one window when it all fits (`chunk_tokens` 0 = never split)."""
    if chunk_tokens < 0 or overlap < 0 or (chunk_tokens and overlap >= chunk_tokens):
        raise ValueError(f"need chunk_tokens >= 0 and 0 <= chunk_overlap < chunk_tokens, got {chunk_tokens}, {overlap}")
    if chunk_tokens == 0 or n_tokens <= chunk_tokens:
        return [(0, n_tokens)]
    stride, spans = chunk_tokens - overlap, []
    for start in range(0, n_tokens, stride):
        spans.append((start, min(start + chunk_tokens, n_tokens)))
        if start + chunk_tokens >= n_tokens:
            break
    return spans


# ---------------------------------------------------------------------------------------------- top-k


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores, best first; ties go to the lower index (the earlier passage)."""
    k = min(k, len(scores))
    if k <= 0:
        return np.zeros(0, dtype=np.int64)
    threshold = np.partition(scores, len(scores) - k)[len(scores) - k]
    candidates = np.flatnonzero(scores >= threshold)
    order = np.lexsort((candidates, -scores[candidates]))
    return candidates[order[:k]]


# ---------------------------------------------------------------------------------------------- BM25

WORD = re.compile(r"\w+")


def stopword_list(stopwords: str | Sequence[str] | None) -> frozenset[str]:
    """`english`: bm25s's English list; a list: those words; `none` / null / []: keep every word."""
    if stopwords is None or (isinstance(stopwords, str) and stopwords.lower() == "none"):
        return frozenset()
    if isinstance(stopwords, str):
        if stopwords.lower() != "english":
            raise ValueError(f"method.stopwords must be 'english', 'none' or a list of words, got {stopwords!r}")
        from bm25s.stopwords import STOPWORDS_EN

        return frozenset(STOPWORDS_EN)
    return frozenset(word.lower() for word in stopwords)


class WordTokenizer:
    """BM25's tokeniser: lowercase, split into Unicode word characters (`\\w+`), drop stop words."""

    def __init__(self, stopwords: str | Sequence[str] | None = "english") -> None:
        self.stopwords = stopword_list(stopwords)

    def __call__(self, text: str) -> list[str]:
        return [word for word in WORD.findall(text.lower()) if word not in self.stopwords]

    def describe(self) -> dict[str, Any]:
        return {"rule": "lowercase, \\w+ words", "stopwords": sorted(self.stopwords)}


class _GrowingArray:
    """A 1-d numpy array with amortised O(1) appends (capacity doubles)."""

    def __init__(self, dtype: Any) -> None:
        self._data = np.zeros(16, dtype=dtype)
        self.size = 0

    def _reserve(self, size: int) -> None:
        if size > len(self._data):
            grown = np.zeros(max(size, 2 * len(self._data)), dtype=self._data.dtype)
            grown[: self.size] = self._data[: self.size]
            self._data = grown

    def extend(self, values: np.ndarray) -> None:
        self._reserve(self.size + len(values))
        self._data[self.size : self.size + len(values)] = values
        self.size += len(values)

    def grow_to(self, length: int) -> None:
        """New entries up to `length` start at 0."""
        self._reserve(length)
        self.size = max(self.size, length)

    @property
    def values(self) -> np.ndarray:
        return self._data[: self.size]


class Bm25Index:
    """Shared bookkeeping of the BM25 backends: knobs, passage count, saving the tokenised store."""

    backend = "bm25"

    def __init__(self, k1: float = 1.5, b: float = 0.75, epsilon: float = 0.25) -> None:
        if k1 < 0 or not 0 <= b <= 1:
            raise ValueError(f"BM25 needs k1 >= 0 and 0 <= b <= 1, got k1={k1}, b={b}")
        self.k1, self.b, self.epsilon = k1, b, epsilon

    def __len__(self) -> int:
        raise NotImplementedError

    def add(self, documents: Sequence[Sequence[str]]) -> None:
        raise NotImplementedError

    def scores(self, query: Sequence[str]) -> np.ndarray:
        raise NotImplementedError

    def search(self, query: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if len(self) == 0:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        scores = self.scores(query)
        ids = top_k(scores, k)
        return ids, scores[ids]

    def nbytes(self) -> int:
        return 0

    def save(self, folder: Path) -> None:
        """Write what a `load` needs beside the passages' text (nothing by default: rebuilt from it)."""

    def load(self, folder: Path, documents: Sequence[Sequence[str]]) -> None:
        self.add(documents)


class RankBm25Index(Bm25Index):
    """The reference: `rank_bm25.BM25Okapi`, rebuilt lazily after additions. It saves nothing of its
    own (its index is rebuilt from the passages on load), so its `nbytes` is 0."""

    backend = "rank_bm25"

    def __init__(self, **knobs: float) -> None:
        super().__init__(**knobs)
        self.documents: list[list[str]] = []
        self._bm25 = None

    def __len__(self) -> int:
        return len(self.documents)

    def add(self, documents: Sequence[Sequence[str]]) -> None:
        self.documents += [list(d) for d in documents]
        self._bm25 = None

    def scores(self, query: Sequence[str]) -> np.ndarray:
        from rank_bm25 import BM25Okapi

        if self._bm25 is None:
            if not any(self.documents):  # rank_bm25 divides by the mean length
                return np.zeros(len(self.documents))
            self._bm25 = BM25Okapi(self.documents, k1=self.k1, b=self.b, epsilon=self.epsilon)
        return np.asarray(self._bm25.get_scores(list(query)), dtype=np.float64)


class SparseBm25Index(Bm25Index):
    """BM25Okapi over term-count matrices in merged segments (see the module docstring)."""

    backend = "sparse"

    def __init__(self, **knobs: float) -> None:
        super().__init__(**knobs)
        self.vocabulary: dict[str, int] = {}
        self.terms: list[str] = []
        self.document_frequency = _GrowingArray(np.int64)
        self.lengths = _GrowingArray(np.int64)
        self.segments: list[tuple[int, sp.csc_matrix]] = []  # (first passage row, passages x terms counts)
        self._vocabulary_bytes = 0
        self._idf: np.ndarray | None = None

    def __len__(self) -> int:
        return self.lengths.size

    def add(self, documents: Sequence[Sequence[str]]) -> None:
        if not documents:
            return
        rows, cols, counts = [], [], []
        for row, document in enumerate(documents):
            for term, count in Counter(document).items():
                column = self.vocabulary.get(term)
                if column is None:
                    column = self.vocabulary[term] = len(self.terms)
                    self.terms.append(term)
                    self._vocabulary_bytes += len(json.dumps(term, ensure_ascii=False).encode()) + 1
                rows.append(row)
                cols.append(column)
                counts.append(count)
        cols_array = np.asarray(cols, dtype=np.int64)
        segment = sp.csc_matrix(
            (np.asarray(counts, dtype=np.int32), (np.asarray(rows, dtype=np.int64), cols_array)),
            shape=(len(documents), len(self.terms)),
        )
        start = len(self)
        self.lengths.extend(np.fromiter((len(d) for d in documents), dtype=np.int64, count=len(documents)))
        # each (passage, term) pair occurs once in `cols`, so counting columns counts passages per term
        self.document_frequency.grow_to(len(self.terms))
        self.document_frequency.values[:] += np.bincount(cols_array, minlength=len(self.terms))
        self.segments.append((start, segment))
        self._merge_segments()
        self._idf = None

    def _merge_segments(self) -> None:
        while len(self.segments) >= 2 and self.segments[-2][1].shape[0] <= self.segments[-1][1].shape[0]:
            (start, older), (_, newer) = self.segments[-2], self.segments.pop()
            older, newer = older.copy(), newer.copy()
            older.resize((older.shape[0], len(self.terms)))
            newer.resize((newer.shape[0], len(self.terms)))
            self.segments[-1] = (start, sp.vstack([older, newer], format="csc"))

    def idf(self) -> np.ndarray:
        if self._idf is None:
            frequency = self.document_frequency.values.astype(np.float64)
            idf = np.log(len(self) - frequency + 0.5) - np.log(frequency + 0.5)
            floor = self.epsilon * idf.mean() if len(idf) else 0.0
            self._idf = np.where(idf < 0, floor, idf)
        return self._idf

    def scores(self, query: Sequence[str]) -> np.ndarray:
        scores = np.zeros(len(self))
        total_length = self.lengths.values.sum()
        known = Counter(self.vocabulary[t] for t in query if t in self.vocabulary)
        if not known or total_length == 0:
            return scores
        columns = np.fromiter(known.keys(), dtype=np.int64)
        weights = self.idf()[columns] * np.fromiter(known.values(), dtype=np.float64)
        norm = self.k1 * (1 - self.b + self.b * self.lengths.values / (total_length / len(self)))
        for start, segment in self.segments:
            present = columns < segment.shape[1]
            if not present.any():
                continue
            sub = segment[:, columns[present]]
            tf = sub.data.astype(np.float64)
            rows = sub.indices
            term_weight = np.repeat(weights[present], np.diff(sub.indptr))
            contribution = term_weight * tf * (self.k1 + 1) / (tf + norm[start + rows])
            scores[start : start + segment.shape[0]] += np.bincount(rows, contribution, minlength=segment.shape[0])
        return scores

    def matrix(self) -> sp.csc_matrix:
        """All segments as one passages x terms count matrix."""
        parts = []
        for _, segment in self.segments:
            segment = segment.copy()
            segment.resize((segment.shape[0], len(self.terms)))
            parts.append(segment)
        return sp.vstack(parts, format="csc") if parts else sp.csc_matrix((0, len(self.terms)), dtype=np.int32)

    def nbytes(self) -> int:
        """The arrays the index holds (and saves as they are): segments, document frequencies, lengths,
        plus the vocabulary as saved (one JSON string per line)."""
        arrays = [a for _, s in self.segments for a in (s.data, s.indices, s.indptr)]
        arrays += [self.document_frequency.values, self.lengths.values]
        return sum(a.nbytes for a in arrays) + self._vocabulary_bytes

    def save(self, folder: Path) -> None:
        arrays = {"document_frequency": self.document_frequency.values, "lengths": self.lengths.values}
        for i, (start, segment) in enumerate(self.segments):
            arrays |= {f"segment{i}_data": segment.data, f"segment{i}_indices": segment.indices,
                       f"segment{i}_indptr": segment.indptr, f"segment{i}_start_shape": np.array([start, *segment.shape])}
        np.savez(folder / "bm25.npz", **arrays)
        (folder / "vocabulary.jsonl").write_text(
            "".join(json.dumps(t, ensure_ascii=False) + "\n" for t in self.terms), encoding="utf-8"
        )

    def load(self, folder: Path, documents: Sequence[Sequence[str]]) -> None:
        if not (folder / "bm25.npz").is_file():  # saved by the rank_bm25 backend: rebuild from the text
            return self.add(documents)
        with np.load(folder / "bm25.npz") as arrays:
            self.document_frequency.extend(arrays["document_frequency"])
            self.lengths.extend(arrays["lengths"])
            for i in range(sum(name.endswith("_start_shape") for name in arrays.files)):
                start, rows, cols = (int(x) for x in arrays[f"segment{i}_start_shape"])
                matrix = (arrays[f"segment{i}_data"], arrays[f"segment{i}_indices"], arrays[f"segment{i}_indptr"])
                self.segments.append((start, sp.csc_matrix(matrix, shape=(rows, cols))))
        lines = (folder / "vocabulary.jsonl").read_text(encoding="utf-8").splitlines()
        self.terms = [json.loads(line) for line in lines]
        self.vocabulary = {t: i for i, t in enumerate(self.terms)}
        self._vocabulary_bytes = sum(len(line.encode()) + 1 for line in lines)
        if self.lengths.size != len(documents) or self.document_frequency.size != len(self.terms):
            raise KBenchError(f"{folder}: the BM25 arrays do not match the stored passages; rebuild the store")


BM25_BACKENDS = {"sparse": SparseBm25Index, "rank_bm25": RankBm25Index}


def bm25_index(backend: str, **knobs: float) -> Bm25Index:
    if backend not in BM25_BACKENDS:
        raise ValueError(f"method.backend must be one of {sorted(BM25_BACKENDS)}, got {backend!r}")
    return BM25_BACKENDS[backend](**knobs)


# ---------------------------------------------------------------------------------------------- encoders


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


# ---------------------------------------------------------------------------------------------- faiss


def _faiss(required: bool, why: str):
    """faiss, imported only by dense retrieval; None when it is missing and not `required`."""
    try:
        import faiss
    except ImportError:
        if required:
            raise KBenchError(f"{why} needs faiss: pip install faiss-cpu (index=flat works without it)") from None
        return None
    return faiss


class DenseIndex:
    """Inner-product search over vectors with faiss: `flat` (exact), `hnsw` (graph) or `ivf` (clusters).

    IVF needs training: vectors sit in an exact flat index until the store holds
    `ivf_train_per_list × ivf_nlist` of them (faiss's advice: ≥ 39 per list), then the clusters are
    trained on all of them once and later vectors are assigned to the existing clusters.

    Exact search of fewer than `flat_numpy_below` queries at once is one NumPy matrix product over the
    vectors faiss stores (a zero-copy view): faiss 1.15's own exact search of a single query ran
    1.7-5x slower than that here, whatever its thread count or `distance_compute_blas_threshold`
    (measured in benchmarks/retrieval.py). Larger batches go through faiss (BLAS, blocked).

    Without faiss installed, `flat` keeps the vectors in a NumPy array and always searches them with
    that matrix product (same results; saved as `index.npy`); `hnsw` and `ivf` need faiss.
    """

    KINDS = ("flat", "hnsw", "ivf")

    def __init__(self, dim: int, kind: str = "flat", hnsw_m: int = 32, hnsw_ef_construction: int = 80,
                 hnsw_ef_search: int = 64, ivf_nlist: int = 256, ivf_nprobe: int = 16, ivf_train_per_list: int = 39,
                 flat_numpy_below: int = 64) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"method.index must be one of {list(self.KINDS)}, got {kind!r}")
        faiss = _faiss(required=kind != "flat", why=f"method.index={kind}")
        self.vectors: np.ndarray | None = None if faiss else np.zeros((0, dim), dtype=np.float32)
        self.dim, self.kind = dim, kind
        self.hnsw_ef_search, self.ivf_nlist, self.ivf_nprobe = hnsw_ef_search, ivf_nlist, ivf_nprobe
        self.ivf_train_per_list, self.flat_numpy_below = ivf_train_per_list, flat_numpy_below
        if faiss is None:
            self.index = None  # NumPy flat search over self.vectors
        elif kind == "hnsw":
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index.hnsw.efConstruction = hnsw_ef_construction
        else:
            self.index = faiss.IndexFlatIP(dim)
        self._nbytes: tuple[int, int] | None = None  # (ntotal, bytes) of the last measurement

    def __len__(self) -> int:
        return len(self.vectors) if self.index is None else int(self.index.ntotal)

    @property
    def trained_ivf(self) -> bool:
        if self.index is None:
            return False
        import faiss

        return isinstance(self.index, faiss.IndexIVF)

    def add(self, vectors: np.ndarray) -> None:
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        if self.index is None:
            self.vectors = np.concatenate([self.vectors, vectors])
            return
        import faiss

        self.index.add(vectors)
        if self.kind == "ivf" and not self.trained_ivf and len(self) >= self.ivf_train_per_list * self.ivf_nlist:
            stored = self.index.reconstruct_n(0, len(self))
            ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, self.ivf_nlist, faiss.METRIC_INNER_PRODUCT)
            ivf.train(stored)
            ivf.add(stored)
            self.index = ivf

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), each [n_queries, min(k, len)], best first."""
        k = min(k, len(self))
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if k == 0:
            empty = np.zeros((len(queries), 0))
            return empty.astype(np.int64), empty
        if self.kind == "hnsw":
            self.index.hnsw.efSearch = max(self.hnsw_ef_search, k)
        elif self.trained_ivf:
            self.index.nprobe = self.ivf_nprobe
        elif len(queries) < self.flat_numpy_below or self.index is None:
            return self._numpy_search(queries, k)
        scores, ids = self.index.search(queries, k)
        return ids, scores

    def _numpy_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.index is None:
            stored = self.vectors
        else:
            import faiss

            stored = faiss.rev_swig_ptr(self.index.get_xb(), len(self) * self.dim).reshape(len(self), self.dim)
        if len(queries) == 1:  # a matrix-vector product (BLAS gemv) is the fast path for one question
            scores = stored @ queries[0]
            ids = top_k(scores, k)
            return ids[None], scores[ids][None]
        scores = queries @ stored.T
        ids = np.stack([top_k(row, k) for row in scores])
        return ids, np.take_along_axis(scores, ids, axis=1)

    def nbytes(self) -> int:
        """Size of faiss's own serialisation of the index (measured once per store size); without faiss,
        the NumPy array's bytes."""
        if self.index is None:
            return int(self.vectors.nbytes)
        import faiss

        if self._nbytes is None or self._nbytes[0] != len(self):
            self._nbytes = (len(self), int(faiss.serialize_index(self.index).nbytes))
        return self._nbytes[1]

    def save(self, folder: Path) -> None:
        if self.index is None:
            np.save(folder / "index.npy", self.vectors)
            return
        import faiss

        faiss.write_index(self.index, str(folder / "index.faiss"))

    def load(self, folder: Path) -> None:
        if (folder / "index.npy").is_file():
            vectors = np.load(folder / "index.npy")
            if vectors.shape[1] != self.dim:
                raise KBenchError(f"{folder}: index has dimension {vectors.shape[1]}, the encoder gives {self.dim}")
            if self.index is None:
                self.vectors, self._nbytes = vectors, None
            else:  # saved without faiss, loaded with it
                self.index.reset()
                self.add(vectors)
            return
        faiss = _faiss(required=True, why=f"loading {folder / 'index.faiss'}")
        index = faiss.read_index(str(folder / "index.faiss"))
        if index.d != self.dim:
            raise KBenchError(f"{folder}: index has dimension {index.d}, the encoder gives {self.dim}")
        self.index, self._nbytes = index, None
