"""The training pairs (question, answer) a fictional-world context's facts can be asked with.

Shared by the synthetic tasks (`tasks/world/generate.py` renders a context's training split with them)
and the sentence sources of FT(S) / SELF-PARAM (`methods/sentences.py`, `method.sentences.n_pairs`), so
it lives below both. Each fact has *training* phrasings and disjoint *test* phrasings
(`core.world.relations`); `qa_pairs` wraps and combines only training phrasings, so no training pair is
ever a test question (tests/test_pairs.py).
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from core.types import DataError, Knowledge
from core.world.relations import KINDS, Relation, relations_of


@dataclass(frozen=True)
class Fact:
    """One stated fact: `subject`'s `relation` has `value`."""

    subject: str
    relation: Relation
    value: str

    def as_dict(self) -> dict[str, str]:
        """The fact as a generated context's `Knowledge.meta["facts"]` lists it."""
        return {"subject": self.subject, "relation": self.relation.name, "value": self.value}


# Question forms of the training pairs (`qa_pairs`). Only *training* phrasings are ever wrapped or combined,
# so a held-out test phrasing never appears in a training pair (tests/test_pairs.py checks it).
ASK_PREFIXES = ("", "Quick question: ", "Here is a question about {s}. ", "I have a question. ", "Tell me this: ",
                "Please answer: ")
COMBINED = ("{q1} And {q2}", "Two questions. First: {q1} Second: {q2}", "Answer both. {q1} {q2}")


def qa_pairs(facts: Sequence[Fact], n: int, seed: str) -> list[tuple[str, str]]:
    """`n` unique (question, answer) pairs about one context's facts, deterministic in `seed`.

    Single-fact pairs: every training phrasing under every prefix of `ASK_PREFIXES`, answered in short form
    (the value) and in sentence form (the fact's statement). Two-fact pairs: two training phrasings about
    different facts joined by a form of `COMBINED`, answered "v1; v2" or with both statements. The list
    alternates single and two-fact pairs (single ones round-robin over the facts) so any prefix covers every
    fact. Raises ValueError when fewer than `n` unique pairs exist."""
    rng = random.Random(seed)

    def asked(fact: Fact) -> list[tuple[str, str]]:
        statement = fact.relation.statement.format(s=fact.subject, v=fact.value)
        forms = [(prefix.format(s=fact.subject) + q.format(s=fact.subject), answer)
                 for q in fact.relation.train_questions for prefix in ASK_PREFIXES for answer in (fact.value, statement)]
        rng.shuffle(forms)
        return forms

    per_fact = [asked(fact) for fact in facts]
    single = [pair for group in zip(*per_fact) for pair in group]  # round-robin over the facts
    combined = []
    for first in facts:
        for second in facts:
            if first is second:
                continue
            statements = [f.relation.statement.format(s=f.subject, v=f.value) for f in (first, second)]
            for q1 in first.relation.train_questions:
                for q2 in second.relation.train_questions:
                    for form in COMBINED:
                        question = form.format(q1=q1.format(s=first.subject), q2=q2.format(s=second.subject))
                        combined.append((question, f"{first.value}; {second.value}"))
                        combined.append((question, " ".join(statements)))
    rng.shuffle(combined)
    merged = [pair for both in zip(single, combined) for pair in both]
    merged += single[len(combined):] + combined[len(single):]
    unique = list(dict.fromkeys(merged))
    if len(unique) < n:
        raise ValueError(f"task.train_pairs_per_context={n}: only {len(unique)} unique pairs exist for "
                         f"{len(facts)} facts (raise task.facts_per_context or lower the count)")
    return unique[:n]


def world_pairs(knowledge: Knowledge, n: int) -> list[tuple[str, str]] | None:
    """`qa_pairs` for a context of this world (its `meta` names the kind and the facts), the same pairs the
    task gives with `train_pairs_per_context = n`; None for knowledge from elsewhere."""
    kind, facts = knowledge.meta.get("kind"), knowledge.meta.get("facts")
    if kind not in KINDS or not facts or not all(isinstance(f, dict) and "relation" in f for f in facts):
        return None
    relations = relations_of(kind)
    return qa_pairs([Fact(f["subject"], relations[f["relation"]], f["value"]) for f in facts], n,
                    seed=f"pairs/{knowledge.id}")
