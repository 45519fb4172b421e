"""`SideEffectProbes`: the side-effect families a task switched on (`task.probes`), their probe sets,
scoring and aggregates; the families are described in the package docstring and docs/side_effects.md.
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from core.types import Answer, DataError, GenerationSpec, Knowledge, Probe, ProbeSet, Query, Step, TargetScore
from metrics import editing, qa
from metrics import side_effects as metrics
from tasks.base import ProbeResult, mean_metrics
from tasks.qa_item import QAItem
from tasks.side_effects.drift_data import GENERAL_QUESTIONS, GENERIC_TEXT, load_general_questions, load_generic_text
from tasks.world.variants import near_miss_probes, taken_names, update_item

FAMILIES = ("qa", "near_miss", "conflict", "drift")
SCORER = "side_effects"
NEAR_MISS = "near_miss"
DRIFT_TEXT, GENERAL_TF, GENERAL_GEN = "drift/generic_text", "drift/general_tf", "drift/general_gen"
REFERENCE = "drift/before_injection"  # prefix of the reference step's probe sets


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
                ids = editing.argmax_ids(out, probe.query.id)
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

