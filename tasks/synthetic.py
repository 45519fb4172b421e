"""The embedded default task: a seeded generator of fictional entities and their facts.

Each context is a short paragraph about one invented entity (a town, person, invention, company or
river) stating `facts_per_context` facts. Every fact has question paraphrases split into two disjoint
pools: *training* phrasings (the task's own target sentences for FT(S) / SELF-PARAM) and *test*
phrasings (the held-out questions). `train_pairs_per_context = N > 0` replaces the few training
phrasings by N unique QA pairs per context (`qa_pairs`: prefixed paraphrases, questions combining two
facts, answers in short and in sentence form; never a test phrasing), the scale of the SELF-PARAM paper's
~500 generated pairs per context. Names are built from random syllables, so no model can know them;
a model reading the paragraph can. `python -m tasks.synthetic --out FILE` writes the data in the PwC
format (`input`, `prompt`, `answer` per line). `probes` adds side-effect probe families (near-miss
questions, drift; `tasks/probes.py`, docs/side_effects.md); the default `[qa]` asks the questions alone.
"""
from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from core.options import checked
from core.types import Answer, Knowledge, NonNegativeInt, PositiveInt, ProbeSet, Step, TargetScore
from tasks.base import ProbeResult
from tasks.context_qa import ContextQATask, QAItem

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "th", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x"]
MATERIALS = ["copper", "glass", "cedar", "slate", "amber", "tin", "marble", "bamboo", "clay", "silver"]
PRODUCTS = ["bells", "lanterns", "cheese", "rope", "violins", "maps", "clocks", "honey", "kites", "boots"]
PROFESSIONS = ["astronomer", "glassblower", "cartographer", "beekeeper", "clockmaker", "botanist", "violinist"]
PURPOSES = ["measuring rainfall", "sorting seeds", "cooling bread", "tuning bells", "drying ink", "counting sheep"]
WATERS = ["Lake", "Bay of", "Sea of", "Gulf of"]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


@dataclass(frozen=True)
class Relation:
    """A kind of fact: how it is stated, asked in training, and asked at test time."""

    name: str
    statement: str  # uses {s} (subject) and {v} (value)
    train_questions: tuple[str, ...]
    test_questions: tuple[str, ...]
    value: str  # which value pool: person, place, year, number, material, product, profession, purpose, water


