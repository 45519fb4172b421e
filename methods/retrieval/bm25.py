"""BM25 indexes over tokenised passages: grow with `add`, answer `search(query, k) -> (row ids, scores)`
best first, report the bytes they would save (`nbytes`) and save to / load from a folder without pickles.

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

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from core.types import KBenchError
from methods.retrieval.topk import top_k


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
    """An empty index of the named backend (`method.backend`) with the BM25 knobs k1, b, epsilon."""
    if backend not in BM25_BACKENDS:
        raise ValueError(f"method.backend must be one of {sorted(BM25_BACKENDS)}, got {backend!r}")
    return BM25_BACKENDS[backend](**knobs)
