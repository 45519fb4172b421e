"""Knowledge editing (`task=editing`): inject T edits, then measure reliability, generality and locality.

An edit is (prompt, target_new, rephrase prompts, locality prompts + their answers); where edits come
from (`task.source`: synthetic, zsre, counterfact) and how files are read is `tasks.edit_data`. The first
`n_edits` valid records are evaluated; `train_path` gives the held-out training split
(`Task.training_knowledge`, e.g. for RECIPE).

The contract with methods (RECIPE and MEMOIR rely on it) — each edit is one `Knowledge`:
- `context`: the edit as a statement, prompt + target, e.g. "The mother tongue of Danielle Darrieux is
  English" (what `method=context` puts in front of a probe, what a retriever indexes);
- `train_sentences`: (statement + "\\n",), so the FT baselines train on the edit itself;
- `edit`: the structured edit (`core.types.EditSpec`), every prompt already rendered with `prompt_template`
  exactly as probes ask it: `prompt`, `target` (the continuation as scored, `target_separator` +
  target_new, e.g. " English"), `target_new`, `rephrase_prompts`, `locality_prompts`, `locality_answers`,
  `subject` and `ground_truth` (None when unknown).

Protocols (every metric name starts with its protocol, see `metric_protocols`):
- step 0 (`pre_edit`): before any edit, the locality prompts are scored teacher-forced on their answers;
  their argmax tokens are the pre-edit reference locality compares with (read from the earlier results
  passed to `process_results`, no state kept). With `generate`, their greedy answers are also kept:
  generated locality (`locality_gen`) is the share of locality prompts whose answer the edits left unchanged.
- `sequential` (default): T edits are injected one per step without reset; after the last one every
  edit is scored once (`after_all/...`: the WISE / retention protocol; EasyEdit's `sequential_edit`
  flag has meant different things over time, so kbench names the protocol in each metric).
- `single`: reset, inject one edit, score that edit; repeat for each edit (`single/...`).
"""
from __future__ import annotations

import csv
import dataclasses
import json
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from core.options import checked
from core.types import (
    Answer, DataError, EditSpec, GenerationSpec, KBenchError, Knowledge, NonEmptyStr, NonNegativeInt, PositiveInt, Probe, ProbeSet,
    Query, Step, TargetScore,
)
from metrics import editing as editing_metrics
from tasks.base import MetricSample, ProbeResult, Task
from tasks.edit_data import Edit, generate_synthetic_edits, load_counterfact, load_zsre

PROTOCOLS = ("sequential", "single")
PREFIX = {"sequential": "after_all", "single": "single"}
PRE_EDIT = "pre_edit/locality_reference"
PRE_EDIT_GEN = "pre_edit/locality_generation"  # the greedy answers generated locality compares with
PRE_EDIT_SETS = (PRE_EDIT, PRE_EDIT_GEN)


class EditProbe(StrEnum):
    """What an editing probe set measures, as its `ProbeSet.scorer`: scoring dispatches on it, never on
    the set's name (which only gives the metrics' protocol prefix: after_all/, single/, stream/)."""

    PRE_EDIT = "editing/pre_edit"
    RELIABILITY_TF = "editing/reliability_tf"
    GENERALITY_TF = "editing/generality_tf"
    LOCALITY = "editing/locality"
    RELIABILITY_GEN = "editing/reliability_gen"
    GENERALITY_GEN = "editing/generality_gen"
    PRE_EDIT_GEN = "editing/pre_edit_gen"
    LOCALITY_GEN = "editing/locality_gen"

STREAM = "stream"  # prefix of the probe sets and metrics scored along the edit stream (task.score_every)
STREAM_PLOT = "stream.png"


