"""Retrieval metrics from what a retrieval method reports about each answer.

A retrieval-like method (RAG, RECIPE, MEMOIR, GRACE) puts the knowledge ids it used, best first, under
`RETRIEVED_KNOWLEDGE_IDS` in its answer's meta; the task knows which knowledge each probe is about.
Recall@k is 1 when that knowledge is among the first k retrieved passages, else 0 (also when the store
was empty and nothing was retrieved).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from core.types import RETRIEVED_KNOWLEDGE_IDS  # re-exported: the key is defined once, beside Answer

__all__ = ["PROTOCOLS", "RETRIEVED_KNOWLEDGE_IDS", "recall_at_k", "retrieval_scores"]

PROTOCOLS = {
    "retrieval_recall@1": "method-reported/top-1 retrieved passage comes from the probe's knowledge item "
    "(0 when nothing was retrieved)",
}


def recall_at_k(retrieved: Sequence[str], gold: str, k: int) -> float:
    if k < 1:
        raise ValueError(f"recall@k needs k >= 1, got {k}")
    return float(gold in retrieved[:k])


def retrieval_scores(answer_meta: Mapping[str, Any], knowledge_id: str | None) -> dict[str, float]:
    """`retrieval_recall@1` when the answer reports its retrieval and the probe names its knowledge; else {}."""
    retrieved = answer_meta.get(RETRIEVED_KNOWLEDGE_IDS)
    if retrieved is None or knowledge_id is None:
        return {}
    return {"retrieval_recall@1": recall_at_k(list(retrieved), knowledge_id, 1)}
