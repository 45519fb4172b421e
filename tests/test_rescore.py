"""Offline rescoring: rebuilt from record + predictions, it reproduces a run exactly, and a scoring
override changes the numbers the way its definition says, without touching the original files."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.types import Answer, Probe, Query, TargetScore
from runners.experiment import Experiment
from core.predictions import PredictionError, output_of
from runners.rescore import RescoreError, rescore
from tasks.base import ProbeResult
from tests.conftest import ROOT, compose_config, read_record
from tests.test_sequential import copy_data

TINY = ["model=tiny", "logger=none", "method=context"]
# the copyable facts of test_sequential, answered with some trailing words: F1 and `contains` differ
SMALL_SEQUENTIAL = ["task=sequential_pwc", "task.n_sequences=2", "task.length=2", "task.source.prompt_template='{question}'",
                    "task.source.max_new_tokens=8"]


def run(directory: Path, *overrides: str) -> Path:
    Experiment(compose_config(*TINY, *overrides), directory, names={"method": "context", "task": "t", "model": "tiny"}).run()
    return directory


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}


@pytest.fixture(scope="module")
def sequential_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("seq")
    data = copy_data(root / "copy.jsonl")
    return run(root / "run", *SMALL_SEQUENTIAL, f"task.source.path={data}")


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("qa"), "task=synthetic", "task.n_contexts=2", "task.max_new_tokens=6")


def predictions(directory: Path) -> list[dict]:
    return [json.loads(line) for line in (directory / "predictions.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("which", ["sequential_run", "qa_run"])
def test_rescoring_without_overrides_reproduces_the_run_exactly(which, request):
    directory = request.getfixturevalue(which)
    before = snapshot(directory)
    original = read_record(directory)
    record, out = rescore(directory)
    assert out.parent == directory and out.name.startswith("rescored-")
    assert record["metrics"] == original["metrics"]  # exact, not approximate
    assert record["metric_protocols"] == original["metric_protocols"]
    assert [s["metrics"] for s in record["steps"]] == [s["metrics"] for s in original["steps"]]
    assert record["task_report"] == original["task_report"]
    assert record["run_id"] == original["run_id"] and record["rescore"]["overrides"] == []
    assert read_record(out) == record
    assert [r["metrics"] for r in predictions(out)] == [r["metrics"] for r in predictions(directory)]
    assert snapshot(directory) == before  # the original record, predictions and plot are untouched


def test_a_scoring_override_changes_the_metrics_as_defined(sequential_run):
    record, out = rescore(sequential_run, ["task.metric=contains"])
    assert set(record["metrics"]) == {"final_contains", "first_final_contains", "efficacy_contains",
                                      "auc_contains", "unseen_contains"}
    assert record["config"]["task"]["metric"] == "contains" and record["run_id"] != read_record(sequential_run)["run_id"]
    assert record["rescore"]["original_metrics"] == read_record(sequential_run)["metrics"]
    # recompute final_contains by hand from the original per-probe `contains`: the last step of each sequence
    rows = predictions(sequential_run)
    per_sequence = []
    for sequence in (0, 1):
        last = [r for r in rows if r["probe_meta"]["sequence"] == sequence and r["probe_meta"]["injections"] == 2]
        per_context = [np.mean([r["metrics"]["contains"] for r in last if r["probe_meta"]["position"] == i]) for i in (0, 1)]
        per_sequence.append(np.mean(per_context))
    assert record["metrics"]["final_contains"] == pytest.approx(np.mean(per_sequence))
    assert (out / "retention.png").stat().st_size > 0
    original = record["rescore"]["original_metrics"]
    # the two definitions disagree on these answers ("Harvoltol" contains "Harvolt" at F1 0; "Sobei Kler" has
    # F1 0.5 for "Sobei Klerdus" but does not contain it), so the rescored AUC must move
    assert record["metrics"]["auc_contains"] != pytest.approx(original["auc_qa_f1"])


def test_changed_predictions_change_the_metrics(sequential_run, tmp_path):
    """Rescoring really reads the predictions: a perfect answer everywhere gives F1 1 everywhere."""
    copy = tmp_path / "run"
    copy.mkdir()
    (copy / "record.json").write_bytes((sequential_run / "record.json").read_bytes())
    rows = [r | {"prediction": r["gold"][0]} for r in predictions(sequential_run)]
    (copy / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    record, _ = rescore(copy / "predictions.jsonl")
    assert all(value == 1.0 for name, value in record["metrics"].items() if name != "unseen_qa_f1")


def test_bad_overrides_and_mismatched_predictions_are_refused(sequential_run, tmp_path):
    with pytest.raises(RescoreError, match="only task.\\* keys change scoring"):
        rescore(sequential_run, ["method.lr=1"])
    with pytest.raises(RescoreError, match="task.nope: not in the run's config; known keys under task: .*metric"):
        rescore(sequential_run, ["task.nope=1"])
    with pytest.raises(RescoreError, match="only plain task.KEY=VALUE"):
        rescore(sequential_run, ["+task.extra=1"])
    with pytest.raises(RescoreError, match="prediction.s. match no probe of the rebuilt task, e.g. step 3.*change the "
                                           "steps or probes"):
        rescore(sequential_run, ["task.n_sequences=1"])
    with pytest.raises(RescoreError, match=r"predictions.jsonl:\d+: the prediction answers another prompt .*Velmora"):
        rescore(sequential_run, ["task.source.drop_questions_containing=['river does Velmora']"])  # renumbers the questions
    with pytest.raises(RescoreError, match="answers another prompt .* cannot change what was asked"):
        rescore(sequential_run, ["task.source.prompt_template='Q: {question}'"])
    assert not [p for p in sequential_run.iterdir() if p.is_dir() and p.name.startswith("rescored-")
                and not (p / "record.json").exists()]  # a refused rescoring leaves no empty directory

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "record.json").write_bytes((sequential_run / "record.json").read_bytes())
    lines = (sequential_run / "predictions.jsonl").read_text().splitlines()
    (broken / "predictions.jsonl").write_text("\n".join(lines + lines[:1]) + "\n")
    with pytest.raises(RescoreError, match=rf"predictions.jsonl:{len(lines) + 1}: duplicate prediction .*first at .*:1\)"):
        rescore(broken)
    (broken / "predictions.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(RescoreError, match="no prediction for step 5"):
        rescore(broken)
    record = read_record(broken) | {"status": "failed", "error": "KeyboardInterrupt: "}
    (broken / "record.json").write_text(json.dumps(record))
    with pytest.raises(RescoreError, match="status is 'failed'.*only finished runs"):
        rescore(broken)
    with pytest.raises(RescoreError, match="not found"):
        rescore(tmp_path / "nowhere")


def test_log_likelihood_rows_rebuild_the_target_score():
    probe = Probe(query=Query(id="q", prompt="p"), answers=(" t",))
    score = TargetScore(logprob=-1.25, n_tokens=2, token_accuracy=0.5, predicted_ids=(7, 9))
    row = json.loads(json.dumps(ProbeResult(0, "ll", probe, score, {}).to_row()))
    assert output_of(row, "here") == score
    answer = Answer("Paris", meta={"retrieved": ["k1"]})
    assert output_of(json.loads(json.dumps(ProbeResult(0, "qa", probe, answer, {}).to_row())), "here") == answer
    with pytest.raises(PredictionError, match="here: .*without target_token_accuracy"):
        output_of({k: v for k, v in row.items() if k != "target_token_accuracy"}, "here")


def test_cli_prints_the_comparison_and_exits_nonzero_on_bad_input(qa_run):
    result = subprocess.run([sys.executable, "-m", "runners.rescore", str(qa_run), "--out", str(qa_run / "cli")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "original" in result.stdout and "qa_f1" in result.stdout and (qa_run / "cli" / "record.json").is_file()
    result = subprocess.run([sys.executable, "-m", "runners.rescore", str(qa_run), "task.n_contexts=x"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1 and "task.n_contexts: expected int >= 1, got 'x'" in result.stderr
    assert "Traceback" not in result.stderr


def test_recall_at_k_tasks_rescore_too_and_their_scoring_knobs_apply(tmp_path, shared_dir):
    """CRS (INSPIRED): stored generations replaced by the gold title first; `exclude_seen` then drops
    exactly the turns whose gold title was already mentioned in the dialogue."""
    directory = run(tmp_path / "crs", "method=base", "task=inspired", "task.limit=3", "task.max_new_tokens=2",
                    f"task.dataset_dir={shared_dir / 'data/inspired'}")
    rows = [r | {"prediction": f" {r['gold'][0]} (2019)\n2. Titanic\n"} for r in predictions(directory)]
    (directory / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert all(len(r["gold"]) == 1 for r in rows)
    record, _ = rescore(directory)
    assert record["metrics"]["recall@1"] == 1.0
    record, _ = rescore(directory, ["task.exclude_seen=true"])
    unseen_gold = [r["gold"][0] not in r["probe_meta"]["seen"] for r in rows]
    assert 0 < sum(unseen_gold) < len(rows)  # else this test proves nothing
    assert record["metrics"]["recall@1"] == pytest.approx(np.mean(unseen_gold))
