"""RAG baselines: chunking, BM25 (both backends) against hand-computed values and each other, dense
retrieval with the embedded MiniLM (flat / HNSW / IVF, DPR), save -> load, storage, the empty store,
retrieval recall through the task, and whole runs on the tiny model."""
import json
import math

import numpy as np
import pytest

from core.types import GenerationSpec, KBenchError, Knowledge, Query
from methods.rag import RagBm25, RagDense
from methods.retrieval.bm25 import RankBm25Index, SparseBm25Index
from methods.retrieval.chunking import chunk_spans
from methods.retrieval.dense import DenseIndex
from methods.retrieval.tokenizer import WordTokenizer
from methods.retrieval.topk import top_k
from metrics.retrieval import recall_at_k
from runners.build import ConfigError, build
from runners.experiment import Experiment
from tasks.synthetic import SyntheticTask
from tasks.world.generate import generate_items
from tests.conftest import compose_config, read_record

SPEC = GenerationSpec(max_new_tokens=2)
FACTS = [
    Knowledge(id="town", context="Velmora is a small town on the banks of the Orvane river. It was founded in 1742."),
    Knowledge(id="person", context="Dara Quell was born in the village of Kestrin and worked as a glassblower."),
    Knowledge(id="machine", context="The Zintrop is an unusual machine made of copper, used for drying ink."),
]
QUESTIONS = {  # hand-made paraphrases, each about one of FACTS
    "town": "Question: On which river does the town of Velmora lie?\nAnswer:",
    "person": "Question: What did Dara Quell do for a living?\nAnswer:",
    "machine": "Question: From what material is the Zintrop made?\nAnswer:",
}


def queries() -> list[Query]:
    return [Query(id=k, prompt=p) for k, p in QUESTIONS.items()]


# ------------------------------------------------------------------------------------------ chunking


def test_chunk_spans_cover_the_tokens_with_the_overlap():
    assert chunk_spans(5, 8, 2) == [(0, 5)]  # fits: one passage
    assert chunk_spans(20, 8, 2) == [(0, 8), (6, 14), (12, 20)]
    assert chunk_spans(21, 8, 2) == [(0, 8), (6, 14), (12, 20), (18, 21)]
    assert chunk_spans(16, 8, 0) == [(0, 8), (8, 16)]
    assert chunk_spans(1000, 0, 0) == [(0, 1000)]  # 0 = never split
    for bad in ((8, 8), (8, -1), (-1, 0)):
        with pytest.raises(ValueError, match="chunk_overlap < chunk_tokens"):
            chunk_spans(10, *bad)


def test_method_chunks_with_the_lm_tokenizer_back_into_source_text(tiny_lm):
    item = Knowledge(id="k", context=" ".join(f.context for f in FACTS))
    n_tokens = len(tiny_lm.encode(item.context))
    method = RagBm25(tiny_lm, chunk_tokens=16, chunk_overlap=0)
    passages = method.chunk(item)
    assert len(passages) == len(chunk_spans(n_tokens, 16, 0)) > 3
    assert [p.id for p in passages] == [f"k#{i}" for i in range(len(passages))]
    assert all(p.knowledge_id == "k" for p in passages)
    # without overlap the passages are consecutive pieces of the source text
    assert "".join("".join(p.text.split()) for p in passages) == "".join(item.context.split())
    assert all(len(tiny_lm.encode(p.text)) <= 16 + 1 for p in passages)  # +1: a cut may re-tokenise one piece
    overlapping = RagBm25(tiny_lm, chunk_tokens=16, chunk_overlap=6).chunk(item)
    assert len(overlapping) == len(chunk_spans(n_tokens, 16, 6)) > len(passages)
    for first, second in zip(overlapping, overlapping[1:]):  # the next passage starts inside the previous one
        start = item.context.index(second.text)
        assert item.context.index(first.text) < start < item.context.index(first.text) + len(first.text)
    assert RagBm25(tiny_lm).chunk(FACTS[0])[0].text == FACTS[0].context  # fits: the context itself


# ------------------------------------------------------------------------------------------ BM25


