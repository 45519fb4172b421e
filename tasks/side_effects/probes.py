"""`SideEffectProbes`: the side-effect families a task switched on (`task.probes`), their probe sets,
scoring and aggregates; the families are described in the package docstring and docs/side_effects.md.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

from core.types import Answer, DataError, GenerationSpec, Knowledge, Probe, ProbeSet, Query, Step, TargetScore
from metrics import editing, qa
from metrics import side_effects as side_effect_metrics
from tasks.base import ProbeResult, mean_metrics
from tasks.qa_item import QAItem
from tasks.side_effects.drift_data import GENERAL_QUESTIONS, GENERIC_TEXT, load_general_questions, load_generic_text
from tasks.world.variants import near_miss_probes, taken_names, update_item

FAMILIES = ("qa", "near_miss", "conflict", "drift")
NEAR_MISS = "near_miss"
REFERENCE = "drift/before_injection"  # prefix of the reference step's probe sets


class SideEffectProbe(StrEnum):
    """What a side-effect probe set measures, as its `ProbeSet.scorer`: scoring dispatches on it, never
    on the set's name. `*_BEFORE`: the drift reference step's questions, which later steps compare with."""

    NEAR_MISS = "side_effects/near_miss"
    TEXT = "side_effects/drift_text"
    GENERAL_TF_BEFORE = "side_effects/drift_general_tf_before"
    GENERAL_TF = "side_effects/drift_general_tf"
    GENERAL_GEN_BEFORE = "side_effects/drift_general_gen_before"
    GENERAL_GEN = "side_effects/drift_general_gen"


KINDS = frozenset(SideEffectProbe)


class SideEffectProbes:
    """The side-effect families a task switched on: their probe sets, their scoring and aggregates.

    The task keeps calling its own logic for `qa` and hands this object the rest: `extend_steps` adds
    the reference step and the per-step probe sets, `owns` / `process_results` handle those probe sets,
    `split` separates their results from the task's, `step_metrics` / `summarize` aggregate them.
    Scoring keeps no state: the references before injection are read from the earlier results passed
    in (`tasks.base`), so offline rescoring and resumed runs need no replay in order.
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

    def on(self, family: str) -> bool:
        return family in self.families

    @property
    def any(self) -> bool:
        return len(self.families) > 1

    # ------------------------------------------------------------------ steps
    def updates_of(self, originals: Sequence[QAItem], sentence_template: str, train_questions_per_fact: int,
                   pairs_per_context: int = 0) -> list[QAItem]:
        """Update contexts for `originals` (conflict family; `tasks.world.variants.update_item`), with
        training sentences written as the source writes its own; their probes' old and new values are
        remembered for scoring. Raises DataError for contexts the fictional world did not generate."""
        updates = [update_item(item, self.seed, sentence_template, train_questions_per_fact, pairs_per_context)
                   for item in originals]
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
            out.append(Step(index=0, knowledge=[], probe_sets=self._drift_sets(0, None, [], reference=True),
                            reset_before=True, label="before any injection (drift reference)"))
        previous: int | None = None  # the last step that measured drift since the method was reset
        for step in steps:
            index = len(out)
            sets = list(step.probe_sets)
            if step.reset_before:
                previous = None
            if step.knowledge and near_miss:
                sets.append(ProbeSet(NEAR_MISS, [p for k in step.knowledge for p in near_miss[k.id]],
                                     generation=self.generation, scorer=SideEffectProbe.NEAR_MISS))
            if step.knowledge and self.on("drift"):
                sets += self._drift_sets(index, previous, step.knowledge, reference=False)
                previous = index
            out.append(dataclasses.replace(step, index=index, probe_sets=[s for s in sets if s.probes]))
        return out

    def _drift_sets(self, step: int, before: int | None, knowledge: Sequence[Knowledge], reference: bool) -> list[ProbeSet]:
        meta = {"drift_step": step, "drift_before": before}
        in_view = " ".join(k.context for k in knowledge)  # what method=context shows with an unrelated question
        text = [Probe(Query(id=f"drift/text{i}", prompt=""), answers=(sentence,), meta=meta)
                for i, sentence in enumerate(self.sentences)]

        def ask(i: int, question: str, answer: str) -> Probe:
            query = Query(id=f"drift/general{i}", prompt=self.prompt_template.format(question=question), context=in_view)
            return Probe(query, answers=(answer,), meta=meta | {"question": i})

        tf = [dataclasses.replace(ask(i, q, a), answers=(" " + a,)) for i, (q, a) in enumerate(self.questions)]
        gen = [ask(i, q, a) for i, (q, a) in enumerate(self.questions)]
        prefix = REFERENCE + "/" if reference else "drift/"
        tf_kind, gen_kind = ((SideEffectProbe.GENERAL_TF_BEFORE, SideEffectProbe.GENERAL_GEN_BEFORE) if reference
                             else (SideEffectProbe.GENERAL_TF, SideEffectProbe.GENERAL_GEN))
        return [
            ProbeSet(prefix + "generic_text", text, output_type="loglikelihood_bare", scorer=SideEffectProbe.TEXT),
            ProbeSet(prefix + "general_tf", tf, output_type="loglikelihood", scorer=tf_kind),
            ProbeSet(prefix + "general_gen", gen, generation=self.generation, scorer=gen_kind),
        ]

    # ------------------------------------------------------------------ scoring
    @staticmethod
    def owns(probe_set: ProbeSet) -> bool:
        return probe_set.scorer in KINDS

    def process_results(self, probe_set: ProbeSet, outputs: Sequence[Answer | TargetScore],
              earlier: Sequence[ProbeResult] = ()) -> list[dict[str, float]]:
        """Per-probe metrics of a side-effect probe set, by its kind (`ProbeSet.scorer`). Drift's
        agreement compares with the answers of the reference step, read from `earlier` (DataError when
        they are not there)."""
        kind = SideEffectProbe(probe_set.scorer)
        pairs = list(zip(probe_set.probes, outputs))
        if kind is SideEffectProbe.NEAR_MISS:
            rows = []
            for probe, out in pairs:
                leaked = side_effect_metrics.leak(out.text, probe.meta["injected"])
                rows.append({"near_miss/leak_rate": leaked, f"near_miss/leak_rate_{probe.meta['near_miss']}": leaked})
            return rows
        if kind is SideEffectProbe.TEXT:
            return [{"drift/sentence_nll_per_token": -o.logprob / max(o.n_tokens, 1)} for o in outputs]
        if kind is SideEffectProbe.GENERAL_TF_BEFORE:
            for probe, out in pairs:
                editing.argmax_ids(out, probe.query.id)  # refused now, not when a later step compares with it
            return [{"drift/general_answer_token_acc_before": out.token_accuracy} for out in outputs]
        if kind is SideEffectProbe.GENERAL_TF:
            before = self._reference(earlier, REFERENCE + "/general_tf")
            return [{"drift/general_agreement_tf": editing.locality_agreement(
                        editing.argmax_ids(self._before(probe, before), probe.query.id),
                        editing.argmax_ids(out, probe.query.id))} for probe, out in pairs]
        if kind is SideEffectProbe.GENERAL_GEN_BEFORE:
            return [{"drift/general_qa_f1_before": qa.token_f1(out.text, probe.answers[0])} for probe, out in pairs]
        before = self._reference(earlier, REFERENCE + "/general_gen")  # GENERAL_GEN
        return [{"drift/general_agreement_gen": side_effect_metrics.answer_agreement(self._before(probe, before).text, out.text),
                 "drift/general_qa_f1": qa.token_f1(out.text, probe.answers[0])} for probe, out in pairs]

    @staticmethod
    def _reference(earlier: Sequence[ProbeResult], probe_set: str) -> dict[int, Answer | TargetScore]:
        """The outputs of the reference step's `probe_set`, by unrelated question."""
        return {r.probe.meta["question"]: r.output for r in earlier if r.probe_set == probe_set}

    @staticmethod
    def _before(probe: Probe, reference: dict[int, Answer | TargetScore]) -> Answer | TargetScore:
        if probe.meta["question"] not in reference:
            raise DataError(f"no answer before injection for {probe.query.id!r}: the drift reference step must run first")
        return reference[probe.meta["question"]]

    def conflict_scores(self, probe: Probe, output: Answer) -> dict[str, float]:
        """Conflict metrics of one answer to an updated fact (empty for any other probe)."""
        pair = self.conflicts.get(probe.query.id)
        return side_effect_metrics.conflict_scores(output.text, *pair) if pair else {}

    # ------------------------------------------------------------------ aggregation
    @staticmethod
    def split(results: Sequence[ProbeResult]) -> tuple[list[ProbeResult], list[ProbeResult]]:
        """(the task's own results, side-effect results) by probe set."""
        own, side = [], []
        for result in results:
            (side if result.probe_set == NEAR_MISS or result.probe_set.startswith("drift/") else own).append(result)
        return own, side

    @staticmethod
    def _text_by_step(results: Sequence[ProbeResult]) -> dict[int, dict[str, float]]:
        """Perplexity and next-token accuracy of the generic text at each step that scored it."""
        outputs: dict[int, list[TargetScore]] = defaultdict(list)
        for result in results:
            if result.probe_set.endswith("/generic_text"):
                outputs[result.probe.meta["drift_step"]].append(result.output)
        return {step: side_effect_metrics.text_scores((o.logprob, o.n_tokens, o.token_accuracy) for o in scored)
                for step, scored in outputs.items()}

    @staticmethod
    def _drift_step(text_by_step: dict[int, dict[str, float]], step: int, before: int | None) -> dict[str, float]:
        """Drift of one injection step against the untouched model and against the model before the step."""
        now, untouched = text_by_step[step], text_by_step.get(0)
        if untouched is None:
            raise DataError("the drift reference step (before any injection) has not been scored")
        prior = untouched if before is None else text_by_step[before]
        return {"drift/ppl": now["ppl"], "drift/next_token_acc": now["next_token_acc"],
                "drift/ppl_ratio": side_effect_metrics.ratio(now["ppl"], untouched["ppl"]),
                "drift/next_token_acc_ratio": side_effect_metrics.ratio(now["next_token_acc"], untouched["next_token_acc"]),
                "drift/ppl_step_ratio": side_effect_metrics.ratio(now["ppl"], prior["ppl"])}

    def step_metrics(self, own: Sequence[ProbeResult], side: Sequence[ProbeResult],
                     earlier: Sequence[ProbeResult] = ()) -> dict[str, float]:
        """Leak rates, conflict rates, drift (absolute, ratios) and agreement of one step's results
        (`own`: the task's own, which carry the conflict metrics; `side`: the side-effect probe sets');
        drift ratios compare with the generic text's scores at earlier steps, read from `earlier`."""
        out = {k: v for k, v in mean_metrics(own).items() if k.startswith("conflict/")}
        out |= mean_metrics(r for r in side if not r.probe_set.endswith("generic_text"))
        text = [r for r in side if r.probe_set.endswith("generic_text")]
        if text:
            meta = text[0].probe.meta
            text_by_step = self._text_by_step([*earlier, *text])
            if meta["drift_step"] == 0:
                values = text_by_step[0]
                out |= {"drift/ppl_before": values["ppl"], "drift/next_token_acc_before": values["next_token_acc"]}
            else:
                out |= self._drift_step(text_by_step, meta["drift_step"], meta["drift_before"])
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
            text_by_step = self._text_by_step(side)
            per_step = defaultdict(list)
            for step, before in sorted(steps.items()):
                for key, value in self._drift_step(text_by_step, step, before).items():
                    per_step[key].append(value)
            summary |= {key: sum(values) / len(values) for key, values in per_step.items()
                        if key in ("drift/ppl_ratio", "drift/next_token_acc_ratio")}
            summary |= {k: v for k, v in mean_metrics(side).items()
                        if k in ("drift/general_agreement_tf", "drift/general_agreement_gen", "drift/general_qa_f1",
                                 "drift/general_qa_f1_before")}
            summary["drift/ppl_before"] = text_by_step[0]["ppl"]
        return summary

    def protocols(self) -> dict[str, str]:
        keys = [k for k in side_effect_metrics.PROTOCOLS if k.split("/")[0] in self.families]
        out = {k: side_effect_metrics.PROTOCOLS[k] for k in keys}
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

