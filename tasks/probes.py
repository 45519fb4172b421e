"""Side-effect probes of the synthetic and sequential tasks: `task.probes=[qa, near_miss, conflict, drift]`.

`qa` is the task's own questions (always on). The other families (definitions in metrics/side_effects.py,
guide in docs/side_effects.md):
- `near_miss`: after each context is injected, two questions per stated fact whose correct answer is
  *not* the injected one: the same relation about a never-injected subject of the same kind
  (`other_subject`), and a relation the generator never states about the injected subject
  (`other_relation`, `NEAR_RELATIONS`). Seeded by the data seed and the context id; each probe's gold is a
  fresh generated value that never equals the injected answer, and `meta.injected` is the answer a leak
  would repeat. Metric: `near_miss/leak_rate`.
- `conflict` (task=sequential only): the last `conflict_updates` contexts of each sequence re-state every
  fact of the first ones with new values ("A later record corrects ..."). The updates' own questions are
  the originals' questions with the new gold; asked after the update is injected they give
  `conflict/update_acc`, `stale_rate` and `mixed_rate`.
- `drift`: a reference step before any injection (index 0) scores a fixed generic text
  (`loglikelihood_bare`: the weights as served, without the method's prompt augmentation, see
  `Method.score_bare`) and asks fixed unrelated questions through the method (teacher-forced and
  generated). Every step that injects asks them again: perplexity and next-token accuracy ratios after /
  before, and agreement with the answers before injection. The unrelated questions carry the step's
  injected contexts as their `Query.context` (what `method=context` shows), as the editing task does.
"""
from __future__ import annotations

import dataclasses
import logging
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.io import FirstSeen, read_lines
from core.types import Answer, DataError, GenerationSpec, Knowledge, Probe, ProbeSet, Query, Step, TargetScore
from metrics import editing, qa
from metrics import side_effects as metrics
from tasks.base import ProbeResult, mean_metrics
from tasks.context_qa import ContextQATask, QAItem
from tasks.synthetic import KINDS, Fact, Relation, SyntheticTask, _value, _word, qa_pairs

log = logging.getLogger(__name__)

FAMILIES = ("qa", "near_miss", "conflict", "drift")
DATA = Path(__file__).resolve().parent / "data"
GENERIC_TEXT = DATA / "generic_text.txt"
GENERAL_QUESTIONS = DATA / "general_questions.tsv"
QUESTIONS_FORMAT = "one 'question<TAB>answer' pair per line ('#' lines and empty lines are ignored)"

SCORER = "side_effects"
NEAR_MISS = "near_miss"
DRIFT_TEXT, GENERAL_TF, GENERAL_GEN = "drift/generic_text", "drift/general_tf", "drift/general_gen"
REFERENCE = "drift/before_injection"  # prefix of the reference step's probe sets
UPDATE_INTRO = "A later record corrects the earlier facts about {s}."


@dataclass(frozen=True)
class NearRelation:
    """A relation the generator never states: asked only as a near-miss question."""

    question: str  # uses {s}
    value: str  # value pool of its (unknowable) gold answer, as `Relation.value`