# Entity kind -> (intro sentence, relations). Train and test phrasings never coincide.
KINDS: dict[str, tuple[str, tuple[Relation, ...]]] = {
    "town": (
        "{s} is a small town in the hills.",
        (
            Relation("founded_year", "{s} was founded in {v}.",
                     ("When was {s} founded?", "{s} was founded in which year?", "What is the founding year of {s}?"),
                     ("In what year was the town of {s} founded?",), "year"),
            Relation("founder", "The town was founded by {v}.",
                     ("Who founded {s}?", "{s} was founded by whom?", "Name the founder of {s}."),
                     ("Who was the founder of the town of {s}?",), "person"),
            Relation("river", "{s} lies on the banks of the {v} river.",
                     ("Which river flows through {s}?", "{s} lies on which river?", "Name the river of {s}."),
                     ("On the banks of which river does {s} lie?",), "place"),
            Relation("product", "{s} is famous for its {v}.",
                     ("What is {s} famous for?", "{s} is known for what?", "Which goods made {s} famous?"),
                     ("What is the town of {s} best known for?",), "product"),
            Relation("population", "About {v} people live in {s}.",
                     ("How many people live in {s}?", "What is the population of {s}?", "{s} has how many residents?"),
                     ("Roughly how many inhabitants does {s} have?",), "number"),
        ),
    ),
    "person": (
        "{s} is a figure remembered in local histories.",
        (
            Relation("birth_year", "{s} was born in {v}.",
                     ("When was {s} born?", "{s} was born in which year?", "What is the birth year of {s}?"),
                     ("In what year was {s} born?",), "year"),
            Relation("birthplace", "{s} was born in the village of {v}.",
                     ("Where was {s} born?", "{s} was born in which village?", "Name the birthplace of {s}."),
                     ("In which village was {s} born?",), "place"),
            Relation("profession", "{s} worked as a {v}.",
                     ("What was the profession of {s}?", "{s} worked as what?", "What job did {s} have?"),
                     ("What did {s} do for a living?",), "profession"),
            Relation("pet", "{s} kept a dog named {v}.",
                     ("What was the name of the dog of {s}?", "{s} had a dog called what?", "Name the dog of {s}."),
                     ("What was the dog of {s} called?",), "place"),
            Relation("instrument", "{s} built instruments out of {v}.",
                     ("What material did {s} build instruments from?", "{s} used which material?",
                      "Which material did {s} work with?"),
                     ("From what material were the instruments of {s} made?",), "material"),
        ),
    ),
    "invention": (
        "The {s} is an unusual machine.",
        (
            Relation("inventor", "The {s} was invented by {v}.",
                     ("Who invented the {s}?", "The {s} was invented by whom?", "Name the inventor of the {s}."),
                     ("Who was the inventor of the {s}?",), "person"),
            Relation("year", "It was first built in {v}.",
                     ("When was the {s} first built?", "The {s} was built in which year?",
                      "What year was the {s} first built?"),
                     ("In what year was the {s} first built?",), "year"),
            Relation("material", "The {s} is made of {v}.",
                     ("What is the {s} made of?", "The {s} is built from what?", "Which material is the {s} made of?"),
                     ("From what material is the {s} made?",), "material"),
            Relation("purpose", "The {s} is used for {v}.",
                     ("What is the {s} used for?", "The {s} serves what purpose?", "What does the {s} do?"),
                     ("For what purpose is the {s} used?",), "purpose"),
        ),
    ),
    "company": (
        "{s} is a family company.",
        (
            Relation("founder", "{s} was started by {v}.",
                     ("Who started {s}?", "{s} was started by whom?", "Name the founder of {s}."),
                     ("Who was the founder of the company {s}?",), "person"),
            Relation("headquarters", "Its headquarters are in the city of {v}.",
                     ("Where is {s} headquartered?", "Which city hosts the headquarters of {s}?",
                      "Name the headquarters city of {s}."),
                     ("In which city are the headquarters of {s}?",), "place"),
            Relation("product", "{s} makes {v}.",
                     ("What does {s} make?", "{s} produces what?", "What is the product of {s}?"),
                     ("What does the company {s} produce?",), "product"),
            Relation("employees", "{s} employs {v} people.",
                     ("How many people work at {s}?", "{s} has how many employees?", "What is the staff size of {s}?"),
                     ("How many employees does {s} have?",), "number"),
        ),
    ),
    "river": (
        "The {s} is a river in the north.",
        (
            Relation("length", "The {s} is {v} kilometres long.",
                     ("How long is the {s}?", "What is the length of the {s} in kilometres?",
                      "The {s} is how many kilometres long?"),
                     ("How many kilometres long is the {s} river?",), "number"),
            Relation("mouth", "The {s} flows into the {v}.",
                     ("Where does the {s} flow into?", "The {s} ends in which body of water?",
                      "Name the mouth of the {s}."),
                     ("Into which body of water does the {s} flow?",), "water"),
            Relation("source", "The {s} rises on Mount {v}.",
                     ("Where does the {s} rise?", "The {s} starts on which mountain?", "Name the source of the {s}."),
                     ("On which mountain does the {s} have its source?",), "place"),
            Relation("bridge", "The oldest bridge over the {s} was built in {v}.",
                     ("When was the oldest bridge over the {s} built?", "The oldest {s} bridge dates from which year?",
                      "What year is the oldest bridge on the {s} from?"),
                     ("In what year was the oldest bridge over the {s} built?",), "year"),
        ),
    ),
}


