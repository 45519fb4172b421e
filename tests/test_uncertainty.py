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
