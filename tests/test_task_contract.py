"""The task contract a plugin implements (docs/adding_a_task.md): a class written to the guide before
`score` became `process_results(probe_set, outputs, earlier)` is refused when it is defined, naming
the method to implement; a class written to the current guide is scored through its own method."""
import pytest

from core.types import Answer, KBenchError, Probe, ProbeSet, Query
from runners.results import score_probe_set
from tasks.base import Task


def test_a_task_from_the_old_guide_defining_score_is_refused_naming_process_results():
    with pytest.raises(KBenchError, match=r"OldTask defines score\(probe_set, outputs\).*process_results\(probe_set, "
                                          r"outputs, earlier\)"):
        class OldTask(Task):
            def steps(self):
                return []

            def score(self, probe_set, outputs):
                return [{"x": 1.0} for _ in outputs]


@pytest.mark.parametrize("name, signature, expected", [
    ("process_results", "(self, probe_set, outputs)", "probe_set, outputs, earlier"),
    ("step_metrics", "(self, results)", "results, earlier"),
    ("metric_protocols", "(self)", "results"),
])
def test_an_override_without_the_arguments_the_runner_passes_is_refused(name, signature, expected):
    namespace: dict = {}
    exec(f"def {name}{signature}:\n    return {{}}", namespace)
    with pytest.raises(KBenchError, match=rf"Short\.{name} must accept \({expected}\)"):
        type("Short", (Task,), {"steps": lambda self: [], name: namespace[name]})


def test_a_task_from_the_current_guide_is_scored_through_its_process_results():
    class Counting(Task):
        def steps(self):
            return []

        def process_results(self, probe_set, outputs, earlier=()):
            return [{"earlier": float(len(earlier)), "length": float(len(o.text))} for o in outputs]

        def step_metrics(self, results, *rest):  # *args takes `earlier` too
            return {}

    probe_set = ProbeSet("qa", [Probe(Query(id="q0", prompt="?"), answers=("a",))])
    first = score_probe_set(Counting(), 0, probe_set, [Answer("abc")])
    again = score_probe_set(Counting(), 1, probe_set, [Answer("abcd")], first)
    assert [r.metrics for r in first + again] == [{"earlier": 0.0, "length": 3.0}, {"earlier": 1.0, "length": 4.0}]