def _value(kind: str, rng: random.Random) -> str:
    if kind == "person":
        return f"{_word(rng, 2)} {_word(rng, 2)}"
    if kind == "place":
        return _word(rng, rng.choice([2, 3]))
    if kind == "year":
        return str(rng.randint(1600, 1990))
    if kind == "number":
        return str(rng.randint(12, 980) * rng.choice([10, 100]))
    if kind == "water":
        return f"{rng.choice(WATERS)} {_word(rng, 2)}"
    pools = {"material": MATERIALS, "product": PRODUCTS, "profession": PROFESSIONS, "purpose": PURPOSES}
    return rng.choice(pools[kind])


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: Relation
    value: str

    def as_dict(self) -> dict[str, str]:
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
    relations = {relation.name: relation for relation in KINDS[kind][1]}
    return qa_pairs([Fact(f["subject"], relations[f["relation"]], f["value"]) for f in facts], n,
                    seed=f"pairs/{knowledge.id}")


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
        subject = _word(rng, 3) if kind != "person" else _value("person", rng)
        while subject in used_subjects:
            subject = _word(rng, 3)
        used_subjects.add(subject)
        chosen = rng.sample(relations, min(facts_per_context, len(relations)))
        facts = [Fact(subject, relation, _value(relation.value, rng)) for relation in chosen]
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