def test_bm25_matches_a_hand_computed_score_in_both_backends():
    # N=3 passages of lengths 2, 1, 3 (avgdl 2); "cherry" is in one passage, twice
    documents = [["apple", "banana"], ["apple"], ["cherry", "cherry", "banana"]]
    idf = math.log(2.5) - math.log(1.5)
    expected = idf * 2 * 2.5 / (2 + 1.5 * (1 - 0.75 + 0.75 * 3 / 2))
    assert expected == pytest.approx(0.6287084, abs=1e-7)
    for index in (SparseBm25Index(), RankBm25Index()):
        index.add(documents)
        ids, scores = index.search(["cherry"], k=1)
        assert ids.tolist() == [2] and scores[0] == pytest.approx(expected, rel=1e-12)
        # "apple" is in 2 of 3 passages: negative idf, floored at epsilon x mean idf (rank_bm25's rule)
        floor = 0.25 * (-idf - idf + idf) / 3
        assert index.scores(["apple"])[1] == pytest.approx(floor * 2.5 / (1 + 1.5 * (1 - 0.75 + 0.75 / 2)))


def test_sparse_backend_equals_rank_bm25_under_incremental_adds():
    items = generate_items(300, 4, 1, seed=5, sentence_template="{question} {answer}")
    tokenize = WordTokenizer("english")
    documents = [tokenize(item.knowledge.context) for item in items]
    probes = [tokenize(q) for item in items[::7] for q, _ in item.questions] + [["unknownword"], []]
    reference, fast = RankBm25Index(), SparseBm25Index()
    rng = np.random.default_rng(0)
    start = 0
    while start < len(documents):  # uneven batches, searching in between: idf and avgdl keep changing
        size = int(rng.integers(1, 40))
        reference.add(documents[start : start + size])
        fast.add(documents[start : start + size])
        start += size
        query = probes[int(rng.integers(len(probes)))]
        np.testing.assert_allclose(fast.scores(query), reference.scores(query), rtol=1e-9, atol=1e-12)
    assert 1 < len(fast.segments) <= math.log2(len(documents)) + 1  # merged, not one segment per batch
    for query in probes:
        assert fast.search(query, 10)[0].tolist() == reference.search(query, 10)[0].tolist()
    hits = [fast.search(tokenize(q), 1)[0][0] == row for row, item in enumerate(items) for q, _ in item.questions]
    assert np.mean(hits) > 0.9  # the held-out questions find their own context


def test_top_k_breaks_ties_towards_the_earlier_passage():
    scores = np.array([1.0, 3.0, 2.0, 3.0, 0.0, 2.0])
    assert top_k(scores, 4).tolist() == [1, 3, 2, 5]
    assert top_k(scores, 10).tolist() == [1, 3, 2, 5, 0, 4]
    assert top_k(np.zeros(0), 3).tolist() == []


@pytest.mark.parametrize("backend", ["sparse", "rank_bm25"])
def test_rag_bm25_retrieves_the_right_passage_and_puts_it_in_the_prompt(tiny_lm, backend):
    method = RagBm25(tiny_lm, backend=backend, top_k=2)
    method.inject(FACTS)
    answers = method.answer(queries(), SPEC)
    for (gold, _), answer in zip(QUESTIONS.items(), answers):
        assert answer.meta["retrieved_knowledge_ids"][0] == gold
        assert answer.meta["retrieved_passage_ids"][0] == f"{gold}#0"
        scores = answer.meta["retrieval_scores"]
        assert len(scores) == 2 and scores[0] >= scores[1]
    query = queries()[0]  # the prompt: the model's context template around the passages, best first
    second = next(p for p in method.passages if p.id == answers[0].meta["retrieved_passage_ids"][1])
    context = FACTS[0].context + "\n" + second.text
    assert method.prompt_ids(query) == tiny_lm.prompt_ids(query.prompt, context=context)


def test_bm25_stopwords_and_tokeniser():
    assert WordTokenizer("english")("The town, of VELMORA—founded in 1742!") == ["town", "velmora", "founded", "1742"]
    assert WordTokenizer("none")("The town") == ["the", "town"]
    assert WordTokenizer(["town"])("The town") == ["the"]
    with pytest.raises(ValueError, match="stopwords must be"):
        WordTokenizer("klingon")