# (kind, stated relation) -> a never-stated relation of the same value kind about the same subject
NEAR_RELATIONS: dict[tuple[str, str], NearRelation] = {
    ("town", "founded_year"): NearRelation("In what year did {s} open its first school?", "year"),
    ("town", "founder"): NearRelation("Who was the first mayor of {s}?", "person"),
    ("town", "river"): NearRelation("What is the name of the main square of {s}?", "place"),
    ("town", "product"): NearRelation("What does {s} buy from its neighbours?", "product"),
    ("town", "population"): NearRelation("How many houses are there in {s}?", "number"),
    ("person", "birth_year"): NearRelation("In what year did {s} die?", "year"),
    ("person", "birthplace"): NearRelation("In which village did {s} die?", "place"),
    ("person", "profession"): NearRelation("What was the profession of the father of {s}?", "profession"),
    ("person", "pet"): NearRelation("What was the name of the cat of {s}?", "place"),
    ("person", "instrument"): NearRelation("What material did {s} build furniture from?", "material"),
    ("invention", "inventor"): NearRelation("Who sold the first {s}?", "person"),
    ("invention", "year"): NearRelation("In what year was the {s} last repaired?", "year"),
    ("invention", "material"): NearRelation("What is the box of the {s} made of?", "material"),
    ("invention", "purpose"): NearRelation("What was the {s} used for before it was improved?", "purpose"),
    ("company", "founder"): NearRelation("Who runs {s} today?", "person"),
    ("company", "headquarters"): NearRelation("In which city did {s} open its second shop?", "place"),
    ("company", "product"): NearRelation("What does {s} buy from other companies?", "product"),
    ("company", "employees"): NearRelation("How many customers does {s} have?", "number"),
    ("river", "length"): NearRelation("How many fish species live in the {s}?", "number"),
    ("river", "mouth"): NearRelation("Which lake feeds the {s}?", "water"),
    ("river", "source"): NearRelation("Which village lies at the mouth of the {s}?", "place"),
    ("river", "bridge"): NearRelation("In what year was the newest bridge over the {s} built?", "year"),
}


# ---------------------------------------------------------------------------------------------- data files
def load_generic_text(path: str | Path | None = None) -> list[str]:
    """The drift sentences (default: the packaged `tasks/data/generic_text.txt`); a repeated sentence is
    kept once (it would weigh twice in the perplexity ratio), with a warning naming both lines."""
    path = Path(path) if path else GENERIC_TEXT
    fmt = "one sentence per line ('#' lines and empty lines are ignored)"
    first: dict[str, int] = {}
    for number, line in read_lines(path, fmt, comments=True):
        if line in first:
            log.warning("%s:%d: repeats the sentence of line %d; kept once", path, number, first[line])
            continue
        first[line] = number
    if not first:
        raise DataError(f"{path}: no sentences; expected {fmt}")
    return list(first)


def load_general_questions(path: str | Path | None = None) -> list[tuple[str, str]]:
    """The unrelated (question, answer) pairs (default: the packaged `tasks/data/general_questions.tsv`).
    A line without a question and a non-empty answer is refused naming file:line (an empty gold would
    always agree); a question asked twice is refused naming both lines (its reference would alias)."""
    path = Path(path) if path else GENERAL_QUESTIONS
    pairs, seen = [], FirstSeen("question")
    for number, line in read_lines(path, QUESTIONS_FORMAT, comments=True):
        fields = [field.strip() for field in line.split("\t")]
        if len(fields) != 2 or not all(fields):
            raise DataError(f"{path}:{number}: {line!r} is not a question and a non-empty answer; expected {QUESTIONS_FORMAT}")
        seen.add(fields[0], f"{path}:{number}")
        pairs.append((fields[0], fields[1]))
    if not pairs:
        raise DataError(f"{path}: no questions; expected {QUESTIONS_FORMAT}")
    return pairs


# ---------------------------------------------------------------------------------------------- generators
def _relations(kind: str) -> dict[str, Relation]:
    return {relation.name: relation for relation in KINDS[kind][1]}


def _facts(item: QAItem, family: str) -> tuple[str, list[dict[str, str]]]:
    meta = item.knowledge.meta
    if "facts" not in meta or meta.get("kind") not in KINDS:
        raise DataError(f"{family} probes need generated facts (task=synthetic as the source), but context "
                        f"{item.knowledge.id!r} has none; use task.probes=[qa,drift] with this data")
    return meta["kind"], meta["facts"]


def _fresh_value(value_kind: str, rng: random.Random, avoid: Sequence[str]) -> str:
    """A generated value of `value_kind` that neither mentions nor is mentioned by any of `avoid`."""
    for _ in range(1000):
        value = _value(value_kind, rng)
        if not any(metrics.mentions(value, a) or metrics.mentions(a, value) for a in avoid):
            return value
    raise ValueError(f"could not draw a {value_kind} value different from {list(avoid)}")


