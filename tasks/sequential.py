"""Sequential injection (retention): contexts injected one at a time into the same method, no reset.

The contexts and their questions come from a source context-QA task (`synthetic` by default, or
`pwc`), built by Hydra from the nested `source` node. The first `n_sequences x length` contexts of
the source are cut into `n_sequences` independent sequences of `length` contexts each (consecutive,
in the source's order, as the SELF-PARAM reference does). The method is reset before each sequence
and never within one: parametric methods keep training the same weights, memories keep growing.

After every injection j = 1..L (and, with `probe_unseen`, once before any injection, j = 0) the
questions of *every* context of the sequence are asked, which fills the retention matrix
R[i, j] = mean per-probe `metric` (QA-F1 by default) over context i's questions after j injections
(rows: contexts in injection order, 0-based; columns: injections done, 0..L). Cells with j >= i + 1
measure retention, j == i + 1 efficacy, j <= i the no-knowledge floor. With `probe_unseen: false`
only injected contexts are probed (roughly half the generations) and the floor cells stay empty.

Summary metrics (flat, each the mean over sequences; definitions in `metrics/retention.py`), for
`m` = `metric`:
    final_{m}        mean_i R[i, L]            every context after the last injection
    first_final_{m}  R[0, L]                   the first context after the last injection
    efficacy_{m}     mean_i R[i, i+1]          each context right after its own injection
    auc_{m}          (1/L) sum_j mean_{i<j} R[i, j]   normalised area under the retention curve
    unseen_{m}       mean over j <= i of R[i, j]      the floor (only with `probe_unseen`)
Per step, `step_metrics` gives that step's column of R (`{m}_ctx{i}`) for W&B. `report` stores R per
sequence and its mean in the record (`task_report.retention`) and draws them into `retention.png`.
Steps depend only on the config, so the same config always gives the same steps and probes.

Side-effect probes (`probes`, tasks/side_effects/, docs/side_effects.md): `near_miss` and `drift` as in
task=synthetic (after each injection); `conflict` makes the last `conflict_updates` contexts of every
sequence updates of its first ones (every fact re-stated with a new value), so each sequence takes
`length - conflict_updates` contexts from the source; the updates' questions asked after the update is
injected give `conflict/update_acc`, `stale_rate`, `mixed_rate`. R keeps its meaning per row: an
original's row asks for the old values, its update's row for the new ones.
"""
from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from core.options import checked
from core.types import PositiveInt
from core.types import Answer, DataError, Knowledge, Probe, ProbeSet, Step, TargetScore
from metrics import qa, retention
from metrics.uncertainty import mean_se
from tasks.base import MetricSample, ProbeResult, Task
from tasks.context_qa import ContextQATask, QAItem
from tasks.side_effects import SideEffectProbes

PLOT_FILE = "retention.png"
PROBE_SET = "retention"


