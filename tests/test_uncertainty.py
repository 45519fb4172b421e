"""Bootstrap intervals and paired comparisons (metrics/uncertainty.py, runners/compare.py) on known values."""
from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats

from core.types import KBenchError
from metrics.uncertainty import bootstrap_mean, paired_difference
from runners.compare import compare_runs, main


def test_one_probe_per_unit_is_scipys_bootstrap_of_the_mean():
    sample = np.random.default_rng(3).normal(0.5, 0.2, size=40)
    ours = bootstrap_mean(sample, n_resamples=999, seed=7)
    theirs = stats.bootstrap((sample,), np.mean, n_resamples=999, method="percentile",
                             random_state=np.random.default_rng(7))
    assert ours.mean == pytest.approx(sample.mean())
    # same resampling scheme, different but equivalent statistic (ratio of sums vs mean): same distribution
    assert ours.se == pytest.approx(theirs.standard_error, rel=0.15)
    assert ours.low == pytest.approx(theirs.confidence_interval.low, abs=0.02)
    assert ours.high == pytest.approx(theirs.confidence_interval.high, abs=0.02)
    assert ours.se == pytest.approx(sample.std(ddof=1) / np.sqrt(len(sample)), rel=0.15)  # the textbook SE


def test_units_are_resampled_whole():
    # 3 edits with 2 probes each: unit means 1, 0.5, 0 -> the micro-average 0.5, and only 3 units vary
    result = bootstrap_mean([1, 1, 1, 0, 0, 0], units=["e1", "e1", "e2", "e2", "e3", "e3"], n_resamples=500)
    assert result.mean == pytest.approx(0.5) and result.n_units == 3
    assert 0.0 <= result.low < 0.5 < result.high <= 1.0
    # resampling probes instead of edits would understate the spread of these clustered values
    assert result.se > bootstrap_mean([1, 1, 1, 0, 0, 0], n_resamples=500).se


def test_degenerate_samples_have_zero_spread():
    result = bootstrap_mean([1.0, 1.0, 1.0])
    assert (result.mean, result.se, result.low, result.high) == (1.0, 0.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="no values"):
        bootstrap_mean([])


def test_identical_runs_differ_by_zero_with_p_one():
    values = list(np.random.default_rng(0).random(30))
    result = paired_difference(values, values)
    assert (result.difference, result.se, result.p_value) == (0.0, 0.0, 1.0)


def test_a_known_shift_is_detected_and_measured():
    rng = np.random.default_rng(1)
    a = rng.random(60)
    b = a + 0.2 + rng.normal(0, 0.05, 60)
    result = paired_difference(a, b, n_resamples=2000)
    assert result.difference == pytest.approx(np.mean(b - a))
    assert result.low < 0.2 < result.high and result.p_value < 0.01
    # every one of 4 units better by exactly 1: the exact sign-flip p-value is 2 / 2^4
    assert paired_difference([0, 0, 0, 0], [1, 1, 1, 1]).p_value == pytest.approx(0.125)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1, 2], [1])