class EditingTask(Task):
    """`task=editing`: T edits, sequential (scored after all of them) or single (reset per edit)."""

    name = "editing"

    @checked("task")
    def __init__(
        self,
        source: Literal["synthetic", "zsre", "counterfact"] = "synthetic",
        path: str | None = None,
        train_path: str | None = None,
        n_edits: PositiveInt = 50,
        n_train: NonNegativeInt = 100,
        protocol: Literal["sequential", "single"] = "sequential",
        prompt_template: str = "{prompt}",
        target_separator: str = " ",
        max_rephrases: NonNegativeInt = 0,
        generate: bool = True,
        max_new_tokens: PositiveInt = 16,
        stop: list[str] | None = None,
        data_seed: int = 0,
        train_seed: int = 1,
        synthetic_template: str = "Question: {question}\nAnswer:",
        general_questions: list[Annotated[list[NonEmptyStr], Field(min_length=2, max_length=2)]] | None = None,
        score_every: NonNegativeInt = 0,
    ) -> None:
        if source != "synthetic" and not path:
            raise ValueError(f"task.source={source} needs task.path (the edits file)")
        if "{prompt}" not in prompt_template:
            raise ValueError(f"task.prompt_template must contain '{{prompt}}', got {prompt_template!r}")
        if "{question}" not in synthetic_template:
            raise ValueError(f"task.synthetic_template must contain '{{question}}', got {synthetic_template!r}")
        if score_every and protocol != "sequential":
            raise ValueError("task.score_every scores along a sequential edit stream: it needs task.protocol=sequential")
        if source == "synthetic" and data_seed == train_seed and n_train:
            raise ValueError("task.train_seed must differ from task.data_seed (the training split must be held out)")
        self.source, self.path, self.train_path = source, path, train_path
        self.n_edits, self.n_train, self.protocol = n_edits, n_train, protocol
        self.prompt_template, self.target_separator, self.max_rephrases = prompt_template, target_separator, max_rephrases
        self.generate = generate
        self.generation = GenerationSpec(max_new_tokens=max_new_tokens, stop=tuple(stop if stop is not None else ["\n"]))
        self.data_seed, self.train_seed, self.synthetic_template = data_seed, train_seed, synthetic_template
        self.general_questions = [list(pair) for pair in general_questions or []]
        self.prefix = PREFIX[protocol]
        self.score_every = score_every
        self._edits: list[Edit] | None = None
        self._train: list[Edit] | None = None
        self.dropped: dict[str, int] = {"train_overlapping_eval": 0}  # + what each file's loader dropped, by reason

    # ------------------------------------------------------------------ data
    def _load(self, path: str | None, seed: int, count: int, id_prefix: str, drop_prefix: str = "") -> list[Edit]:
        if self.source == "synthetic":
            return generate_synthetic_edits(count, seed, self.synthetic_template, self.general_questions, id_prefix)
        loader = load_zsre if self.source == "zsre" else load_counterfact
        edits, dropped = loader(path)
        self.dropped |= {f"{drop_prefix}{reason}": n for reason, n in dropped.items()}
        return edits

    @property
    def edits(self) -> list[Edit]:
        """The evaluated edits, in injection order."""
        if self._edits is None:
            edits = self._load(self.path, self.data_seed, self.n_edits, "syn-edit")[: self.n_edits]
            if not edits:
                dropped = {k: v for k, v in self.dropped.items() if v}
                why = f"; dropped: {dropped}" if dropped else ""
                raise DataError(f"task=editing found no edits in {self.path}{why}")
            if self.max_rephrases:
                edits = [dataclasses.replace(e, rephrase_prompts=e.rephrase_prompts[: self.max_rephrases]) for e in edits]
            self._edits = edits
        return self._edits

    @property
    def train_edits(self) -> list[Edit]:
        """The held-out training split: disjoint from the evaluated edits (no shared prompt or subject)."""
        if self._train is None:
            if not self.n_train or (self.source != "synthetic" and not self.train_path):
                self._train = []
            else:
                # synthetic: more than needed, since the few colliding with evaluated edits are dropped
                candidates = self._load(self.train_path, self.train_seed, self.n_train + self.n_edits, "syn-train", "train/")
                taken_prompts = {e.prompt for e in self.edits}
                taken_subjects = {e.subject for e in self.edits if e.subject} if self.source == "synthetic" else set()
                kept = [e for e in candidates if e.prompt not in taken_prompts and e.subject not in taken_subjects]
                self.dropped["train_overlapping_eval"] = len(candidates) - len(kept)
                self._train = kept[: self.n_train]
        return self._train

    def render(self, prompt: str) -> str:
        return self.prompt_template.format(prompt=prompt)

    def target(self, text: str) -> str:
        return self.target_separator + text

    def knowledge(self, edit: Edit) -> Knowledge:
        """An edit as `Knowledge` (the contract in the module docstring)."""
        prompt, target = self.render(edit.prompt), self.target(edit.target_new)
        statement = prompt + target
        return Knowledge(
            id=edit.id,
            context=statement,
            train_sentences=(statement + "\n",),
            edit=EditSpec(
                prompt=prompt,
                target=target,
                target_new=edit.target_new,
                rephrase_prompts=tuple(self.render(p) for p in edit.rephrase_prompts),
                locality_prompts=tuple(self.render(p) for p in edit.locality_prompts),
                locality_answers=tuple(edit.locality_answers),
                subject=edit.subject,
                ground_truth=edit.ground_truth,
            ),
        )

    def training_knowledge(self) -> list[Knowledge]:
        return [self.knowledge(e) for e in self.train_edits]

    # ------------------------------------------------------------------ probes and steps
    def _probe(self, edit: Edit, position: int, key: str, prompt: str, answer: str, context: str, **meta: Any) -> Probe:
        query = Query(id=f"{edit.id}/{key}", prompt=self.render(prompt), context=context)
        return Probe(query=query, answers=(answer,), knowledge_id=edit.id, meta={"position": position, **meta})

    def _locality_probes(self, edits: Sequence[Edit], start: int, with_edit_in_view: bool,
                         generated: bool = False) -> list[Probe]:
        """One probe per locality prompt; its answer is teacher-forced (with the separator) unless `generated`."""
        return [
            self._probe(e, start + i, f"loc{j}", prompt, answer if generated else self.target(answer),
                        self.knowledge(e).context if with_edit_in_view else "", kind=kind)
            for i, e in enumerate(edits)
            for j, (prompt, answer, kind) in enumerate(zip(e.locality_prompts, e.locality_answers, e.locality_kinds))
        ]

    def probe_sets(self, edits: Sequence[Edit], start: int, prefix: str | None = None) -> list[ProbeSet]:
        """The post-edit probe sets of `edits` (`start` = injection position of the first one), named
        `<prefix>/...` (default: the protocol's)."""
        p = prefix or self.prefix
        contexts = [self.knowledge(e).context for e in edits]
        rewrite = [(e, start + i, "rewrite", e.prompt, c) for i, (e, c) in enumerate(zip(edits, contexts))]
        rephrase = [(e, start + i, f"rephrase{j}", q, c)
                    for i, (e, c) in enumerate(zip(edits, contexts)) for j, q in enumerate(e.rephrase_prompts)]
        sets = [
            ProbeSet(f"{p}/reliability_tf", [self._probe(e, n, k, q, self.target(e.target_new), c) for e, n, k, q, c in rewrite],
                     output_type="loglikelihood", scorer=EditProbe.RELIABILITY_TF),
            ProbeSet(f"{p}/generality_tf", [self._probe(e, n, k, q, self.target(e.target_new), c) for e, n, k, q, c in rephrase],
                     output_type="loglikelihood", scorer=EditProbe.GENERALITY_TF),
            ProbeSet(f"{p}/locality", self._locality_probes(edits, start, with_edit_in_view=True),
                     output_type="loglikelihood", scorer=EditProbe.LOCALITY),
        ]
        if self.generate:
            sets += [
                ProbeSet(f"{p}/reliability_gen", [self._probe(e, n, k, q, e.target_new, c) for e, n, k, q, c in rewrite],
                         generation=self.generation, scorer=EditProbe.RELIABILITY_GEN),
                ProbeSet(f"{p}/generality_gen", [self._probe(e, n, k, q, e.target_new, c) for e, n, k, q, c in rephrase],
                         generation=self.generation, scorer=EditProbe.GENERALITY_GEN),
                ProbeSet(f"{p}/locality_gen", self._locality_probes(edits, start, with_edit_in_view=True, generated=True),
                         generation=self.generation, scorer=EditProbe.LOCALITY_GEN),
            ]
        return [s for s in sets if s.probes]

    def steps(self) -> list[Step]:
        edits = self.edits
        # No edit is in view before editing: the reference queries carry an empty context.
        reference = ProbeSet(PRE_EDIT, self._locality_probes(edits, 0, with_edit_in_view=False),
                             output_type="loglikelihood", scorer=EditProbe.PRE_EDIT)
        references = [reference]
        if self.generate:  # the unedited model's greedy answers, which generated locality compares with
            references.append(ProbeSet(PRE_EDIT_GEN, self._locality_probes(edits, 0, with_edit_in_view=False, generated=True),
                                       generation=self.generation, scorer=EditProbe.PRE_EDIT_GEN))
        steps = [Step(index=0, knowledge=[], probe_sets=[r for r in references if r.probes], label="pre-edit")]
        if self.protocol == "sequential":
            # with score_every=k, every edit injected so far is scored after edits k, 2k, ... (stream/...)
            steps += [Step(index=i + 1, knowledge=[self.knowledge(e)], label=e.id,
                           probe_sets=self.probe_sets(edits[: i + 1], 0, STREAM)
                           if self.score_every and (i + 1) % self.score_every == 0 and i + 1 < len(edits) else [])
                      for i, e in enumerate(edits)]
            steps.append(Step(index=len(edits) + 1, knowledge=[], probe_sets=self.probe_sets(edits, 0),
                              label=f"after all {len(edits)} edits"))
        else:
            steps += [
                Step(index=i + 1, knowledge=[self.knowledge(e)], probe_sets=self.probe_sets([e], i), reset_before=True, label=e.id)
                for i, e in enumerate(edits)
            ]
        return steps

    # ------------------------------------------------------------------ scoring
    def process_results(self, probe_set: ProbeSet, outputs: Sequence[Answer | TargetScore],
              earlier: Sequence[ProbeResult] = ()) -> list[dict[str, float]]:
        """Per-probe metrics by the set's kind (`EditProbe`); locality compares with the pre-edit pass's
        argmax tokens, generated locality with its greedy answers, both read from `earlier` (KBenchError when
        the pre-edit step is not among them)."""
        try:
            kind = EditProbe(probe_set.scorer)
        except ValueError:
            raise NotImplementedError(f"task=editing cannot score probe set {probe_set.name!r}") from None
        prefix = probe_set.name.split("/", 1)[0]  # the protocol's, or stream/ along the edit stream
        measure = kind.value.split("/", 1)[1]  # reliability_tf, locality, generality_gen, ...
        pairs = list(zip(probe_set.probes, outputs))
        if kind is EditProbe.PRE_EDIT:
            for probe, output in pairs:
                editing_metrics.argmax_ids(output, probe.query.id)  # refused now, not when locality compares with it
            return [{"pre_edit/locality_answer_tf": output.token_accuracy} for output in outputs]
        if kind is EditProbe.PRE_EDIT_GEN:
            return [{"pre_edit/locality_answer_em": editing_metrics.generated_scores(output.text, probe.answers[0])["em"]}
                    for probe, output in pairs]
        if kind in (EditProbe.LOCALITY, EditProbe.LOCALITY_GEN):
            generated = kind is EditProbe.LOCALITY_GEN
            reference_set, name = (PRE_EDIT_GEN, "locality_gen") if generated else (PRE_EDIT, "locality")
            pre_edit = {r.probe.query.id: r.output for r in earlier if r.probe_set == reference_set}
            several_kinds = len(self.locality_kinds()) > 1
            scores = []
            for probe, output in pairs:
                if probe.query.id not in pre_edit:
                    raise KBenchError(f"no pre-edit reference for {probe.query.id!r}: the pre-edit step must run first")
                before = pre_edit[probe.query.id]
                value = (editing_metrics.generated_scores(output.text, before.text)["em"] if generated else
                         editing_metrics.locality_agreement(editing_metrics.argmax_ids(before, probe.query.id),
                                                            editing_metrics.argmax_ids(output, probe.query.id)))
                per_kind = {f"{prefix}/{name}_{probe.meta['kind']}": value} if several_kinds else {}
                scores.append({f"{prefix}/{name}": value} | per_kind)
            return scores
        if kind in (EditProbe.RELIABILITY_TF, EditProbe.GENERALITY_TF):
            return [{f"{prefix}/{measure}": output.token_accuracy} for output in outputs]
        name = f"{prefix}/{measure.removesuffix('_gen')}"  # reliability_gen / generality_gen
        return [{f"{name}_{k}": v for k, v in editing_metrics.generated_scores(output.text, probe.answers[0]).items()}
                for probe, output in pairs]

    @staticmethod
    def _pairs(results: Sequence[ProbeResult]) -> dict[str, list[tuple[str, float]]]:
        """Per metric, (edit id, value) of every probe that scored it."""
        by_metric: dict[str, list[tuple[str, float]]] = {}
        for result in results:
            for name, value in result.metrics.items():
                by_metric.setdefault(name, []).append((result.probe.knowledge_id, value))
        return by_metric

    def _aggregate(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        return {name: editing_metrics.macro_average(editing_metrics.group_by_edit(pairs))
                for name, pairs in self._pairs(results).items()}

    def step_metrics(self, results: Sequence[ProbeResult], earlier: Sequence[ProbeResult] = ()) -> dict[str, float]:
        return self._aggregate(results)

    def summarize(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        """The protocol's metrics, then the pre-edit reference (tables list them in this order); the stream's
        are in `report`."""
        metrics = self._aggregate(_final(results))
        return dict(sorted(metrics.items(), key=lambda item: item[0].startswith("pre_edit/")))

    def metric_samples(self, results: Sequence[ProbeResult]) -> dict[str, MetricSample]:
        """The unit is the edit with all its probes: each metric's per-edit means (the macro average's terms)."""
        samples: dict[str, MetricSample] = {}
        for name, pairs in self._pairs(_final(results)).items():
            grouped = editing_metrics.group_by_edit(pairs)
            samples[name] = MetricSample([sum(v) / len(v) for v in grouped.values()], list(grouped), "edit")
        return samples

    def locality_kinds(self) -> list[str]:
        return sorted({kind for e in self.edits for kind in e.locality_kinds})

    def metric_protocols(self, results: Sequence[ProbeResult] = ()) -> dict[str, str]:
        p, T = self.prefix, len(self.edits)
        when = (f"each edit scored once after all T={T} edits were injected one by one without reset (sequential, "
                "WISE/retention protocol)" if self.protocol == "sequential"
                else "each edit scored right after injecting it alone into the reset method (single-edit protocol)")
        if self.score_every:
            when += (f"; also scored after every {self.score_every} edits along the stream (task_report.stream, "
                     f"{STREAM}/... step metrics), which leaves the after-all scores unchanged")
        tail = f"; {when}; macro-average over edits"
        tf = "loglikelihood/teacher-forced token accuracy of target_new"
        loc = ("loglikelihood/agreement of the teacher-forced argmax tokens on the locality answer with the pre-edit "
               "argmax tokens (EasyEdit locality)")
        protocols = {
            "pre_edit/locality_answer_tf": f"{tf.replace('target_new', 'the locality answer')} before any edit "
                                            "(the pre-edit reference pass)",
            f"{p}/reliability_tf": f"{tf} given the edit prompt (EasyEdit rewrite_acc){tail}",
            f"{p}/generality_tf": f"{tf} given each rephrased prompt (EasyEdit rephrase_acc){tail}",
            f"{p}/locality": f"{loc}, all locality prompts{tail}",
        }
        if len(self.locality_kinds()) > 1:
            protocols |= {f"{p}/locality_{k}": f"{loc}, locality prompts of kind {k!r}{tail}" for k in self.locality_kinds()}
        if self.generate:
            for name, prompts in (("reliability", "the edit prompt"), ("generality", "each rephrased prompt")):
                protocols[f"{p}/{name}_em"] = f"generate/squad-exact-match of the greedy answer to {prompts} vs target_new{tail}"
                protocols[f"{p}/{name}_f1"] = f"generate/squad-token-f1 of the greedy answer to {prompts} vs target_new{tail}"
            gen_loc = ("generate/squad-exact-match of the greedy answer to each locality prompt vs the same prompt's "
                       "greedy answer before any edit (1 = unchanged)")
            protocols[f"{p}/locality_gen"] = f"{gen_loc}, all locality prompts{tail}"
            if len(self.locality_kinds()) > 1:
                protocols |= {f"{p}/locality_gen_{k}": f"{gen_loc}, locality prompts of kind {k!r}{tail}"
                              for k in self.locality_kinds()}
            protocols["pre_edit/locality_answer_em"] = ("generate/squad-exact-match of the greedy answer to each locality "
                                                        "prompt vs its answer before any edit (the pre-edit reference pass)")
        return protocols

    # ------------------------------------------------------------------ reporting
    def report(self, results: Sequence[ProbeResult], output_dir: Path) -> dict[str, Any]:
        """Per-edit metrics (`edits.csv`) and, in injection order, the metrics of each fifth of the edits:
        in the sequential protocol, early edits have survived more later edits (retention). With
        `score_every`, the scores along the stream (`stream`, `stream.png`)."""
        stream = self._stream(results, Path(output_dir)) if self.score_every else None
        per_edit: dict[str, dict[str, Any]] = {}
        for result in _final(results):
            if result.probe_set in PRE_EDIT_SETS:
                continue
            row = per_edit.setdefault(result.probe.knowledge_id, {"edit": result.probe.knowledge_id,
                                                                  "position": result.probe.meta["position"]})
            for name, value in result.metrics.items():
                row.setdefault(name, []).append(value)
        rows = [{k: (sum(v) / len(v) if isinstance(v, list) else v) for k, v in row.items()} for row in per_edit.values()]
        rows.sort(key=lambda r: r["position"])
        if not rows:
            return {}
        columns = sorted({k for r in rows for k in r} - {"edit", "position"})
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        with (output_dir / "edits.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["position", "edit", *columns])
            writer.writeheader()
            writer.writerows(rows)
        n_buckets = min(5, len(rows))
        buckets = []
        for b in range(n_buckets):
            chunk = rows[b * len(rows) // n_buckets : (b + 1) * len(rows) // n_buckets]
            summary: dict[str, Any] = {"positions": f"{chunk[0]['position'] + 1}-{chunk[-1]['position'] + 1}"}
            for column in columns:
                values = [r[column] for r in chunk if column in r]
                if values:
                    summary[column] = round(sum(values) / len(values), 4)
            buckets.append(summary)
        report = {"protocol": self.protocol, "n_edits": len(rows), "by_position": buckets, "files": ["edits.csv"]}
        if stream is not None:
            report |= {"stream": stream, "files": ["edits.csv", STREAM_PLOT]}
        return report

    def checkpoints(self) -> list[int]:
        """With `score_every`=k: how many edits were injected at each scoring along the stream (k, 2k, ...,
        and T, the after-all scoring, last)."""
        k, total = self.score_every, len(self.edits)
        return [*range(k, total, k), total] if k else [total]

    def _stream(self, results: Sequence[ProbeResult], output_dir: Path) -> dict[str, Any]:
        """The retention matrices of edit batches: M[j][b] = the macro-average over batch b's edits (batch b
        = edits b*k+1 .. (b+1)*k) of a metric at the j-th scoring (after checkpoints()[j] edits); null
        before the batch is injected. The last row is the after-all scoring, i.e. the protocol's metrics
        per batch. `curves`: the macro-average over every edit injected so far, per scoring."""
        k, checkpoints = self.score_every, self.checkpoints()
        row_of_step = {n: j for j, n in enumerate(checkpoints[:-1])} | {len(self.edits) + 1: len(checkpoints) - 1}
        position = {e.id: i for i, e in enumerate(self.edits)}
        values: dict[str, dict[int, dict[str, list[float]]]] = {}  # metric -> row -> edit -> values
        for result in results:
            if result.probe_set in PRE_EDIT_SETS or result.step not in row_of_step:
                continue
            for name, value in result.metrics.items():
                family = name.split("/", 1)[1]
                edits = values.setdefault(family, {}).setdefault(row_of_step[result.step], {})
                edits.setdefault(result.probe.knowledge_id, []).append(value)
        n = len(checkpoints)
        matrices, curves = {}, {}
        for family, rows in sorted(values.items()):
            matrix: list[list[float | None]] = [[None] * n for _ in range(n)]
            curve: list[float | None] = [None] * n
            for j, edits in rows.items():
                per_edit = {e: sum(v) / len(v) for e, v in edits.items()}
                for b in range(j + 1):
                    batch = [m for e, m in per_edit.items() if position[e] // k == b]
                    matrix[j][b] = sum(batch) / len(batch) if batch else None
                curve[j] = sum(per_edit.values()) / len(per_edit)
            matrices[family], curves[family] = matrix, curve
        plot_stream(matrices, curves, checkpoints, output_dir / STREAM_PLOT)
        return {
            "score_every": k,
            "edits_injected": checkpoints,
            "batches": [[b * k + 1, min((b + 1) * k, len(self.edits))] for b in range(n)],
            "layout": "matrices[metric][j][b]: row j = the j-th scoring (after edits_injected[j] edits; the last "
                      "row is after all edits), column b = edit batch b (edits batches[b], 1-based); null = "
                      "not yet injected; macro-average over the batch's edits",
            "matrices": matrices,
            "curves": curves,
        }

    def describe(self) -> dict[str, Any]:
        edits = self.edits
        kinds = {k: sum(e.locality_kinds.count(k) for e in edits) for k in self.locality_kinds()}
        return {
            "source": self.source,
            "path": str(self.path) if self.path else None,
            "train_path": str(self.train_path) if self.train_path else None,
            "protocol": self.protocol,
            "score_every": self.score_every,
            "n_edits": len(edits),
            "n_rephrase_prompts": sum(len(e.rephrase_prompts) for e in edits),
            "n_locality_prompts": kinds,
            "n_train_edits": len(self.train_edits),
            "dropped": dict(self.dropped),
            "example": json.loads(json.dumps(dataclasses.asdict(self.knowledge(edits[0]).edit), default=str)),
        }


def plot_stream(matrices: dict[str, list[list[float | None]]], curves: dict[str, list[float | None]],
                checkpoints: Sequence[int], path: Path) -> None:
    """The metrics along the edit stream (macro-average over the edits injected so far) and, per
    teacher-forced metric, the retention matrix of edit batches."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    heat = [name for name in ("reliability_tf", "generality_tf", "locality") if name in matrices]
    figure = Figure(figsize=(4.2 * (1 + len(heat)), 3.8), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 1 + len(heat), squeeze=False)[0]
    for name, curve in curves.items():
        if not name.startswith("locality_") or name == "locality_gen":  # per-kind curves stay off the plot
            axes[0].plot(checkpoints, [np.nan if v is None else v for v in curve], "o-", label=name)
    axes[0].set(xlabel="edits injected", ylabel="macro-average over injected edits", ylim=(-0.02, 1.02),
                title="scores along the edit stream")
    axes[0].legend(fontsize=7)
    axes[0].grid(alpha=0.3)
    for ax, name in zip(axes[1:], heat):
        matrix = np.array([[np.nan if v is None else v for v in row] for row in matrices[name]], dtype=float)
        image = ax.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        ax.set(xlabel="edit batch", ylabel="scoring (after n edits)", title=name)
        ax.set_yticks(range(len(checkpoints)), [str(c) for c in checkpoints])
        figure.colorbar(image, ax=ax, shrink=0.8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)


def _final(results: Sequence[ProbeResult]) -> list[ProbeResult]:
    """Results without those scored along the stream (task.score_every)."""
    return [r for r in results if not r.probe_set.startswith(STREAM + "/")]

