"""What the side-effect probes derive from a generated context (docs/side_effects.md): near-miss
questions, whose correct answer is *not* the injected one, and updates that re-state every fact with a
new value (conflict probes). Each is seeded by the data seed and the context id, never by the order in
which contexts are visited.
"""
from __future__ import annotations

import random
from collections.abc import Sequence

from core.types import Knowledge, Probe, Query
from core.world.pairs import Fact, qa_pairs
from core.world.relations import KINDS, NEAR_RELATIONS, relations_of
from core.world.vocab import draw_subject, draw_value
from metrics.side_effects import mentions
from tasks.qa_item import QAItem
from tasks.world.generate import facts_of

UPDATE_INTRO = "A later record corrects the earlier facts about {s}."


def fresh_value(value_kind: str, rng: random.Random, avoid: Sequence[str]) -> str:
    """A generated value of `value_kind` that neither mentions nor is mentioned by any of `avoid`."""
    for _ in range(1000):
        value = draw_value(value_kind, rng)
        if not any(mentions(value, a) or mentions(a, value) for a in avoid):
            return value
    raise ValueError(f"could not draw a {value_kind} value different from {list(avoid)}")


def fresh_subject(kind: str, rng: random.Random, taken: set[str]) -> str:
    """A new entity name of `kind` not in `taken` (added to it)."""
    while True:
        subject = draw_subject(kind, rng)
        if subject not in taken:
            taken.add(subject)
            return subject


def taken_names(items: Sequence[QAItem]) -> set[str]:
    """Every subject and value the contexts state: near-miss subjects must be none of them."""
    return {text for item in items for fact in item.knowledge.meta.get("facts", ())
            for text in (fact["subject"], fact["value"])}


def near_miss_probes(item: QAItem, prompt_template: str, seed: int, taken: set[str]) -> list[Probe]:
    """Two near-miss probes per fact of `item` (other subject, other relation); deterministic in
    (`seed`, context id, `taken`). New subjects are added to `taken`."""
    kind, facts = facts_of(item, "near_miss")
    relations = relations_of(kind)
    rng = random.Random(f"near-miss/{seed}/{item.knowledge.id}")
    values = [fact["value"] for fact in facts]
    probes = []
    for index, fact in enumerate(facts):
        relation, injected = relations[fact["relation"]], fact["value"]
        near = NEAR_RELATIONS.get((kind, relation.name))
        if near is None:
            raise ValueError(f"no near-miss relation for {kind}.{relation.name}: add one to core.world.relations.NEAR_RELATIONS")
        other = fresh_subject(kind, rng, taken)
        asked = [
            ("other_subject", relation.test_questions[0].format(s=other), relation.value, [injected]),
            ("other_relation", near.question.format(s=fact["subject"]), near.value, values),
        ]
        for probe_kind, question, value_kind, avoid in asked:
            probes.append(Probe(
                query=Query(id=f"{item.knowledge.id}/near{index}-{probe_kind}",
                            prompt=prompt_template.format(question=question), context=item.knowledge.context),
                answers=(fresh_value(value_kind, rng, avoid),),
                knowledge_id=item.knowledge.id,
                meta={"near_miss": probe_kind, "relation": relation.name, "injected": [injected]},
            ))
    return probes


def update_item(original: QAItem, seed: int, sentence_template: str, train_questions_per_fact: int,
                pairs_per_context: int = 0) -> QAItem:
    """A context that re-states every fact of `original` with a new value, with its training sentences
    (as many unique pairs as the originals have when `pairs_per_context > 0`, `qa_pairs`)
    and its test questions (the original's questions, new gold)."""
    kind, facts = facts_of(original, "conflict")
    relations = relations_of(kind)
    rng = random.Random(f"update/{seed}/{original.knowledge.id}")
    subject = facts[0]["subject"]
    named = ("the " + subject) if KINDS[kind][0].startswith("The {s}") else subject
    new_facts = [fact | {"value": fresh_value(relations[fact["relation"]].value, rng, [fact["value"]])} for fact in facts]
    statements = [relations[f["relation"]].statement.format(s=subject, v=f["value"]) for f in new_facts]
    if pairs_per_context:
        pairs = qa_pairs([Fact(subject, relations[f["relation"]], f["value"]) for f in new_facts], pairs_per_context,
                         seed=f"pairs/{original.knowledge.id}-update")
    else:
        pairs = [(question.format(s=subject), f["value"])
                 for f in new_facts for question in relations[f["relation"]].train_questions[:train_questions_per_fact]]
    sentences = tuple(sentence_template.format(question=q, answer=a) for q, a in pairs)
    asked = [(question.format(s=subject), old["value"], new["value"]) for old, new in zip(facts, new_facts)
             for question in relations[new["relation"]].test_questions]
    questions = tuple((question, (new,)) for question, _, new in asked)
    knowledge = Knowledge(
        id=f"{original.knowledge.id}-update",
        context=" ".join([UPDATE_INTRO.format(s=named)] + statements),
        train_sentences=sentences,
        meta={"kind": kind, "facts": new_facts, "updates": original.knowledge.id,
              "previous_answers": [old for _, old, _ in asked]},  # aligned with `questions`
    )
    return QAItem(knowledge, questions)
