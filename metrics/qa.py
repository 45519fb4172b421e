"""Generated-answer QA metrics: SQuAD-normalised token F1, exact match, and `contains`.

Normalisation (the SQuAD v1.1 evaluation script): lowercase, drop punctuation, drop the articles
a/an/the, collapse whitespace. With several gold answers each metric takes the best gold.
`contains` is the SELF-PARAM reference's `acc`: the normalised gold occurs in the normalised prediction.
"""
from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

PROTOCOLS = {
    "qa_f1": "generate/squad-token-f1(max over golds)",
    "exact_match": "generate/squad-exact-match(max over golds)",
    "contains": "generate/normalised-gold-substring(max over golds)",
}

_PUNCTUATION = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def token_f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:
        return float(pred_tokens == gold_tokens)  # both empty -> 1, one empty -> 0
    common = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred_tokens), common / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def contains(prediction: str, gold: str) -> float:
    normalized_gold = normalize_answer(gold)
    return float(bool(normalized_gold) and normalized_gold in normalize_answer(prediction))


def qa_scores(prediction: str, golds: Sequence[str]) -> dict[str, float]:
    """All three metrics for one prediction, each maximised over the gold answers."""
    if not golds:
        raise ValueError("a QA probe needs at least one gold answer")
    return {
        "qa_f1": max(token_f1(prediction, g) for g in golds),
        "exact_match": max(exact_match(prediction, g) for g in golds),
        "contains": max(contains(prediction, g) for g in golds),
    }