def _fresh_subject(kind: str, rng: random.Random, taken: set[str]) -> str:
    while True:
        subject = _value("person", rng) if kind == "person" else _word(rng, 3)
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
    kind, facts = _facts(item, "near_miss")
    relations = _relations(kind)
    rng = random.Random(f"near-miss/{seed}/{item.knowledge.id}")
    values = [fact["value"] for fact in facts]
    probes = []
    for index, fact in enumerate(facts):
        relation, injected = relations[fact["relation"]], fact["value"]
        near = NEAR_RELATIONS.get((kind, relation.name))
        if near is None:
            raise ValueError(f"no near-miss relation for {kind}.{relation.name}: add one to tasks.probes.NEAR_RELATIONS")
        other = _fresh_subject(kind, rng, taken)
        asked = [
            ("other_subject", relation.test_questions[0].format(s=other), relation.value, [injected]),
            ("other_relation", near.question.format(s=fact["subject"]), near.value, values),
        ]
        for probe_kind, question, value_kind, avoid in asked:
            probes.append(Probe(
                query=Query(id=f"{item.knowledge.id}/near{index}-{probe_kind}",
                            prompt=prompt_template.format(question=question), context=item.knowledge.context),
                answers=(_fresh_value(value_kind, rng, avoid),),
                knowledge_id=item.knowledge.id,
                meta={"near_miss": probe_kind, "relation": relation.name, "injected": [injected]},
            ))
    return probes


def update_item(original: QAItem, seed: int, sentence_template: str, train_questions_per_fact: int,
                pairs_per_context: int = 0) -> QAItem:
    """A context that re-states every fact of `original` with a new value, with its training sentences
    (as many unique pairs as the originals have when `pairs_per_context > 0`, `tasks.synthetic.qa_pairs`)
    and its test questions (the original's questions, new gold)."""
    kind, facts = _facts(original, "conflict")
    relations = _relations(kind)
    rng = random.Random(f"update/{seed}/{original.knowledge.id}")
    subject = facts[0]["subject"]
    named = ("the " + subject) if KINDS[kind][0].startswith("The {s}") else subject
    new_facts = [fact | {"value": _fresh_value(relations[fact["relation"]].value, rng, [fact["value"]])} for fact in facts]
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