# ------------------------------------------------------------------------------------------ dense


def test_rag_dense_retrieves_the_right_passage(tiny_lm):
    method = RagDense(tiny_lm, top_k=3)
    method.inject(FACTS)
    for (gold, _), answer in zip(QUESTIONS.items(), method.answer(queries(), SPEC)):
        assert answer.meta["retrieved_knowledge_ids"][0] == gold
        assert sorted(answer.meta["retrieved_knowledge_ids"]) == sorted(QUESTIONS)
        assert all(-1.0 <= s <= 1.0001 for s in answer.meta["retrieval_scores"])  # cosine of unit vectors


def test_dense_flat_hnsw_and_ivf_agree_with_numpy():
    rng = np.random.default_rng(0)
    vectors = (rng.standard_normal((2000, 8)) @ rng.standard_normal((8, 32))).astype(np.float32)  # low rank
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries_ = vectors[:20] + 0.05 * rng.standard_normal((20, 32)).astype(np.float32)
    exact = np.argsort(-(queries_ @ vectors.T), axis=1, kind="stable")[:, :10]
    flat = DenseIndex(32)
    flat.add(vectors)
    ids, scores = flat.search(queries_, 10)
    assert (ids == exact).mean() > 0.99 and np.all(np.diff(scores, axis=1) <= 1e-6)
    faiss_only = DenseIndex(32, flat_numpy_below=0)  # faiss's own search, no NumPy fast path
    faiss_only.add(vectors)
    faiss_ids, faiss_scores = faiss_only.search(queries_, 10)
    assert (faiss_ids == ids).mean() > 0.99 and np.allclose(faiss_scores, scores, atol=1e-5)
    one_ids, one_scores = flat.search(queries_[3:4], 10)  # the single-query (mat-vec) path
    assert one_ids.tolist() == ids[3:4].tolist() and np.allclose(one_scores, scores[3:4], atol=1e-6)
    hnsw = DenseIndex(32, kind="hnsw")
    hnsw.add(vectors)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(hnsw.search(queries_, 10)[0], exact)]) > 0.9
    ivf = DenseIndex(32, kind="ivf", ivf_nlist=8, ivf_nprobe=8, ivf_train_per_list=39)
    ivf.add(vectors[:100])
    assert not ivf.trained_ivf  # too few vectors to train 8 clusters: exact until then
    ivf.add(vectors[100:])
    assert ivf.trained_ivf and len(ivf) == 2000
    assert (ivf.search(queries_, 10)[0] == exact).mean() > 0.99  # nprobe = nlist: exhaustive
    with pytest.raises(ValueError, match="must be one of"):
        DenseIndex(32, kind="lsh")


def test_dpr_encoders_from_local_folders(tiny_lm, tmp_path):
    import torch
    from transformers import BertTokenizer, DPRConfig, DPRContextEncoder, DPRQuestionEncoder

    words = "velmora town river born copper zintrop machine dara quell what where is the of".split()
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    tokenizer = BertTokenizer(str(tmp_path / "vocab.txt"))
    config = DPRConfig(vocab_size=len(words) + 5, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, max_position_embeddings=128)
    for cls, folder in ((DPRQuestionEncoder, "q"), (DPRContextEncoder, "c")):
        torch.manual_seed(0)
        cls(config).save_pretrained(tmp_path / folder)
        tokenizer.save_pretrained(tmp_path / folder)
    method = RagDense(tiny_lm, encoder="dpr", dpr_question_encoder=str(tmp_path / "q"),
                      dpr_context_encoder=str(tmp_path / "c"), top_k=2)
    method.inject(FACTS)
    answer = method.answer(queries()[:1], SPEC)[0]
    assert len(answer.meta["retrieved_knowledge_ids"]) == 2 and method.index.dim == 32
    with pytest.raises(KBenchError, match="dpr_question_encoder: DPR needs a local model folder"):
        RagDense(tiny_lm, encoder="dpr", dpr_question_encoder=None, dpr_context_encoder=str(tmp_path / "c"))


# ------------------------------------------------------------------------------------------ store


