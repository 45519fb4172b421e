"""Retrieval-augmented generation baselines: `rag_bm25` (lexical) and `rag_dense` (DPR-style).

Nothing is trained. `inject` splits each context into passages of at most `chunk_tokens` tokens of the
LM's own tokenizer (neighbours share `chunk_overlap` tokens; a context that fits stays one passage) and
adds them to a store. For a question q the `top_k` passages with the highest retrieval score s(q, p)
are put in front of the prompt through the model's context template, best first:

    answer = LM.generate_until(prompt_ids(q, context = sep.join(template(p_1), ..., template(p_k))))

- `rag_bm25`: s = BM25Okapi(q, p) over lowercase word tokens without stop words.
- `rag_dense`: s = <E_q(q), E_p(p)>, the inner product of (by default unit-length) embeddings from a
  sentence encoder (embedded MiniLM-L6 by default, any sentence-transformers folder) or from DPR's
  question / context encoders, searched with faiss (exact `flat` by default, or `hnsw` / `ivf`).

The retrieval query is the task's formatted prompt (`Query.prompt`); `loglikelihood` (log-likelihood probes)
retrieves the same way. Each answer's meta lists the retrieved passage ids, their knowledge ids and
scores (predictions.jsonl `method_meta`), from which the task reports `retrieval_recall@1`. With an
empty store the model answers without passages, and `info()` counts how often that happened.
Index machinery: `methods/retrieval/` (chunking, tokenizer, bm25, encoders, dense). Storage: the passages' text plus the index, measured.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from core.io import atomic_dir, atomic_write_json, read_json
from core.options import checked
from core.types import (
    RETRIEVED_KNOWLEDGE_IDS, Answer, GenerationSpec, KBenchError, Knowledge, NonNegativeFloat, NonNegativeInt, PositiveInt,
    Query, TargetScore, UnitFloat,
)
from methods.base import Method
from methods.retrieval.bm25 import bm25_index
from methods.retrieval.chunking import chunk_spans
from methods.retrieval.dense import DenseIndex
from methods.retrieval.encoders import DprEncoder, SentenceEncoder
from methods.retrieval.tokenizer import WordTokenizer

log = logging.getLogger(__name__)

STORE_FORMAT = "kbench-rag-store/1"
Hit = tuple[int, float]  # (passage row in the store, retrieval score)


@dataclass(frozen=True)
class Passage:
    id: str
    knowledge_id: str
    text: str

    def json_line(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False) + "\n"


class RagMethod(Method):
    """The shared store and prompt building; subclasses say how passages are indexed and searched."""

    name = "rag"

    @checked("method")
    def __init__(
        self,
        lm,
        top_k: PositiveInt = 3,
        chunk_tokens: NonNegativeInt = 256,  # 0 = never split
        chunk_overlap: NonNegativeInt = 32,
        passage_template: str = "{text}",
        passage_separator: str = "\n",
        save_dir: str | None = None,
        load_dir: str | None = None,
    ) -> None:
        super().__init__(lm)
        chunk_spans(0, chunk_tokens, chunk_overlap)  # validates the chunking knobs
        try:
            passage_template.format(text="", rank=1)
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(f"method.passage_template may use {{text}} and {{rank}} only: {err!r}") from None
        if "{text}" not in passage_template:
            raise ValueError(f"method.passage_template must contain '{{text}}', got {passage_template!r}")
        self.top_k, self.chunk_tokens, self.chunk_overlap = top_k, chunk_tokens, chunk_overlap
        self.passage_template, self.passage_separator = passage_template, passage_separator
        self.save_dir = Path(save_dir).expanduser() if save_dir else None
        self.load_dir = Path(load_dir).expanduser() if load_dir else None
        self.queries_without_passages = 0
        self._clear()
        if self.load_dir:
            self.load(self.load_dir)

    # ------------------------------------------------------------------ what a retriever provides
    def new_index(self) -> Any:
        raise NotImplementedError

    def index_passages(self, passages: Sequence[Passage]) -> None:
        raise NotImplementedError

    def search(self, queries: Sequence[Query]) -> list[list[Hit]]:
        """The `top_k` best passages for each query, best first (the store is not empty)."""
        raise NotImplementedError

    def store_description(self) -> dict[str, Any]:
        """What a saved store must match to be loaded (e.g. the tokeniser or the encoder)."""
        raise NotImplementedError

    def save_index(self, folder: Path) -> None:
        self.index.save(folder)

    def load_index(self, folder: Path, passages: Sequence[Passage]) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------ store
    def _clear(self) -> None:
        self.passages: list[Passage] = []
        self._text_bytes = 0
        self.index = self.new_index()

    def chunk(self, item: Knowledge) -> list[Passage]:
        """The passages of one context: token windows of the LM's tokenizer, cut back to the source text."""
        tokenizer = self.lm.tokenizer
        if getattr(tokenizer, "is_fast", False):
            offsets = tokenizer(item.context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            spans = chunk_spans(len(offsets), self.chunk_tokens, self.chunk_overlap)
            texts = [item.context[offsets[s][0] : offsets[e - 1][1]] for s, e in spans] if len(spans) > 1 else [item.context]
        else:  # slow tokenizers have no offsets: decode the windows
            ids = self.lm.encode(item.context)
            spans = chunk_spans(len(ids), self.chunk_tokens, self.chunk_overlap)
            texts = [self.lm.decode(ids[s:e]) for s, e in spans] if len(spans) > 1 else [item.context]
        return [Passage(f"{item.id}#{i}", item.id, text.strip()) for i, text in enumerate(texts)]

    def add_passages(self, passages: Sequence[Passage]) -> None:
        if not passages:
            return
        self.index_passages(passages)
        self.passages += passages
        self._text_bytes += sum(len(p.json_line().encode()) for p in passages)

    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        self.add_passages([p for item in knowledge for p in self.chunk(item)])
        if self.save_dir:
            self.save(self.save_dir)

    def reset(self) -> None:
        """Empty the store (back to the `load_dir` store when one was given)."""
        self._clear()
        if self.load_dir:
            self.load(self.load_dir)

    # ------------------------------------------------------------------ answering
    def retrieve(self, queries: Sequence[Query]) -> list[list[Hit]]:
        if not self.passages:
            if self.queries_without_passages == 0:
                log.warning("%s: the store is empty; answering without retrieved passages", self.name)
            self.queries_without_passages += len(queries)
            return [[] for _ in queries]
        return self.search(queries)

    def context_of(self, hits: Sequence[Hit]) -> str | None:
        parts = [self.passage_template.format(text=self.passages[row].text, rank=rank + 1)
                 for rank, (row, _) in enumerate(hits)]
        return self.passage_separator.join(parts) if parts else None

    def meta_of(self, hits: Sequence[Hit]) -> dict[str, Any]:
        return {
            "retrieved_passage_ids": [self.passages[row].id for row, _ in hits],
            RETRIEVED_KNOWLEDGE_IDS: [self.passages[row].knowledge_id for row, _ in hits],
            "retrieval_scores": [round(float(score), 6) for _, score in hits],
        }

    def prompt_ids(self, query: Query) -> list[int]:
        return self.lm.prompt_ids(query.prompt, context=self.context_of(self.retrieve([query])[0]))

    def answer(self, queries: Sequence[Query], generation: GenerationSpec) -> list[Answer]:
        hits = self.retrieve(queries)
        prompts = [self.lm.prompt_ids(q.prompt, context=self.context_of(h)) for q, h in zip(queries, hits)]
        texts = self.lm.generate_until(prompts, generation)
        return [Answer(text, meta=self.meta_of(h)) for text, h in zip(texts, hits)]

    def loglikelihood(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        hits = self.retrieve(queries)
        prompts = [self.lm.prompt_ids(q.prompt, context=self.context_of(h)) for q, h in zip(queries, hits)]
        return self.lm.loglikelihood([(p, self.lm.encode(t)) for p, t in zip(prompts, targets)])

    # ------------------------------------------------------------------ accounting
    def extra_storage_bytes(self) -> int:
        """Stored text (the passages as saved, JSON lines) plus the index's measured size."""
        return self._text_bytes + self.index.nbytes()

    def info(self) -> dict[str, Any]:
        info = {
            "store_passages": len(self.passages),
            "store_text_bytes": self._text_bytes,
            "store_index_bytes": self.index.nbytes(),
            "queries_without_passages": self.queries_without_passages,
        }
        if self.queries_without_passages:
            info["note"] = f"{self.queries_without_passages} queries met an empty store and were answered without passages"
        return info

    # ------------------------------------------------------------------ save / load
    def save(self, folder: str | Path) -> None:
        """Write the store (passages.jsonl, the index, store.json) into `folder`, replacing it whole."""
        with atomic_dir(Path(folder).expanduser()) as staging:
            (staging / "passages.jsonl").write_text("".join(p.json_line() for p in self.passages), encoding="utf-8")
            self.save_index(staging)
            atomic_write_json(staging / "store.json", {"format": STORE_FORMAT, "method": self.name,
                                                       "n_passages": len(self.passages), **self.store_description()})

    def load(self, folder: str | Path) -> None:
        """Replace the store with one written by `save` (with the same tokeniser / encoder)."""
        folder = Path(folder).expanduser()
        meta = read_json(folder / "store.json", f"a store written by method {self.name} (store.json)")
        expected = self.store_description()
        if meta.get("format") != STORE_FORMAT:
            raise KBenchError(f"{folder}: not a kbench RAG store (format {meta.get('format')!r})")
        wrong = {k: (meta.get(k), v) for k, v in expected.items() if meta.get(k) != v}
        if wrong:
            details = "; ".join(f"{k}: stored {s!r}, configured {c!r}" for k, (s, c) in wrong.items())
            raise KBenchError(f"{folder}: the store was built differently ({details}); rebuild it or match the config")
        lines = (folder / "passages.jsonl").read_text(encoding="utf-8").splitlines()
        passages = [Passage(**json.loads(line)) for line in lines]
        self._clear()
        self.load_index(folder, passages)
        self.passages = passages
        self._text_bytes = sum(len(line.encode()) + 1 for line in lines)


class RagBm25(RagMethod):
    """`method=rag_bm25`: BM25Okapi retrieval (backend `sparse`, or the reference `rank_bm25`)."""

    name = "rag_bm25"

    @checked("method")
    def __init__(
        self,
        lm,
        k1: NonNegativeFloat = 1.5,
        b: UnitFloat = 0.75,
        epsilon: NonNegativeFloat = 0.25,
        stopwords: Literal["english", "none"] | list[str] | None = "english",
        backend: Literal["sparse", "rank_bm25"] = "sparse",
        **common,
    ) -> None:
        self.knobs = {"k1": k1, "b": b, "epsilon": epsilon}
        self.backend = backend
        self.tokenize = WordTokenizer(stopwords)
        super().__init__(lm, **common)

    def new_index(self):
        return bm25_index(self.backend, **self.knobs)

    def index_passages(self, passages: Sequence[Passage]) -> None:
        self.index.add([self.tokenize(p.text) for p in passages])

    def search(self, queries: Sequence[Query]) -> list[list[Hit]]:
        results = []
        for query in queries:
            rows, scores = self.index.search(self.tokenize(query.prompt), self.top_k)
            results.append(list(zip(rows.tolist(), scores.tolist())))
        return results

    def store_description(self) -> dict[str, Any]:
        return {"retriever": "bm25", "tokenizer": self.tokenize.describe()}

    def load_index(self, folder: Path, passages: Sequence[Passage]) -> None:
        self.index.load(folder, [self.tokenize(p.text) for p in passages])

    def info(self) -> dict[str, Any]:
        return {"retriever": "bm25", "backend": self.backend, **super().info()}


class RagDense(RagMethod):
    """`method=rag_dense`: embedding retrieval with a sentence encoder or DPR, searched with faiss."""

    name = "rag_dense"

    @checked("method")
    def __init__(
        self,
        lm,
        encoder: str = "embedded:all-minilm-l6-v2",
        dpr_question_encoder: str | None = None,
        dpr_context_encoder: str | None = None,
        normalize: bool = True,
        encode_batch_size: PositiveInt = 64,
        encoder_device: str = "cpu",
        index: Literal["flat", "hnsw", "ivf"] = "flat",
        hnsw_m: PositiveInt = 32,
        hnsw_ef_construction: PositiveInt = 80,
        hnsw_ef_search: PositiveInt = 64,
        ivf_nlist: PositiveInt = 256,
        ivf_nprobe: PositiveInt = 16,
        ivf_train_per_list: PositiveInt = 39,
        flat_numpy_below: NonNegativeInt = 64,
        **common,
    ) -> None:
        if encoder == "dpr":
            self.encoder = DprEncoder(dpr_question_encoder, dpr_context_encoder, normalize=normalize,
                                      batch_size=encode_batch_size, device=encoder_device)
        else:
            self.encoder = SentenceEncoder(encoder, normalize=normalize, batch_size=encode_batch_size,
                                           device=encoder_device)
        self.normalize = normalize
        self.index_knobs = dict(kind=index, hnsw_m=hnsw_m, hnsw_ef_construction=hnsw_ef_construction,
                                hnsw_ef_search=hnsw_ef_search, ivf_nlist=ivf_nlist, ivf_nprobe=ivf_nprobe,
                                ivf_train_per_list=ivf_train_per_list, flat_numpy_below=flat_numpy_below)
        super().__init__(lm, **common)

    def new_index(self) -> DenseIndex:
        return DenseIndex(self.encoder.dim, **self.index_knobs)

    def index_passages(self, passages: Sequence[Passage]) -> None:
        self.index.add(self.encoder.encode_passages([p.text for p in passages]))

    def search(self, queries: Sequence[Query]) -> list[list[Hit]]:
        rows, scores = self.index.search(self.encoder.encode_queries([q.prompt for q in queries]), self.top_k)
        return [[(int(r), float(s)) for r, s in zip(row, score) if r >= 0] for row, score in zip(rows, scores)]

    def store_description(self) -> dict[str, Any]:
        return {"retriever": "dense", "encoder": self.encoder.name, "normalize": self.normalize,
                "dim": self.encoder.dim, "index": self.index_knobs["kind"]}

    def load_index(self, folder: Path, passages: Sequence[Passage]) -> None:
        self.index.load(folder)
        if len(self.index) != len(passages):
            raise KBenchError(f"{folder}: the index holds {len(self.index)} vectors for {len(passages)} passages")

    def info(self) -> dict[str, Any]:
        return {"retriever": "dense", "encoder": self.encoder.name, "index": self.index_knobs["kind"],
                "ivf_trained": self.index.trained_ivf, **super().info()}