class SyntheticTask(ContextQATask):
    """`task=synthetic`: the generated fictional-facts data set, single or batch injection."""

    name = "synthetic"

    @checked("task")
    def __init__(
        self,
        n_contexts: PositiveInt = 6,
        facts_per_context: PositiveInt = 4,
        train_questions_per_fact: NonNegativeInt = 3,
        train_pairs_per_context: NonNegativeInt = 0,
        data_seed: int = 0,
        sentence_template: str = "Question: {question}\nAnswer: {answer}\n",
        n_train_contexts: NonNegativeInt = 0,
        train_data_seed: int = 1,
        probes: list[Literal["qa", "near_miss", "conflict", "drift"]] | None = None,
        drift_text: str | None = None,
        drift_questions: str | None = None,
        **common,
    ) -> None:
        super().__init__(**common)
        max_train = min(len(r.train_questions) for _, rels in KINDS.values() for r in rels)
        if train_questions_per_fact > max_train:
            raise ValueError(f"task.train_questions_per_fact must be in [0, {max_train}]")
        self.n_contexts, self.facts_per_context = n_contexts, facts_per_context
        self.train_questions_per_fact, self.data_seed = train_questions_per_fact, data_seed
        self.train_pairs_per_context = train_pairs_per_context
        self.sentence_template = sentence_template
        if n_train_contexts and train_data_seed == data_seed:
            raise ValueError("task.train_data_seed must differ from task.data_seed (the training split must be held out)")
        self.n_train_contexts, self.train_data_seed = n_train_contexts, train_data_seed
        from tasks.probes import SideEffectProbes  # tasks.probes builds on this module's generator

        self.side_effects = SideEffectProbes(
            probes or ["qa"], prompt_template=self.prompt_template, generation=self.generation, seed=data_seed,
            drift_text=drift_text, drift_questions=drift_questions,
        )

    def load_items(self) -> list[QAItem]:
        return generate_items(
            self.n_contexts, self.facts_per_context, self.train_questions_per_fact, self.data_seed, self.sentence_template,
            self.train_pairs_per_context,
        )

    # ------------------------------------------------------------------ side-effect probes (task.probes)
    def steps(self) -> list[Step]:
        return self.side_effects.extend_steps(super().steps(), self.items)

    def score(self, probe_set: ProbeSet, outputs: Sequence[Answer | TargetScore]) -> list[dict[str, float]]:
        if self.side_effects.owns(probe_set):
            return self.side_effects.score(probe_set, outputs)
        return super().score(probe_set, outputs)

    def step_metrics(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        own, side = self.side_effects.split(results)
        return super().step_metrics(own) | self.side_effects.step_metrics(own, side)

    def summarize(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        own, side = self.side_effects.split(results)
        return super().summarize(own) | self.side_effects.summarize(own, side)

    def metric_protocols(self) -> dict[str, str]:
        return super().metric_protocols() | self.side_effects.protocols()

    def describe(self) -> dict[str, Any]:
        return super().describe() | ({"side_effects": self.side_effects.describe()} if self.side_effects.any else {})

    def training_knowledge(self) -> list[Knowledge]:
        """A held-out split for methods that train before any injection (e.g. RECIPE): `n_train_contexts`
        contexts generated with `train_data_seed` (never an evaluated subject), one `Knowledge` per fact,
        in the editing task's contract (tasks/editing.py). `context` is the whole paragraph, as this task
        injects it; `meta` asks the fact with its first training phrasing (`prompt`, `target`), lists its
        other training phrasings (`rephrase_prompts`) and, for locality, a question about a further
        generated context that is neither evaluated nor trained on. Test phrasings never occur."""
        n = self.n_train_contexts
        if not n:
            return []
        taken = {fact["subject"] for item in self.items for fact in item.knowledge.meta["facts"]}
        facts = max(len(relations) for _, relations in KINDS.values())
        pool = [item for item in generate_items(2 * n + len(taken), facts, 0, self.train_data_seed, "")
                if item.knowledge.meta["facts"][0]["subject"] not in taken]
        if len(pool) < 2 * n:
            raise ValueError(f"task.n_train_contexts={n}: could not generate enough held-out contexts")
        relations = {kind: {r.name: r for r in rels} for kind, (_, rels) in KINDS.items()}
        ask = lambda question, subject: self.prompt_template.format(question=question.format(s=subject))  # noqa: E731
        spare: dict[str, list[QAItem]] = {}  # locality subjects: unused contexts, by kind (same-relation questions)
        for item in pool[n:]:
            spare.setdefault(item.knowledge.meta["kind"], []).append(item)
        knowledge = []
        for index, item in enumerate(pool[:n]):
            # the paragraph states `facts_per_context` facts, like the evaluated ones
            kind = item.knowledge.meta["kind"]
            same_kind = spare.get(kind) or pool[n:]
            neighbour = same_kind[index % len(same_kind)]
            stated = item.knowledge.meta["facts"][: self.facts_per_context]
            context = " ".join([KINDS[kind][0].format(s=stated[0]["subject"])] + [
                relations[kind][f["relation"]].statement.format(s=f["subject"], v=f["value"]) for f in stated])
            others = neighbour.knowledge.meta["facts"]
            for fact in stated:
                relation = relations[kind][fact["relation"]]
                other = next((f for f in others if f["relation"] == fact["relation"]), others[0])
                other_question = relations[neighbour.knowledge.meta["kind"]][other["relation"]].train_questions[0]
                knowledge.append(Knowledge(
                    id=f"syn-train{self.train_data_seed}-{index}/{fact['relation']}",
                    context=context,
                    meta={
                        "prompt": ask(relation.train_questions[0], fact["subject"]),
                        "target": " " + fact["value"],
                        "target_new": fact["value"],
                        "rephrase_prompts": [ask(q, fact["subject"]) for q in relation.train_questions[1:]],
                        "locality_prompts": [ask(other_question, other["subject"])],
                        "locality_answers": [other["value"]],
                        "subject": fact["subject"],
                        "ground_truth": None,
                    },
                ))
        return knowledge


def main() -> None:
    parser = argparse.ArgumentParser(description="Write the synthetic data set in the PwC JSONL format.")
    parser.add_argument("--out", required=True)
    parser.add_argument("--n-contexts", type=int, default=6)
    parser.add_argument("--facts-per-context", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    items = generate_items(args.n_contexts, args.facts_per_context, 3, args.seed, "Question: {question}\nAnswer: {answer}\n")
    with open(args.out, "w", encoding="utf-8") as handle:
        for item in items:
            for question, answers in item.questions:
                handle.write(json.dumps({"input": item.knowledge.context, "prompt": question, "answer": answers[0]}) + "\n")


if __name__ == "__main__":
    main()
