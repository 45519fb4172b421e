"""Inner-product search over passage vectors with faiss (flat / HNSW / IVF), or NumPy without faiss;
saved with faiss's own serialisation (`index.faiss`) or as `index.npy`, never a pickle."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.types import KBenchError
from methods.retrieval.topk import top_k


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