@pytest.mark.parametrize("make", [
    lambda lm, **kw: RagBm25(lm, **kw),
    lambda lm, **kw: RagBm25(lm, backend="rank_bm25", **kw),
    lambda lm, **kw: RagDense(lm, **kw),
    lambda lm, **kw: RagDense(lm, index="hnsw", **kw),
    lambda lm, **kw: RagDense(lm, index="ivf", ivf_nlist=1, ivf_train_per_list=2, **kw),
], ids=["bm25-sparse", "bm25-rank", "dense-flat", "dense-hnsw", "dense-ivf"])
def test_save_then_load_gives_the_same_results_and_bytes(tiny_lm, tmp_path, make):
    method = make(tiny_lm, top_k=2, chunk_tokens=12, chunk_overlap=2, save_dir=str(tmp_path / "store"))
    method.inject(FACTS[:2])
    method.inject(FACTS[2:])  # saved after every injection: the folder holds the latest store
    before = method.answer(queries(), SPEC)
    loaded = make(tiny_lm, top_k=2, load_dir=str(tmp_path / "store"))
    after = loaded.answer(queries(), SPEC)
    assert [a.meta for a in after] == [b.meta for b in before]
    assert [a.text for a in after] == [b.text for b in before]
    assert loaded.extra_storage_bytes() == method.extra_storage_bytes()
    stored = json.loads((tmp_path / "store" / "store.json").read_text())
    assert stored["n_passages"] == len(method.passages) > len(FACTS)
    files = sum(f.stat().st_size for f in (tmp_path / "store").iterdir() if f.name != "store.json")
    npz = tmp_path / "store" / "bm25.npz"
    headers = 256 + (300 * len(np.load(npz).files) if npz.exists() else 0)  # faiss / npz (zip + npy) headers
    assert 0 <= files - method.extra_storage_bytes() <= headers  # the measured bytes are what is on disk
    loaded.inject(FACTS[:1])  # a loaded store keeps growing; reset returns to the loaded one
    assert len(loaded.passages) > len(method.passages)
    loaded.reset()
    assert [p.id for p in loaded.passages] == [p.id for p in method.passages]


def test_loading_a_store_built_differently_fails_clearly(tiny_lm, tmp_path):
    method = RagBm25(tiny_lm, stopwords="english")
    method.inject(FACTS)
    method.save(tmp_path / "store")
    with pytest.raises(KBenchError, match="the store was built differently .*tokenizer"):
        RagBm25(tiny_lm, stopwords="none", load_dir=str(tmp_path / "store"))
    with pytest.raises(KBenchError, match="retriever: stored 'bm25', configured 'dense'"):
        RagDense(tiny_lm, load_dir=str(tmp_path / "store"))
    with pytest.raises(Exception, match="store.json"):
        RagBm25(tiny_lm, load_dir=str(tmp_path / "nothing"))


@pytest.mark.parametrize("make", [RagBm25, RagDense], ids=["bm25", "dense"])
def test_storage_bytes_grow_with_the_store_and_reset_empties_it(tiny_lm, make):
    method = make(tiny_lm)
    sizes = [method.extra_storage_bytes()]
    for item in FACTS:
        method.inject([item])
        sizes.append(method.extra_storage_bytes())
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    text = sum(len(json.dumps({"id": f"{f.id}#0", "knowledge_id": f.id, "text": f.context}, ensure_ascii=False)) + 1
               for f in FACTS)
    info = method.info()
    assert info["store_text_bytes"] == text and info["store_index_bytes"] == sizes[-1] - text > 0
    method.reset()
    assert method.passages == [] and method.extra_storage_bytes() == sizes[0]


@pytest.mark.parametrize("make", [RagBm25, RagDense], ids=["bm25", "dense"])
def test_empty_store_answers_without_passages_and_says_so(tiny_lm, make):
    method = make(tiny_lm)
    answers = method.answer(queries(), SPEC)
    assert [a.meta["retrieved_knowledge_ids"] for a in answers] == [[], [], []]
    assert method.prompt_ids(queries()[0]) == tiny_lm.prompt_ids(queries()[0].prompt)  # no context at all
    assert method.loglikelihood(queries()[:1], [" Orvane"])[0].n_tokens > 0
    info = method.info()
    assert info["queries_without_passages"] == 3 + 1 + 1 and "empty store" in info["note"]