# ---------------------------------------------------------------------------------------------- the probes
class SideEffectProbes:
    """The side-effect families a task switched on: their probe sets, their scoring and aggregates.

    The task keeps calling its own logic for `qa` and hands this object the rest: `extend_steps` adds
    the reference step and the per-step probe sets, `owns` / `score` handle those probe sets,
    `split` separates their results from the task's, `step_metrics` / `summarize` aggregate them.
    State (the references before injection) is filled by `score` in step order, as in task=editing, so
    offline rescoring and resumed runs rebuild it the same way.
    """

    def __init__(
        self,
        families: Sequence[str],
        *,
        prompt_template: str,
        generation: GenerationSpec,
        seed: int,
        drift_text: str | None = None,
        drift_questions: str | None = None,
        conflict_allowed: bool = False,
    ) -> None:
        unknown = [f for f in families if f not in FAMILIES]
        if unknown:
            raise ValueError(f"task.probes: unknown probe family {unknown}; known: {list(FAMILIES)}")
        if "qa" not in families:
            raise ValueError(f"task.probes must include qa (the task's own questions), got {list(families)}")
        if "conflict" in families and not conflict_allowed:
            raise ValueError("task.probes: conflict needs sequences in which a later context updates an earlier one; "
                             "use task=sequential with task.probes=[qa,conflict]")
        self.families = tuple(dict.fromkeys(families))
        self.prompt_template, self.generation, self.seed = prompt_template, generation, seed
        self.drift_text, self.drift_questions = drift_text, drift_questions
        if "drift" in self.families:  # read now: a bad file fails when the task is built
            self.sentences = load_generic_text(drift_text)
            self.questions = load_general_questions(drift_questions)
        self.conflicts: dict[str, tuple[str, str]] = {}  # update probe id -> (old, new)
        self._reference_ids: dict[int, tuple[int, ...]] = {}
        self._reference_answers: dict[int, str] = {}
        self._text_by_step: dict[int, dict[str, float]] = {}

    def on(self, family: str) -> bool:
        return family in self.families

    @property
    def any(self) -> bool:
        return len(self.families) > 1

    # ------------------------------------------------------------------ steps
    def updates_of(self, originals: Sequence[QAItem], source: ContextQATask) -> list[QAItem]:
        """Update contexts for `originals` of the synthetic `source` (conflict family), written with its
        sentence template; their probes' old and new values are remembered for scoring."""
        if not isinstance(source, SyntheticTask):
            raise DataError(f"conflict probes need generated facts to update (task.source = synthetic), "
                            f"not {type(source).__name__}")
        updates = [update_item(item, self.seed, source.sentence_template, source.train_questions_per_fact,
                               source.train_pairs_per_context) for item in originals]
        for update in updates:  # probe ids as ContextQATask.probes_of numbers them
            for index, (old, (_, golds)) in enumerate(zip(update.knowledge.meta["previous_answers"], update.questions)):
                self.conflicts[f"{update.knowledge.id}/q{index}"] = (old, golds[0])
        return updates

    def extend_steps(self, steps: Sequence[Step], items: Sequence[QAItem]) -> list[Step]:
        """`steps` with the side-effect probe sets added (after each injection) and, with drift, a reference
        step first; steps are renumbered. `items` are every context the steps inject."""
        if not (self.on("near_miss") or self.on("drift")):
            return list(steps)
        taken = taken_names(items)
        near_miss = {item.knowledge.id: near_miss_probes(item, self.prompt_template, self.seed, taken)
                     for item in items} if self.on("near_miss") else {}
        out: list[Step] = []
        if self.on("drift"):
            out.append(Step(index=0, knowledge=[], probe_sets=self._drift_sets(0, None, [], REFERENCE + "/"),
                            reset_before=True, label="before any injection (drift reference)"))
        previous: int | None = None  # the last step that measured drift since the method was reset
        for step in steps:
            index = len(out)
            sets = list(step.probe_sets)
            if step.reset_before:
                previous = None
            if step.knowledge and near_miss:
                sets.append(ProbeSet(NEAR_MISS, [p for k in step.knowledge for p in near_miss[k.id]],
                                     generation=self.generation, scorer=SCORER))
            if step.knowledge and self.on("drift"):
                sets += self._drift_sets(index, previous, step.knowledge, "drift/")
                previous = index
            out.append(dataclasses.replace(step, index=index, probe_sets=[s for s in sets if s.probes]))
        return out

    def _drift_sets(self, step: int, before: int | None, knowledge: Sequence[Knowledge], prefix: str) -> list[ProbeSet]:
        meta = {"drift_step": step, "drift_before": before}
        in_view = " ".join(k.context for k in knowledge)  # what method=context shows with an unrelated question
        text = [Probe(Query(id=f"drift/text{i}", prompt=""), answers=(sentence,), meta=meta)
                for i, sentence in enumerate(self.sentences)]

        def ask(i: int, question: str, answer: str) -> Probe:
            query = Query(id=f"drift/general{i}", prompt=self.prompt_template.format(question=question), context=in_view)
            return Probe(query, answers=(answer,), meta=meta | {"question": i})

        tf = [dataclasses.replace(ask(i, q, a), answers=(" " + a,)) for i, (q, a) in enumerate(self.questions)]
        gen = [ask(i, q, a) for i, (q, a) in enumerate(self.questions)]
        return [
            ProbeSet(prefix + "generic_text", text, output_type="loglikelihood_bare", scorer=SCORER),
            ProbeSet(prefix + "general_tf", tf, output_type="loglikelihood", scorer=SCORER),
            ProbeSet(prefix + "general_gen", gen, generation=self.generation, scorer=SCORER),
        ]

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def owns(probe_set: ProbeSet) -> bool:
        return probe_set.scorer == SCORER

    def score(self, probe_set: ProbeSet, outputs: Sequence[Answer | TargetScore]) -> list[dict[str, float]]:
        name = probe_set.name
        reference = name.startswith(REFERENCE + "/")
        kind = name.rsplit("/", 1)[-1]
        if name == NEAR_MISS:
            rows = []
            for probe, out in zip(probe_set.probes, outputs):
                leaked = metrics.leak(out.text, probe.meta["injected"])
                rows.append({"near_miss/leak_rate": leaked, f"near_miss/leak_rate_{probe.meta['near_miss']}": leaked})
            return rows
        if kind == "generic_text":
            step = probe_set.probes[0].meta["drift_step"]
            self._text_by_step[step] = metrics.text_scores((o.logprob, o.n_tokens, o.token_accuracy) for o in outputs)
            return [{"drift/sentence_nll_per_token": -o.logprob / max(o.n_tokens, 1)} for o in outputs]
        if kind == "general_tf":
            rows = []
            for probe, out in zip(probe_set.probes, outputs):
                ids = _predicted_ids(out, probe)
                if reference:
                    self._reference_ids[probe.meta["question"]] = ids
                    rows.append({"drift/general_answer_token_acc_before": out.token_accuracy})
                else:
                    rows.append({"drift/general_agreement_tf": editing.locality_agreement(self._reference(probe, self._reference_ids), ids)})
            return rows
        if kind == "general_gen":
            rows = []
            for probe, out in zip(probe_set.probes, outputs):
                f1 = qa.token_f1(out.text, probe.answers[0])
                if reference:
                    self._reference_answers[probe.meta["question"]] = out.text
                    rows.append({"drift/general_qa_f1_before": f1})
                else:
                    before = self._reference(probe, self._reference_answers)
                    rows.append({"drift/general_agreement_gen": metrics.answer_agreement(before, out.text),
                                 "drift/general_qa_f1": f1})
            return rows
        raise NotImplementedError(f"no side-effect scorer for probe set {name!r}")

    @staticmethod
    def _reference(probe: Probe, store: dict[int, Any]) -> Any:
        if probe.meta["question"] not in store:
            raise DataError(f"no answer before injection for {probe.query.id!r}: the drift reference step must run first")
        return store[probe.meta["question"]]

    def conflict_scores(self, probe: Probe, output: Answer) -> dict[str, float]:
        """Conflict metrics of one answer to an updated fact (empty for any other probe)."""
        pair = self.conflicts.get(probe.query.id)
        return metrics.conflict_scores(output.text, *pair) if pair else {}

    # ------------------------------------------------------------------ aggregation
    @staticmethod
    def split(results: Sequence[ProbeResult]) -> tuple[list[ProbeResult], list[ProbeResult]]:
        """(the task's own results, side-effect results) by probe set."""
        own, side = [], []
        for result in results:
            (side if result.probe_set == NEAR_MISS or result.probe_set.startswith("drift/") else own).append(result)
        return own, side

    def _drift_step(self, step: int, before: int | None) -> dict[str, float]:
        """Drift of one injection step against the untouched model and against the model before the step."""
        now, untouched = self._text_by_step[step], self._text_by_step.get(0)
        if untouched is None:
            raise DataError("the drift reference step (before any injection) has not been scored")
        prior = untouched if before is None else self._text_by_step[before]
        return {"drift/ppl": now["ppl"], "drift/next_token_acc": now["next_token_acc"],
                "drift/ppl_ratio": metrics.ratio(now["ppl"], untouched["ppl"]),
                "drift/next_token_acc_ratio": metrics.ratio(now["next_token_acc"], untouched["next_token_acc"]),
                "drift/ppl_step_ratio": metrics.ratio(now["ppl"], prior["ppl"])}

    def step_metrics(self, own: Sequence[ProbeResult], side: Sequence[ProbeResult]) -> dict[str, float]:
        """Leak rates, conflict rates, drift (absolute, ratios) and agreement of one step's results
        (`own`: the task's own, which carry the conflict metrics; `side`: the side-effect probe sets')."""
        out = {k: v for k, v in mean_metrics(own).items() if k.startswith("conflict/")}
        out |= mean_metrics(r for r in side if not r.probe_set.endswith("generic_text"))
        text = [r for r in side if r.probe_set.endswith("generic_text")]
        if text:
            meta = text[0].probe.meta
            if meta["drift_step"] == 0:
                values = self._text_by_step[0]
                out |= {"drift/ppl_before": values["ppl"], "drift/next_token_acc_before": values["next_token_acc"]}
            else:
                out |= self._drift_step(meta["drift_step"], meta["drift_before"])
        return out

    def summarize(self, own: Sequence[ProbeResult], side: Sequence[ProbeResult]) -> dict[str, float]:
        """Run-level side-effect metrics: means over probes (leak, conflict, agreement) and over injection
        steps (drift ratios); the values before injection are kept for reference."""
        summary: dict[str, float] = {}
        if self.on("near_miss"):
            summary |= mean_metrics(r for r in side if r.probe_set == NEAR_MISS)
        if self.on("conflict"):
            summary |= {k: v for k, v in mean_metrics(own).items() if k.startswith("conflict/")}
        if self.on("drift"):
            steps: dict[int, int | None] = {}
            for result in side:
                if result.probe_set == "drift/generic_text":
                    steps[result.probe.meta["drift_step"]] = result.probe.meta["drift_before"]
            per_step = defaultdict(list)
            for step, before in sorted(steps.items()):
                for key, value in self._drift_step(step, before).items():
                    per_step[key].append(value)
            summary |= {key: sum(values) / len(values) for key, values in per_step.items()
                        if key in ("drift/ppl_ratio", "drift/next_token_acc_ratio")}
            summary |= {k: v for k, v in mean_metrics(side).items()
                        if k in ("drift/general_agreement_tf", "drift/general_agreement_gen", "drift/general_qa_f1",
                                 "drift/general_qa_f1_before")}
            summary["drift/ppl_before"] = self._text_by_step[0]["ppl"]
        return summary

    def protocols(self) -> dict[str, str]:
        keys = [k for k in metrics.PROTOCOLS if k.split("/")[0] in self.families]
        out = {k: metrics.PROTOCOLS[k] for k in keys}
        if self.on("drift"):
            out |= {"drift/ppl_before": "loglikelihood_bare/perplexity of the generic text before any injection",
                    "drift/general_qa_f1_before": "generate/squad-token-f1 on the unrelated questions before any injection"}
        return out

    def describe(self) -> dict[str, Any]:
        info: dict[str, Any] = {"probes": list(self.families)}
        if self.on("drift"):
            info |= {"drift_sentences": len(self.sentences), "drift_questions": len(self.questions),
                     "drift_text": str(self.drift_text or GENERIC_TEXT), "drift_questions_file":
                     str(self.drift_questions or GENERAL_QUESTIONS)}
        if self.on("conflict"):
            info["conflict_probes"] = len(self.conflicts)
        return info


def _predicted_ids(output: TargetScore, probe: Probe) -> tuple[int, ...]:
    if not isinstance(output, TargetScore) or not output.predicted_ids:
        raise DataError(f"{probe.query.id}: base agreement needs the argmax tokens (TargetScore.predicted_ids); "
                        "a method whose score() builds its own logits must fill them")
    return tuple(output.predicted_ids)