def _run(directory, task, rows):
    directory.mkdir()
    (directory / "record.json").write_text(json.dumps({"task": task, "status": "done"}))
    (directory / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return directory


def _row(step, probe_id, f1, knowledge="k", prompt=None):
    return {"step": step, "probe_set": "qa", "probe_id": probe_id, "knowledge_id": knowledge,
            "prompt": prompt or f"Q{probe_id}?", "metrics": {"qa_f1": f1}}


def test_compare_pairs_shared_probes_and_prints_a_table(tmp_path, capsys):
    a = _run(tmp_path / "a", "synthetic", [_row(0, str(i), 0.0) for i in range(8)] + [_row(0, "only-a", 1.0)])
    b = _run(tmp_path / "b", "synthetic", [_row(0, str(i), 1.0 if i < 6 else 0.0) for i in range(8)])
    table = compare_runs(a, b, n_resamples=500)
    row = table.iloc[0]
    assert (row.metric, row.n_probes, row.n_units, row.unit) == ("qa_f1", 8, 8, "probe")
    assert row.difference == pytest.approx(0.75) and row.mean_a == 0.0 and row.p_value < 0.05
    assert main([str(a), str(b), "--resamples", "200"]) == 0
    assert "qa_f1" in capsys.readouterr().out


def test_compare_groups_editing_probes_by_edit_and_refuses_unpaired_runs(tmp_path):
    rows_a = [_row(0, f"{e}-{p}", 0.0, knowledge=f"edit{e}") for e in range(3) for p in range(3)]
    rows_b = [_row(0, f"{e}-{p}", 1.0, knowledge=f"edit{e}") for e in range(3) for p in range(3)]
    table = compare_runs(_run(tmp_path / "a", "editing", rows_a), _run(tmp_path / "b", "editing", rows_b), n_resamples=200)
    assert (table.iloc[0].n_units, table.iloc[0].unit) == (3, "knowledge")
    other = _run(tmp_path / "c", "editing", [_row(0, "0-0", 1.0, prompt="something else?")])
    with pytest.raises(KBenchError, match="different prompts"):
        compare_runs(tmp_path / "a", other)
    none = _run(tmp_path / "d", "editing", [_row(5, "x", 1.0)])
    with pytest.raises(KBenchError, match="share no probe"):
        compare_runs(tmp_path / "a", none)


# ---------------------------------------------------------------------- intervals stored in the record
def _score_all(task, step, outputs_of):
    from runners.results import score_probe_set
    return [r for ps in step.probe_sets for r in score_probe_set(task, step.index, ps, outputs_of(ps))]


def test_a_qa_metric_gets_its_bootstrap_over_questions_and_a_mismatch_gets_none():
    from core.types import Answer
    from runners.results import metric_uncertainty
    from tasks.synthetic import SyntheticTask

    task = SyntheticTask(n_contexts=2)  # 2 contexts x 4 questions, one step each (single mode)
    results = []
    for step in task.steps():  # the first two questions of each context answered right, the others not
        results += _score_all(task, step, lambda ps: [Answer(p.answers[0] if i < 2 else "zzz") for i, p in enumerate(ps.probes)])
    metrics = task.summarize(results)
    assert metrics["exact_match"] == 0.5
    stored = metric_uncertainty(task, results, metrics)
    entry = stored["exact_match"]
    assert entry["unit"] == "question" and entry["n_units"] == 8
    expected = bootstrap_mean([r.metrics["exact_match"] for r in results])  # same seed: the same numbers
    assert entry["se"] == pytest.approx(expected.se) and entry["ci95"] == pytest.approx([expected.low, expected.high])
    assert entry["se"] == pytest.approx(0.5 / np.sqrt(8), rel=0.15)  # sqrt(p(1-p)/n), the textbook SE
    # a value that is not the mean of its sample (a ratio, a summary) gets no interval rather than a wrong one
    assert "exact_match" not in metric_uncertainty(task, results, metrics | {"exact_match": 0.75})


def test_editing_resamples_edits_macro_averaged_two_edits_by_hand():
    from core.types import TargetScore
    from runners.results import metric_uncertainty
    from tasks.base import ProbeResult
    from tasks.editing import EditingTask

    task = EditingTask(n_edits=2, n_train=0, general_questions=[["Q?", "A"]])
    final = task.steps()[-1]
    probe_set = next(ps for ps in final.probe_sets if ps.name == "after_all/generality_tf")
    # edit 0: its 3 rephrases right; edit 1: 1 of 3 -> per-edit means 1 and 1/3, macro average 2/3
    hits = {p.query.id: float(p.knowledge_id.endswith("-0") or p.query.id.endswith("rephrase0")) for p in probe_set.probes}
    results = [ProbeResult(final.index, probe_set.name, p, TargetScore(-1, 2, hits[p.query.id]),
                           {probe_set.name: hits[p.query.id]}) for p in probe_set.probes]
    metrics = task.summarize(results)
    entry = metric_uncertainty(task, results, metrics, n_resamples=4000)["after_all/generality_tf"]
    assert metrics["after_all/generality_tf"] == pytest.approx(2 / 3)
    assert entry["unit"] == "edit" and entry["n_units"] == 2
    # two units: resampled means 1/3, 2/3, 1 with probabilities 1/4, 1/2, 1/4 -> se = sqrt(1/18), interval [1/3, 1]
    assert entry["se"] == pytest.approx(np.sqrt(1 / 18), rel=0.05)
    assert entry["ci95"] == pytest.approx([1 / 3, 1.0])


def test_a_tiny_editing_run_stores_intervals_beside_its_means(tmp_path):
    from runners.experiment import Experiment
    from tests.conftest import compose_config, read_record

    cfg = compose_config("model=tiny", "logger=none", "method=base", "task=editing", "task.n_edits=3",
                         "task.max_new_tokens=4")
    Experiment(cfg, tmp_path, names={"method": "base", "task": "editing", "model": "tiny"}).run()
    record = read_record(tmp_path)
    stored = record["metric_uncertainty"]
    assert set(stored) <= set(record["metrics"]) and "after_all/reliability_tf" in stored
    assert stored["after_all/locality"] == {"se": 0.0, "ci95": [1.0, 1.0], "n_units": 3, "unit": "edit"}
    for name, entry in stored.items():
        assert entry["ci95"][0] <= record["metrics"][name] <= entry["ci95"][1]
