"""Generating the fictional world's contexts: entities with their facts as context-QA items.

A context is a short paragraph about one invented entity (town, person, invention, company, river)
stating some of its kind's relations (`core.world.relations.KINDS`). Its training split is either
phrasings per fact or unique pairs from `core.world.pairs.qa_pairs`; its test questions use the
held-out phrasings only.
"""
from __future__ import annotations

import random

from core.types import DataError, Knowledge
from core.world.pairs import Fact, qa_pairs
from core.world.relations import KINDS, relations_of
from core.world.vocab import draw_subject, draw_value, make_name
from tasks.qa_item import QAItem


def generate_items(
    n_contexts: int,
    facts_per_context: int,
    train_questions_per_fact: int,
    seed: int,
    sentence_template: str,
    pairs_per_context: int = 0,
) -> list[QAItem]:
    """Deterministic in `seed`: the same arguments always give the same contexts and questions.
    `pairs_per_context > 0`: the training sentences are that many unique pairs (`qa_pairs`) instead of
    `train_questions_per_fact` phrasings per fact; the contexts and test questions do not change."""
    rng = random.Random(seed)
    kinds = sorted(KINDS)
    items, used_subjects = [], set()
    for index in range(n_contexts):
        kind = kinds[index % len(kinds)]
        intro, relations = KINDS[kind]
        subject = draw_subject(kind, rng)
        while subject in used_subjects:  # a clash draws a one-name subject even for a person (pinned data)
            subject = make_name(rng, 3)
        used_subjects.add(subject)
        chosen = rng.sample(relations, min(facts_per_context, len(relations)))
        facts = [Fact(subject, relation, draw_value(relation.value, rng)) for relation in chosen]
        context = " ".join([intro.format(s=subject)] + [f.relation.statement.format(s=subject, v=f.value) for f in facts])
        if pairs_per_context:  # an rng of its own: the contexts stay those of the same seed without pairs
            pairs = qa_pairs(facts, pairs_per_context, seed=f"pairs/syn{seed}-{index}")
        else:
            pairs = [(q.format(s=subject), f.value) for f in facts for q in f.relation.train_questions[:train_questions_per_fact]]
        sentences = tuple(sentence_template.format(question=q, answer=a) for q, a in pairs)
        questions = tuple((q.format(s=subject), (f.value,)) for f in facts for q in f.relation.test_questions)
        knowledge = Knowledge(
            id=f"syn{seed}-{index}",
            context=context,
            train_sentences=sentences,
            meta={"kind": kind, "facts": [f.as_dict() for f in facts]},
        )
        items.append(QAItem(knowledge, questions))
    return items


def facts_of(item: QAItem, family: str) -> tuple[str, list[dict[str, str]]]:
    """(entity kind, stated facts as dicts) of a context this world generated. Raises DataError, naming
    `family` (what needs them, e.g. "near_miss"), for a context from other data."""
    meta = item.knowledge.meta
    if "facts" not in meta or meta.get("kind") not in KINDS:
        raise DataError(f"{family} probes need generated facts (task=synthetic as the source), but context "
                        f"{item.knowledge.id!r} has none; use task.probes=[qa,drift] with this data")
    return meta["kind"], meta["facts"]
