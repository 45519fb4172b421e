"""The task interface: which knowledge goes in, in what order, and how the answers are scored.

A task yields `Step`s (knowledge to inject, whether to reset first, probe sets to ask afterwards) and
scores the outputs of each probe set. The runner knows nothing else about it.

Scoring keeps no state: every method that computes metrics is a function of the results passed in (and
of the config). A metric that compares with an earlier answer (editing locality against the pre-edit
pass, drift against the answers before injection) reads it from `earlier`, the results scored before,
which the runner, the resumer and the rescorer all pass the same way.
"""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.predictions import prediction_row
from core.types import Answer, KBenchError, Knowledge, Probe, ProbeSet, Step, TargetScore
from metrics import qa, retrieval


@dataclass
class ProbeResult:
    """One probe after one step: what the method produced and the metrics it earned."""

    step: int
    probe_set: str
    probe: Probe
    output: Answer | TargetScore
    metrics: dict[str, float]

    def to_row(self) -> dict[str, Any]:
        """The line written to predictions.jsonl (`core.predictions.prediction_row`)."""
        return prediction_row(self.step, self.probe_set, self.probe, self.output, self.metrics)


@dataclass
class MetricSample:
    """The values a final metric is the micro-average of, each with its independent unit (`unit` names
    the kind: question, edit, dialogue); units is parallel to values."""

    values: list[float]
    units: list[str]
    unit: str


def mean_metrics(results: Iterable[ProbeResult]) -> dict[str, float]:
    """Micro-average of every metric over the given probe results."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for result in results:
        for name, value in result.metrics.items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    return {name: sums[name] / counts[name] for name in sums}


class Task(ABC):
    """Base class of every task plugin (built by Hydra from `conf/task/<name>.yaml`)."""

    name: str = "task"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse, when the class is defined, a task written to the guide before `score` became
        `process_results` and scoring got the earlier results: such a class would be scored by the base
        class's QA default, or fail mid-run. Raises KBenchError naming what to implement."""
        super().__init_subclass__(**kwargs)
        guide = "(docs/adding_a_task.md)"
        if "score" in cls.__dict__:
            raise KBenchError(f"{cls.__qualname__} defines score(probe_set, outputs); a task computes its per-probe "
                              "metrics in process_results(probe_set, outputs, earlier) now, `earlier` being the "
                              f"results of the run's earlier steps {guide}: rename it and accept `earlier`")
        for name, arguments in (("process_results", "probe_set, outputs, earlier"), ("step_metrics", "results, earlier"),
                                ("metric_protocols", "results")):
            method = cls.__dict__.get(name)
            if method is not None and not _accepts(method, arguments.count(",") + 1):
                raise KBenchError(f"{cls.__qualname__}.{name} must accept ({arguments}): the runner passes them "
                                  f"{guide}")

    @abstractmethod
    def steps(self) -> Sequence[Step]:
        """The injection steps, in order."""

    def training_knowledge(self) -> list[Knowledge]:
        """A held-out split, disjoint from every step's knowledge, for methods that train once before
        any injection (e.g. RECIPE's prompt encoder). Default: none."""
        return []

    def process_results(self, probe_set: ProbeSet, outputs: Sequence[Answer | TargetScore],
                        earlier: Sequence[ProbeResult] = ()) -> list[dict[str, float]]:
        """Per-probe metrics of one probe set's outputs (aligned with `probe_set.probes`). `earlier`: every
        result of the run's earlier steps, where a metric comparing with a reference (scored at an earlier
        step) finds it. Default: QA metrics of generated answers
        against the gold answers, plus retrieval recall when the method reported what it retrieved.
        Raises NotImplementedError for a probe set the task does not score."""
        if probe_set.scorer != "qa" or probe_set.output_type != "generate":
            raise NotImplementedError(f"{type(self).__name__} cannot score probe set {probe_set.name!r}")
        return [qa.qa_scores(out.text, probe.answers) | retrieval.retrieval_scores(out.meta, probe.knowledge_id)
                for probe, out in zip(probe_set.probes, outputs)]

    def step_metrics(self, results: Sequence[ProbeResult], earlier: Sequence[ProbeResult] = ()) -> dict[str, float]:
        """Metrics logged after one step from its `results`; `earlier` holds every earlier step's results
        (for a metric relative to an earlier step). Default: the mean over that step's probes."""
        return mean_metrics(results)

    def summarize(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        """Final flat metrics of the run. Default: the mean over every probe of every step."""
        return mean_metrics(results)

    def metric_samples(self, results: Sequence[ProbeResult]) -> dict[str, MetricSample]:
        """What each final metric averages, for its bootstrap interval (runners.results.metric_uncertainty):
        per metric name, the values and the independent unit each belongs to. Default: every per-probe
        metric, the unit being the question (a probe id asked at several steps is one unit). A metric whose
        sample does not average to its `summarize` value (a ratio, a retention summary) gets no interval."""
        samples: dict[str, MetricSample] = {}
        for result in results:
            for name, value in result.metrics.items():
                sample = samples.setdefault(name, MetricSample([], [], "question"))
                sample.values.append(value)
                sample.units.append(result.probe.query.id)
        return samples

    def report(self, results: Sequence[ProbeResult], output_dir: Path) -> dict[str, Any]:
        """Structured results beyond the flat metrics (e.g. a retention matrix), stored under
        `task_report` in the record; files such as plots may be written into `output_dir`. Default: none."""
        return {}

    def metric_protocols(self, results: Sequence[ProbeResult] = ()) -> dict[str, str]:
        """How each metric of `summarize(results)` was computed (recorded beside the numbers). Default: the
        QA protocols, and retrieval recall's when a method reported its retrieval in `results`."""
        retrieved = any(name in retrieval.PROTOCOLS for result in results for name in result.metrics)
        return dict(qa.PROTOCOLS) | (retrieval.PROTOCOLS if retrieved else {})

    def describe(self) -> dict[str, Any]:
        """Facts about the data actually used (counts, filters), carried into the record."""
        return {}


def _accepts(method: Callable[..., Any], n: int) -> bool:
    """Whether `method` (a function defined on a class) takes `n` positional arguments after `self`."""
    parameters = list(inspect.signature(method).parameters.values())[1:]
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return True
    return len([p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]) >= n