class SequentialTask(Task):
    """`task=sequential`: sequences of contexts injected one by one, every context probed after each step."""

    name = "sequential"

    @checked("task")
    def __init__(
        self,
        source: ContextQATask,
        n_sequences: PositiveInt = 1,
        length: PositiveInt = 5,
        probe_unseen: bool = True,
        metric: Literal["qa_f1", "exact_match", "contains"] = "qa_f1",
        probes: list[Literal["qa", "near_miss", "conflict", "drift"]] | None = None,
        drift_text: str | None = None,
        drift_questions: str | None = None,
        conflict_updates: PositiveInt = 2,
    ) -> None:
        if not isinstance(source, ContextQATask):
            raise ValueError(
                f"task.source must build a context-QA task (e.g. tasks.synthetic.SyntheticTask or "
                f"tasks.pwc.PwCTask), got {type(source).__name__}"
            )
        self.source, self.n_sequences, self.length = source, n_sequences, length
        self.probe_unseen, self.metric = probe_unseen, metric
        # the floor summary needs the not-yet-injected cells, which only `probe_unseen` fills
        self.summary_keys = [key for key in retention.PROTOCOLS if key != "unseen" or probe_unseen]
        self._steps: list[Step] | None = None
        self.side_effects = SideEffectProbes(
            probes or ["qa"], prompt_template=source.prompt_template, generation=source.generation,
            seed=getattr(source, "data_seed", 0), drift_text=drift_text, drift_questions=drift_questions,
            conflict_allowed=True,
        )
        self.n_updates = conflict_updates if self.side_effects.on("conflict") else 0
        if self.side_effects.on("conflict") and not 1 <= conflict_updates <= length // 2:
            raise ValueError(f"task.conflict_updates must be in [1, length // 2 = {length // 2}] (each update needs "
                             f"an earlier context of its sequence), got {conflict_updates}")

    # ------------------------------------------------------------------ data and steps
    def sequences(self) -> list[list[QAItem]]:
        """The contexts of each sequence, in injection order."""
        per_sequence = self.length - self.n_updates  # updates (conflict probes) are generated, not taken
        items, needed = self.source.items, self.n_sequences * per_sequence
        if len(items) < needed:
            length = "(length - conflict_updates)" if self.n_updates else "length"
            raise DataError(
                f"task=sequential needs n_sequences x {length} = {self.n_sequences} x {per_sequence} = {needed} contexts, "
                f"but its source ({self.source.name}) has {len(items)}. Give the source more contexts "
                f"(e.g. task.source.n_contexts={needed} for synthetic, a larger task.source.path for pwc) "
                f"or lower task.n_sequences / task.length."
            )
        sequences = [items[s * per_sequence : (s + 1) * per_sequence] for s in range(self.n_sequences)]
        if self.n_updates:
            # written like the source's own contexts; a source that generates no facts (pwc) has no such
            # knobs and fails in update_item with a DataError naming the context
            writing = (getattr(self.source, "sentence_template", ""), getattr(self.source, "train_questions_per_fact", 0),
                       getattr(self.source, "train_pairs_per_context", 0))
            sequences = [seq + self.side_effects.updates_of(seq[: self.n_updates], *writing) for seq in sequences]
        return sequences

    def _probes(self, sequence: list[QAItem], index: int, injections: int) -> list[Probe]:
        """Every probe of the sequence's contexts to ask after `injections` injections, tagged with
        its cell of R (the tags go to predictions.jsonl as `probe_meta`)."""
        return [
            dataclasses.replace(probe, meta=probe.meta | {"sequence": index, "position": position, "injections": injections})
            for position, item in enumerate(sequence)
            if self.probe_unseen or position < injections
            for probe in self.source.probes_of(item)
        ]

    def steps(self) -> list[Step]:
        if self._steps is None:
            steps: list[Step] = []
            first = 0 if self.probe_unseen else 1
            for index, sequence in enumerate(self.sequences()):
                for injections in range(first, self.length + 1):
                    knowledge = [sequence[injections - 1].knowledge] if injections else []
                    probe_set = ProbeSet(
                        name=PROBE_SET, probes=self._probes(sequence, index, injections), generation=self.source.generation
                    )
                    steps.append(Step(
                        index=len(steps),
                        knowledge=knowledge,
                        probe_sets=[probe_set],
                        reset_before=injections == first,  # a fresh method per sequence, never within one
                        label=f"s{index}/" + (knowledge[0].id if knowledge else "before"),
                    ))
            self._steps = self.side_effects.extend_steps(steps, [item for s in self.sequences() for item in s])
        return self._steps

    def training_knowledge(self) -> list[Knowledge]:
        return self.source.training_knowledge()

    # ------------------------------------------------------------------ scoring
    def process_results(self, probe_set: ProbeSet, outputs: Sequence[Answer | TargetScore],
              earlier: Sequence[ProbeResult] = ()) -> list[dict[str, float]]:
        if self.side_effects.owns(probe_set):
            return self.side_effects.process_results(probe_set, outputs, earlier)
        rows = super().process_results(probe_set, outputs, earlier)
        if not self.n_updates:
            return rows
        return [row | (self.side_effects.conflict_scores(probe, out) if probe.meta["injections"] > probe.meta["position"]
                       else {}) for row, probe, out in zip(rows, probe_set.probes, outputs)]

    def _matrices(self, results: Sequence[ProbeResult]) -> dict[int, np.ndarray]:
        """R of every sequence that has results, keyed by sequence index."""
        results = self.side_effects.split(results)[0]
        cells: dict[int, list[tuple[int, int, float]]] = defaultdict(list)
        for result in results:
            meta = result.probe.meta
            if "sequence" not in meta:
                raise ValueError(f"probe {result.probe.query.id!r} carries no sequence position; was it made by this task?")
            cells[meta["sequence"]].append((meta["position"], meta["injections"], result.metrics[self.metric]))
        return {index: retention.retention_matrix(cells[index], self.length) for index in sorted(cells)}

    def step_metrics(self, results: Sequence[ProbeResult], earlier: Sequence[ProbeResult] = ()) -> dict[str, float]:
        """This step's column of R (`{m}_ctx{i}`), the mean over injected and not-yet-injected contexts,
        and where the step is (`sequence`, `injections`), as flat floats for the W&B step log; with
        side-effect probes, their step metrics too."""
        results, side = self.side_effects.split(results)
        side_metrics = self.side_effects.step_metrics(results, side, earlier)
        if not results:
            return side_metrics
        sequences = {r.probe.meta["sequence"] for r in results}
        injections = {r.probe.meta["injections"] for r in results}
        if len(sequences) != 1 or len(injections) != 1:
            raise ValueError("step_metrics expects the results of one step")
        (index, matrix), (j,) = next(iter(self._matrices(results).items())), injections
        column = matrix[:, j]
        m = self.metric
        metrics = {f"{m}_ctx{i}": float(value) for i, value in enumerate(column) if not math.isnan(value)}
        if j > 0:
            metrics[f"{m}_injected"] = float(np.mean(column[:j]))
        if self.probe_unseen and j < self.length:
            metrics[f"{m}_unseen"] = float(np.mean(column[j:]))
        return metrics | {"sequence": float(index), "injections": float(j)} | side_metrics

    def _summaries(self, results: Sequence[ProbeResult]) -> dict[str, list[float]]:
        """Each summary of `metrics.retention` per sequence (sequences in order)."""
        per_sequence: dict[str, list[float]] = defaultdict(list)
        matrices = self._matrices(results)
        if len(matrices) != self.n_sequences:
            raise ValueError(f"results cover {len(matrices)} of {self.n_sequences} sequences")
        for matrix in matrices.values():
            if np.isnan(matrix[np.triu_indices(self.length, k=1, m=self.length + 1)]).any():
                raise ValueError("results do not cover every injected context after every injection")
            for key, value in retention.summarize(matrix).items():
                per_sequence[key].append(value)
        return per_sequence

    def summarize(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        summaries = self._summaries(results)
        side_effects = self.side_effects.summarize(*self.side_effects.split(results))
        return {f"{key}_{self.metric}": float(np.mean(summaries[key])) for key in self.summary_keys} | side_effects

    def metric_samples(self, results: Sequence[ProbeResult]) -> dict[str, MetricSample]:
        """The per-probe samples (conflict and side-effect metrics), and for the retention summaries that are
        means over questions their questions: `final` every question after the last injection, `first_final`
        the first context's then, `efficacy` each context's right after its own injection. Their mean is the
        summary when every context has as many questions (runners.results.metric_uncertainty checks it and
        gives no interval otherwise); `auc` and `unseen` average over injections, so they get none."""
        samples = super().metric_samples(results)
        m, last = self.metric, self.length
        picks = {f"final_{m}": lambda meta: meta["injections"] == last,
                 f"first_final_{m}": lambda meta: meta["injections"] == last and meta["position"] == 0,
                 f"efficacy_{m}": lambda meta: meta["injections"] == meta["position"] + 1}
        retained = self.side_effects.split(results)[0]
        for name, keep in picks.items():
            chosen = [r for r in retained if keep(r.probe.meta)]
            samples[name] = MetricSample([r.metrics[m] for r in chosen], [r.probe.query.id for r in chosen], "question")
        return samples

    def metric_protocols(self, results: Sequence[ProbeResult] = ()) -> dict[str, str]:
        per_probe = qa.PROTOCOLS[self.metric]
        return {
            f"{key}_{self.metric}": f"{retention.PROTOCOLS[key]}; R[i, j] = mean over context i's probes of {per_probe}"
            for key in self.summary_keys
        } | self.side_effects.protocols()

    def report(self, results: Sequence[ProbeResult], output_dir: Path) -> dict[str, Any]:
        """R per sequence and averaged, the retention and age curves, the summaries' standard errors,
        and the plot file (`retention.png` in `output_dir`)."""
        matrices = self._matrices(results)
        mean = np.mean(np.stack(list(matrices.values())), axis=0)
        sequences = self.sequences()
        summaries = self._summaries(results)
        standard_errors = {  # over sequences; none with a single sequence
            f"{key}_{self.metric}": mean_se(summaries[key])["se"] for key in self.summary_keys
        }
        plot = output_dir / PLOT_FILE
        plot_retention(mean, plot, metric=self.metric, n_sequences=len(matrices))
        return {
            "retention": {
                "metric": self.metric,
                "layout": "R[i][j]: row i = the i-th injected context (0-based), column j = injections done (0..L); "
                          "null = not probed",
                "shape": list(mean.shape),
                "mean": _json_matrix(mean),
                "per_sequence": [
                    {"sequence": index, "context_ids": [item.knowledge.id for item in sequences[index]],
                     "matrix": _json_matrix(matrix)}
                    for index, matrix in matrices.items()
                ],
                "retention_curve": _json_list(retention.retention_curve(mean)),
                "age_curve": _json_list(retention.age_curve(mean)),
                "standard_error": standard_errors,
            },
            "plot": plot.name,
        }

    def describe(self) -> dict[str, Any]:
        sequences = self.sequences()
        return {
            "source": self.source.name,
            "source_data": self.source.describe(),
            "n_sequences": self.n_sequences,
            "length": self.length,
            "n_contexts": sum(len(s) for s in sequences),
            "n_questions": sum(len(item.questions) for s in sequences for item in s),
            "n_probes": sum(len(ps.probes) for step in self.steps() for ps in step.probe_sets),
            "probe_unseen": self.probe_unseen,
            "metric": self.metric,
        } | ({"side_effects": self.side_effects.describe()} if self.side_effects.any else {})


def _json_list(values: np.ndarray) -> list[float | None]:
    return [None if math.isnan(v) else round(float(v), 6) for v in values]


def _json_matrix(matrix: np.ndarray) -> list[list[float | None]]:
    return [_json_list(row) for row in matrix]


def plot_retention(matrix: np.ndarray, path: Path, metric: str, n_sequences: int) -> None:
    """Heatmap of R, the retention curve (mean over injected contexts, and the first context) against
    injections, and the score against the number of injections since a context's own."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # the Agg canvas: no display, no global state
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle
    from matplotlib.ticker import MaxNLocator

    length = matrix.shape[0]
    figure = Figure(figsize=(13, 4), layout="constrained")
    FigureCanvasAgg(figure)
    heat, curves, ages = figure.subplots(1, 3)

    image = heat.imshow(np.ma.masked_invalid(matrix), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    for i in range(length):  # outline the efficacy cells j = i + 1: retention lies right of them, the floor left
        heat.add_patch(Rectangle((i + 0.5, i - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.2))
    heat.set(xlabel="injections done (j)", ylabel="context, in injection order (i)",
             title=f"R[i, j] ({metric}, mean of {n_sequences} sequence{'s' * (n_sequences > 1)})")
    if length <= 12:
        for (i, j), value in np.ndenumerate(matrix):
            if not math.isnan(value):
                heat.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                          color="black" if value > 0.6 else "white")
    figure.colorbar(image, ax=heat, shrink=0.8)
    for axis in (heat.xaxis, heat.yaxis):  # cells are whole contexts and injection counts
        axis.set_major_locator(MaxNLocator(integer=True))

    steps = np.arange(1, length + 1)
    curves.plot(steps, retention.retention_curve(matrix), "o-", label="mean over injected contexts")
    curves.plot(np.arange(length + 1), matrix[0], "s--", label="first context")
    curves.plot(steps, retention.diagonal(matrix), "^:", label="just-injected context")
    curves.set(xlabel="injections done", ylabel=metric, ylim=(-0.02, 1.02), title="retention curve")
    curves.legend(fontsize=8)

    ages.plot(np.arange(length), retention.age_curve(matrix), "o-")
    ages.set(xlabel="injections since the context's own", ylabel=metric, ylim=(-0.02, 1.02),
             title="score by age")
    for axis in (curves, ages):
        axis.grid(alpha=0.3)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
