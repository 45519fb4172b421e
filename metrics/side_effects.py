"""Side effects of injection: over-generalisation (leak), knowledge conflicts, and drift of general ability.

Every answer comparison uses the SQuAD normalisation of `metrics.qa` (lowercase, no punctuation, no
articles, collapsed whitespace) and *whole-token* matching: an answer is `mentioned` in a prediction when
its normalised tokens occur as a contiguous run of the prediction's normalised tokens. (`qa.contains`
matches substrings, so "4200" would be found in "42000"; for leaks and conflicts between numbers and
years that would count wrong answers as the injected one.)

- Leak (near-miss probes): a near-miss question is one whose correct answer is *not* the injected one
  (same relation about another, never-injected subject; or another, never-stated relation about the
  injected subject). leak = 1 if the prediction mentions any of the injected answers the probe is
  paired with, else 0; `leak_rate` = the mean over near-miss answers.
- Conflict (a later context updates a fact of an earlier one; asked after the update is injected),
  with o the old and n the new value:
      update = [mentions(p, n) and not mentions(p, o)]        -> update_acc = mean
      stale  = [mentions(p, o) and not mentions(p, n)]        -> stale_rate = mean
      mixed  = 1 − update − stale  (neither value, or both)   -> mixed_rate = mean
  so update_acc + stale_rate + mixed_rate = 1.
- Drift on generic text, from teacher-forced scores of every sentence (log-probability sum lp_i over its
  n_i predicted tokens, greedy token accuracy a_i):
      perplexity = exp(− Σ_i lp_i / Σ_i n_i)       next-token accuracy = Σ_i a_i n_i / Σ_i n_i
  reported as ratios after / before injection (1.0 = unchanged; ppl ratio > 1 = worse).
- Agreement with the model before injection on unrelated questions: teacher-forced, the fraction of
  answer positions whose argmax token is unchanged (EasyEdit locality, `metrics.editing`); generated,
  1 if the normalised answer is unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from metrics import qa

PROTOCOLS = {
    "near_miss/leak_rate": "generate/near-miss answer mentions an injected answer (normalised whole tokens), mean over probes",
    "near_miss/leak_rate_other_subject": "as leak_rate, probes: same relation about a never-injected subject",
    "near_miss/leak_rate_other_relation": "as leak_rate, probes: a never-stated relation about the injected subject",
    "conflict/update_acc": "generate/mentions the new value and not the old one, after the update (normalised whole tokens)",
    "conflict/stale_rate": "generate/mentions the old value and not the new one, after the update",
    "conflict/mixed_rate": "generate/mentions neither value or both, after the update (1 - update_acc - stale_rate)",
    "drift/ppl_ratio": "loglikelihood_bare/perplexity of the generic text after / before injection (weights as served, "
                       "no prompt augmentation), mean over injection steps",
    "drift/next_token_acc_ratio": "loglikelihood_bare/greedy next-token accuracy on the generic text after / before, "
                                  "mean over injection steps",
    "drift/general_agreement_tf": "loglikelihood/argmax tokens of the gold answer equal to those before injection "
                                  "(EasyEdit locality), unrelated questions, mean over probes and steps",
    "drift/general_agreement_gen": "generate/normalised answer equal to the one before injection, unrelated questions",
    "drift/general_qa_f1": "generate/squad-token-f1 against the gold answer, unrelated questions",
}


def normalized_tokens(text: str) -> list[str]:
    return qa.normalize_answer(text).split()


def mentions(prediction: str, answer: str) -> bool:
    """Whether the normalised tokens of `answer` occur as a contiguous run in those of `prediction`."""
    needle, haystack = normalized_tokens(answer), normalized_tokens(prediction)
    if not needle:
        return False
    width = len(needle)
    return any(haystack[start : start + width] == needle for start in range(len(haystack) - width + 1))


def leak(prediction: str, injected: Sequence[str]) -> float:
    """1.0 if the near-miss prediction mentions any of the injected answers, else 0.0."""
    if not injected:
        raise ValueError("a near-miss probe needs at least one injected answer to test for a leak")
    return float(any(mentions(prediction, answer) for answer in injected))


def leak_rate(predictions: Sequence[str], injected: Sequence[Sequence[str]]) -> float:
    """Fraction of near-miss predictions that mention their injected answer."""
    if len(predictions) != len(injected) or not predictions:
        raise ValueError(f"leak_rate needs one injected-answer list per prediction, got {len(predictions)} and {len(injected)}")
    return sum(leak(p, i) for p, i in zip(predictions, injected)) / len(predictions)


def conflict_outcome(prediction: str, old: str, new: str) -> str:
    """`update`, `stale` or `mixed` for one answer to an updated fact."""
    if qa.normalize_answer(old) == qa.normalize_answer(new):
        raise ValueError(f"a conflict needs two different values, got {old!r} twice")
    has_new, has_old = mentions(prediction, new), mentions(prediction, old)
    if has_new and not has_old:
        return "update"
    if has_old and not has_new:
        return "stale"
    return "mixed"


def conflict_scores(prediction: str, old: str, new: str) -> dict[str, float]:
    """One-hot per-probe conflict metrics; their means are update_acc, stale_rate and mixed_rate."""
    outcome = conflict_outcome(prediction, old, new)
    return {"conflict/update_acc": float(outcome == "update"), "conflict/stale_rate": float(outcome == "stale"),
            "conflict/mixed_rate": float(outcome == "mixed")}


def text_scores(scores: Iterable[tuple[float, int, float]]) -> dict[str, float]:
    """Perplexity and next-token accuracy of a text set from per-sentence (logprob sum, n tokens, token
    accuracy), micro-averaged over tokens."""
    total_lp = total_n = hits = 0.0
    for logprob, n_tokens, accuracy in scores:
        total_lp, total_n, hits = total_lp + logprob, total_n + n_tokens, hits + accuracy * n_tokens
    if total_n == 0:
        raise ValueError("no predicted tokens: the generic text is empty")
    return {"ppl": math.exp(-total_lp / total_n), "next_token_acc": hits / total_n}


def ratio(after: float, before: float) -> float:
    """after / before; identical inputs give exactly 1.0. A zero `before` gives inf (or 1.0 if both are 0)."""
    if before == 0:
        return 1.0 if after == 0 else math.inf
    return after / before


def answer_agreement(before: str, after: str) -> float:
    """1.0 if two generated answers are equal after normalisation."""
    return float(qa.normalize_answer(before) == qa.normalize_answer(after))
