"""Retrieval speed and storage at 10k and 100k passages: BM25 (rank_bm25 vs the sparse backend) and
dense search (faiss flat / HNSW / IVF), each against a NumPy brute-force matmul measured in the same run.

Data: contexts of the synthetic task (`tasks.world.generate.generate_items`, one passage each) and its
held-out test questions as queries, so every query has a gold passage. Dense vectors are real MiniLM-L6
embeddings (the embedded encoder, as `method=rag_dense` uses it) of that text; they take minutes to
compute on CPU and are cached under `$KBENCH_CACHE/benchmarks/retrieval/`.

Latency is per single query (what a RAG method does per question), p50 / p95 over the queries, with
the backends timed in turn for each query so a busy machine slows them all alike. Query embedding is
timed separately. recall@10 is the share of exact top-10 passages a backend returns (for BM25,
tie-aware: a returned passage counts when its reference score reaches the 10th best reference score).
`× numpy` is a backend's p50 over NumPy's p50 (below 1 = faster).

    python benchmarks/retrieval.py                      # 10k and 100k (first run encodes: minutes)
    python benchmarks/retrieval.py --sizes 10000 --json out.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.io import atomic_write, cache_dir, stable_hash  # noqa: E402
from core.progress import progress  # noqa: E402
from methods.retrieval.bm25 import RankBm25Index, SparseBm25Index  # noqa: E402
from methods.retrieval.dense import DenseIndex  # noqa: E402
from methods.retrieval.encoders import SentenceEncoder  # noqa: E402
from methods.retrieval.tokenizer import WordTokenizer  # noqa: E402
from tasks.world.generate import generate_items  # noqa: E402

ENCODER = "embedded:all-minilm-l6-v2"
K = 10


def load_data(n: int, n_queries: int, seed: int) -> tuple[list[str], list[str], np.ndarray]:
    """n passages, and n_queries held-out questions (one per sampled passage) with their gold rows."""
    items = generate_items(n, facts_per_context=4, train_questions_per_fact=0, seed=seed,
                           sentence_template="{question} {answer}")
    passages = [item.knowledge.context for item in items]
    rng = np.random.default_rng(seed)
    gold = rng.choice(n, size=n_queries, replace=False)
    queries = [items[row].questions[int(rng.integers(len(items[row].questions)))][0] for row in gold]
    return passages, queries, gold


def embeddings(encoder: SentenceEncoder, passages: list[str], key: dict) -> tuple[np.ndarray, float | None]:
    """Passage embeddings, cached on disk; returns (vectors, seconds to encode or None when cached)."""
    path = cache_dir("benchmarks", "retrieval") / f"{stable_hash(key)}.npy"
    if path.is_file():
        return np.load(path), None
    started = time.perf_counter()
    vectors = encoder.encode_passages(passages)
    seconds = time.perf_counter() - started
    with atomic_write(path, suffix=".npy") as tmp:  # np.save adds .npy to a name without it
        np.save(tmp, vectors)
    return vectors, seconds


def percentiles(seconds: list[float]) -> tuple[float, float]:
    return float(np.percentile(seconds, 50) * 1e3), float(np.percentile(seconds, 95) * 1e3)


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def numpy_search(vectors: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    scores = vectors @ query
    rows = np.argpartition(-scores, k)[:k]
    return rows[np.argsort(-scores[rows])]


def overlap(found, exact) -> float:
    return len(set(np.asarray(found).tolist()) & set(np.asarray(exact).tolist())) / len(exact)


def bench_bm25(passages: list[str], queries: list[str], gold: np.ndarray, rank_queries: int) -> list[dict]:
    tokenize = WordTokenizer("english")
    started = time.perf_counter()
    documents = [tokenize(p) for p in passages]
    query_tokens = [tokenize(q) for q in queries]
    tokenize_s = time.perf_counter() - started

    reference = RankBm25Index()
    reference.add(documents)
    _, rank_build = timed(reference.scores, [])  # rank_bm25 builds its index at the first search
    tracemalloc.start()  # its index is Python dicts: measure their heap in a second, traced build
    traced = RankBm25Index()
    traced.add(documents)
    traced.scores([])
    rank_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del traced

    fast = SparseBm25Index()
    _, fast_build = timed(fast.add, documents)
    incremental = SparseBm25Index()
    started = time.perf_counter()
    for start in range(0, len(documents), 100):  # a sequential run: 100 passages per injection
        incremental.add(documents[start : start + 100])
    incremental_build = time.perf_counter() - started

    for query in query_tokens[:3]:  # warm-up
        fast.search(query, K)
    fast_times, rank_times, recalls, same, hits = [], [], [], 0, []
    for i, query in enumerate(progress(query_tokens, desc="bm25 queries")):
        (rows, _), seconds = timed(fast.search, query, K)
        fast_times.append(seconds)
        hits.append(rows[0] == gold[i])
        if i < rank_queries:
            (ref_rows, _), seconds = timed(reference.search, query, K)
            rank_times.append(seconds)
            ref_scores = reference.scores(query)
            tenth = ref_scores[ref_rows[-1]]
            recalls.append(np.mean(ref_scores[rows] >= tenth - 1e-9))
            same += rows.tolist() == ref_rows.tolist()
    fast_p = percentiles(fast_times)
    rank_p = percentiles(rank_times)
    return [
        {"backend": "bm25 rank_bm25", "build_s": rank_build, "bytes": rank_bytes, "p50_ms": rank_p[0],
         "p95_ms": rank_p[1], "recall@10": 1.0, "gold@1": None, "queries": len(rank_times),
         "note": "bytes: Python heap (tracemalloc); rebuilt from text on load"},
        {"backend": "bm25 sparse", "build_s": fast_build, "bytes": fast.nbytes(), "p50_ms": fast_p[0],
         "p95_ms": fast_p[1], "recall@10": float(np.mean(recalls)), "gold@1": float(np.mean(hits)),
         "queries": len(fast_times), "speedup_vs_rank_bm25": rank_p[0] / fast_p[0],
         "same_top10": f"{same}/{len(recalls)}",
         "note": f"incremental build in 100-passage adds: {incremental_build:.2f} s; tokenising: {tokenize_s:.2f} s"},
    ]


def bench_dense(passages: list[str], queries: list[str], gold: np.ndarray, encoder: SentenceEncoder, seed: int,
                hnsw: dict, ivf_nprobe: int) -> tuple[list[dict], dict]:
    key = {"encoder": ENCODER, "n": len(passages), "seed": seed, "first": passages[0], "last": passages[-1]}
    vectors, encode_s = embeddings(encoder, passages, key)
    n, dim = vectors.shape
    encoder.encode_queries(queries[:3])  # warm-up
    query_vectors, query_times = [], []
    for query in queries:  # one at a time, as a method answering one question would
        vector, seconds = timed(encoder.encode_queries, [query])
        query_vectors.append(vector[0])
        query_times.append(seconds)
    query_vectors = np.stack(query_vectors)

    import faiss

    def build(kind: str, **knobs) -> tuple[DenseIndex, float]:
        index = DenseIndex(dim, kind=kind, **knobs)
        _, seconds = timed(index.add, vectors)
        return index, seconds

    def faiss_flat(threshold: int | None = None, threads: int | None = None):
        """IndexFlatIP.search itself, optionally with another BLAS threshold / OpenMP thread count."""
        index, seconds = build("flat", flat_numpy_below=0)

        def search(query: np.ndarray):
            saved = faiss.cvar.distance_compute_blas_threshold, faiss.omp_get_max_threads()
            faiss.cvar.distance_compute_blas_threshold = saved[0] if threshold is None else threshold
            faiss.omp_set_num_threads(threads or saved[1])
            try:
                return index.search(query, K)
            finally:
                faiss.cvar.distance_compute_blas_threshold = saved[0]
                faiss.omp_set_num_threads(saved[1])

        return search, index, seconds

    def ours(kind: str, **knobs):
        index, seconds = build(kind, **knobs)
        return (lambda query: index.search(query, K)), index, seconds

    nlist = min(int(4 * np.sqrt(n)), n // 39)  # faiss's rule of thumb, capped so the clusters get trained
    backends = {
        "faiss flat, IndexFlatIP.search (faiss defaults)": faiss_flat(),
        "faiss flat, IndexFlatIP.search (blas_threshold=1)": faiss_flat(threshold=1),
        "faiss flat, IndexFlatIP.search (1 thread)": faiss_flat(threads=1),
        "dense flat (ours: numpy over faiss's vectors)": ours("flat"),
        f"dense hnsw (M={hnsw['hnsw_m']}, efC={hnsw['hnsw_ef_construction']}, efS={hnsw['hnsw_ef_search']})":
            ours("hnsw", **hnsw),
        f"dense ivf (nlist={nlist}, nprobe={ivf_nprobe})": ours("ivf", ivf_nlist=nlist, ivf_nprobe=ivf_nprobe),
    }
    names = ["numpy brute force"] + list(backends)
    times: dict[str, list[float]] = {name: [] for name in names}
    recalls: dict[str, list[float]] = {name: [] for name in names}
    hits: dict[str, list[bool]] = {name: [] for name in names}
    for query in query_vectors[:3]:  # warm-up
        numpy_search(vectors, query, K)
        for search, _, _ in backends.values():
            search(query[None])
    for i, query in enumerate(progress(query_vectors, desc="dense queries")):
        exact, seconds = timed(numpy_search, vectors, query, K)
        times[names[0]].append(seconds)
        recalls[names[0]].append(1.0)
        hits[names[0]].append(exact[0] == gold[i])
        for name, (search, _, _) in backends.items():
            (rows, _), seconds = timed(search, query[None])
            times[name].append(seconds)
            recalls[name].append(overlap(rows[0], exact))
            hits[name].append(rows[0][0] == gold[i])
    rows = []
    numpy_p50 = percentiles(times[names[0]])[0]
    for name in names:
        p50, p95 = percentiles(times[name])
        _, index, build_s = backends.get(name, (None, None, 0.0))
        rows.append({"backend": name, "build_s": build_s, "bytes": index.nbytes() if index else vectors.nbytes,
                     "p50_ms": p50, "p95_ms": p95, "recall@10": float(np.mean(recalls[name])),
                     "gold@1": float(np.mean(hits[name])), "queries": len(times[name]), "x_numpy": p50 / numpy_p50})
    query_p = percentiles(query_times)
    facts = {"encode_passages_s": encode_s, "passages_per_s": n / encode_s if encode_s else None,
             "query_embedding_p50_ms": query_p[0], "query_embedding_p95_ms": query_p[1], "dim": dim,
             "faiss_threads": faiss.omp_get_max_threads()}
    return rows, facts


def print_table(n: int, rows: list[dict], numpy_p50: float) -> None:
    print(f"\n### {n:,} passages")
    print(f"| backend | build s | bytes | p50 ms | p95 ms | × numpy | recall@10 | gold@1 |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        gold = "–" if r["gold@1"] is None else f"{r['gold@1']:.3f}"
        print(f"| {r['backend']} | {r['build_s']:.2f} | {r['bytes']:,} | {r['p50_ms']:.3f} | {r['p95_ms']:.3f} | "
              f"{r['p50_ms'] / numpy_p50:.2f} | {r['recall@10']:.3f} | {gold} |")
    for r in rows:
        if r.get("note"):
            print(f"- {r['backend']}: {r['note']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--queries", type=int, default=200, help="queries per size")
    parser.add_argument("--rank-queries", type=int, default=30, help="queries timed on rank_bm25 (slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--hnsw-ef-construction", type=int, default=80)
    parser.add_argument("--hnsw-ef-search", type=int, default=64)
    parser.add_argument("--ivf-nprobe", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()
    import faiss

    print(f"threads: faiss {faiss.omp_get_max_threads()}, cpu {os.cpu_count()}; faiss {faiss.__version__}, "
          f"numpy {np.__version__}; faiss default distance_compute_blas_threshold "
          f"{faiss.cvar.distance_compute_blas_threshold}; load average {os.getloadavg()}")
    encoder = SentenceEncoder(ENCODER)
    hnsw = {"hnsw_m": args.hnsw_m, "hnsw_ef_construction": args.hnsw_ef_construction,
            "hnsw_ef_search": args.hnsw_ef_search}
    report = []
    for n in args.sizes:
        passages, queries, gold = load_data(n, args.queries, args.seed)
        dense_rows, facts = bench_dense(passages, queries, gold, encoder, args.seed, hnsw, args.ivf_nprobe)
        bm25_rows = bench_bm25(passages, queries, gold, args.rank_queries)
        numpy_p50 = dense_rows[0]["p50_ms"]
        print_table(n, dense_rows + bm25_rows, numpy_p50)
        encoded = (f"encoded in {facts['encode_passages_s']:.0f} s ({facts['passages_per_s']:.0f} passages/s)"
                   if facts["encode_passages_s"] else "embeddings from the cache")
        print(f"- text {sum(len(p.encode()) for p in passages):,} bytes; dim {facts['dim']}; {encoded}; "
              f"query embedding (MiniLM, one query) p50 {facts['query_embedding_p50_ms']:.2f} ms, "
              f"p95 {facts['query_embedding_p95_ms']:.2f} ms")
        flat = next(r for r in dense_rows if r["backend"].startswith("dense flat"))
        hnsw_row = next(r for r in dense_rows if "hnsw" in r["backend"])
        sparse = bm25_rows[1]
        print(f"- targets: flat ≤ 1.0× numpy: {flat['x_numpy']:.2f}× "
              f"({'met' if flat['x_numpy'] <= 1.0 else 'MISSED'}); "
              f"hnsw p50 ≤ 1 ms & recall@10 ≥ 0.95: {hnsw_row['p50_ms']:.3f} ms, {hnsw_row['recall@10']:.3f} "
              f"({'met' if hnsw_row['p50_ms'] <= 1 and hnsw_row['recall@10'] >= 0.95 else 'MISSED'}); "
              f"sparse BM25 ≥ 10× rank_bm25 with the same top-10: {sparse['speedup_vs_rank_bm25']:.1f}×, "
              f"recall@10 {sparse['recall@10']:.3f}, identical lists {sparse['same_top10']} "
              f"({'met' if sparse['speedup_vs_rank_bm25'] >= 10 and sparse['recall@10'] == 1.0 else 'MISSED'})")
        report.append({"n": n, "rows": dense_rows + bm25_rows, **facts})
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