def test_bad_knobs_fail_clearly(tiny_lm):
    with pytest.raises(ValueError, match=r"method.top_k: expected int >= 1, got 0 \(int\)"):
        RagBm25(tiny_lm, top_k=0)
    with pytest.raises(ValueError, match="passage_template must contain"):
        RagBm25(tiny_lm, passage_template="[{rank}]")
    with pytest.raises(ValueError, match="may use {text} and {rank} only"):
        RagBm25(tiny_lm, passage_template="{title}: {text}")
    with pytest.raises(ValueError, match="method.backend: expected one of 'sparse', 'rank_bm25', got 'elastic'"):
        RagBm25(tiny_lm, backend="elastic")
    with pytest.raises(ConfigError, match="method.top_k: expected int"):
        build(compose_config("model=tiny", "method=rag_bm25", "method.top_k=many").method, "method", lm=tiny_lm)


# ------------------------------------------------------------------------------------------ task + runner


def test_task_reports_retrieval_recall_only_for_retrieval_methods(tiny_lm):
    assert recall_at_k(["a", "b"], "b", 1) == 0.0 and recall_at_k(["a", "b"], "b", 2) == 1.0
    task = SyntheticTask(n_contexts=3, mode="batch")
    (step,) = task.steps()
    probe_set = step.probe_sets[0]
    method = RagBm25(tiny_lm)
    method.inject(step.knowledge)
    answers = method.answer([p.query for p in probe_set.probes], SPEC)
    from core.types import Answer
    from runners.results import score_probe_set

    results = score_probe_set(task, 0, probe_set, answers)
    expected = [float(a.meta["retrieved_knowledge_ids"][0] == p.knowledge_id) for a, p in zip(answers, probe_set.probes)]
    assert [r.metrics["retrieval_recall@1"] for r in results] == expected and sum(expected) >= 10
    assert "retrieval_recall@1" in task.metric_protocols(results)
    plain = score_probe_set(task, 0, probe_set, [Answer("x")] * len(probe_set.probes))
    assert "retrieval_recall@1" not in plain[0].metrics
    # the protocols follow the results passed in, not what the task scored before
    assert "retrieval_recall@1" not in task.metric_protocols(plain)
    method.reset()
    empty = method.answer([p.query for p in probe_set.probes[:2]], SPEC)
    assert [r["retrieval_recall@1"] for r in task.process_results(
        type(probe_set)(name="qa", probes=probe_set.probes[:2]), empty)] == [0.0, 0.0]


@pytest.mark.parametrize("method", ["rag_bm25", "rag_dense"])
def test_run_in_batch_mode_records_recall_storage_and_retrievals(tmp_path, method):
    cfg = compose_config("model=tiny", f"method={method}", "logger=none", "task.mode=batch", "task.n_contexts=5",
                         f"method.save_dir={tmp_path / 'store'}")
    Experiment(cfg, tmp_path, names={"method": method, "task": "synthetic", "model": "tiny"}).run()
    record = read_record(tmp_path)
    assert record["status"] == "done"
    assert record["metrics"]["retrieval_recall@1"] >= 0.8  # 20 questions over 5 stored contexts
    assert "retrieval_recall@1" in record["metric_protocols"]
    assert record["extra_storage_bytes"] > 0 and record["method_info"]["store_passages"] == 5
    assert record["method_info"]["queries_without_passages"] == 0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(len(r["method_meta"]["retrieved_passage_ids"]) == 3 for r in rows)
    assert (tmp_path / "store" / "passages.jsonl").read_text().count("\n") == 5


@pytest.mark.slow
def test_embedded_model_with_retrieval_approaches_the_context_upper_bound(tmp_path):
    cfg = compose_config("method=rag_dense", "logger=none", "task.mode=batch", "task.limit=3")
    Experiment(cfg, tmp_path, names={"method": "rag_dense", "task": "synthetic", "model": "gemma3_270m"}).run()
    metrics = read_record(tmp_path)["metrics"]
    assert metrics["retrieval_recall@1"] == 1.0
    assert metrics["qa_f1"] > 0.4  # the context upper bound scores ~0.7 on this data; the floor ~0.01
