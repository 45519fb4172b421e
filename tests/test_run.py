"""The entry point end to end: `run.py` as a subprocess, the record it writes, and every bad-input case."""
import json
from pathlib import Path

import pytest

from core.io import cache_dir
from core.types import DataError, KBenchError
from runners.build import ConfigError, build
from runners.experiment import Experiment
from runners.overrides import unknown_override
from tests.conftest import compose_config, read_record, run_cli

TINY = ["model=tiny", "logger=none"]
RECORD_KEYS = {"status", "error", "config", "metrics", "steps", "timings", "extra_storage_bytes", "versions",
               "git_commit", "seed", "run_id", "method", "task", "model", "metric_protocols", "method_info"}


def run_in_process(tmp_path: Path, *overrides: str) -> dict:
    """Compose the config like run.py and run the experiment here (fast: no interpreter start-up)."""
    cfg = compose_config(*overrides)
    try:
        Experiment(cfg, tmp_path, names={"method": "m", "task": "t", "model": "tiny"}).run()
    except Exception:
        pass  # the record must say what happened; the tests read it
    return read_record(tmp_path)


def test_cli_tiny_ft_sentences_on_pwc_writes_a_complete_record(tmp_path, shared_dir):
    pwc = shared_dir / "data/pwc/pwc_test_sample.jsonl"
    result = run_cli(*TINY, "method=ft_sentences", "task=pwc", f"task.path={pwc}", "task.limit=2",
                     "method.epochs=1", "method.sentences.generator.n_sentences=4", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(tmp_path)
    assert RECORD_KEYS <= set(record)
    assert record["status"] == "done" and record["error"] is None
    assert record["method"] == "ft_sentences" and record["task"] == "pwc" and record["model"] == "tiny"
    assert set(record["metrics"]) == {"qa_f1", "exact_match", "contains"}
    assert all(0.0 <= v <= 1.0 for v in record["metrics"].values())
    assert len(record["steps"]) == 2 and record["timings"]["inject"] > 0
    assert record["extra_storage_bytes"] > 0  # an unmerged LoRA adapter
    assert record["config"]["method"]["epochs"] == 1
    assert {"python", "torch", "transformers", "peft", "kbench"} <= set(record["versions"])
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    questions = record["method_info"]["task"]["n_questions"]
    assert len(predictions) == questions and {"prediction", "gold", "metrics", "step"} <= set(predictions[0])
    assert "qa_f1" in result.stdout  # the results table


def test_cli_wandb_offline_logger_needs_no_login(tmp_path):
    result = run_cli("model=tiny", "method=base", "task.limit=1", f"hydra.run.dir={tmp_path}",
                     env={"WANDB_API_KEY": None, "WANDB_MODE": None, "HOME": str(tmp_path),  # no ~/.netrc login
                          "KBENCH_CACHE": str(cache_dir())})
    assert result.returncode == 0, result.stderr[-3000:]
    assert read_record(tmp_path)["status"] == "done"
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
    assert "WANDB_API_KEY" not in (tmp_path / "record.json").read_text()


def test_cli_unknown_method_keeps_hydras_message():
    result = run_cli(*TINY, "method=nope")
    assert result.returncode != 0
    assert "Could not find 'method/nope'" in result.stderr
    assert "Available options" in result.stderr and "context" in result.stderr


def test_cli_mistyped_key_gets_the_known_options_not_hydras_plus_advice(tmp_path):
    result = run_cli(*TINY, "method=memoir", "task=editing", "method.threshhold=0.5", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert ("ConfigError: method.threshhold: unknown option for methods.memoir.MemoirMethod; "
            "known options: ['answer_marker'") in result.stderr
    assert "'threshold'" in result.stderr and "use +method" not in result.stderr


def test_a_key_one_swept_method_lacks_is_named_with_that_method():
    conf = Path(__file__).parents[1] / "conf"
    message = unknown_override(["-m", "model=tiny", "task=editing", "method=memoir,grace", "method.threshold=0.5"], conf)
    assert message is not None and message.startswith("method.threshold: unknown option for methods.grace.GraceMethod")
    assert "'eps'" in message and message.endswith("(with model=tiny task=editing method=grace)")
    # keys every job has, Hydra's own `+` additions and malformed overrides are left alone
    assert unknown_override(["-m", "model=tiny", "method=memoir,grace", "method.lr=0.1", "seed=0,1"], conf) is None
    assert unknown_override(["model=tiny", "+method.extra=1"], conf) is None
    assert unknown_override(["model=tiny", "method.lr=[1,"], conf) is None


def test_cli_wrong_override_type_names_the_key(tmp_path):
    result = run_cli(*TINY, "task.n_contexts=abc", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert "task.n_contexts: expected int >= 1, got 'abc'" in result.stderr
    assert "Traceback" not in result.stderr  # one line naming the key, not Hydra's traceback
    record = read_record(tmp_path)
    assert record["status"] == "failed" and "ConfigError" in record["error"]


def test_wrong_types_and_unknown_keys_in_process():
    cfg = compose_config("model=tiny", "method=ft_sentences", "method.lr=fast", "method.update.mode=lora")
    with pytest.raises(ConfigError, match=r"method.lr: expected float > 0, got 'fast' \(str\)"):
        build(cfg.method, "method", lm=None)
    cfg = compose_config("model=tiny", "+task.n_context=3")
    with pytest.raises(ConfigError, match=r"task.n_context: unknown option .* known options: .*n_contexts"):
        build(cfg.task, "task")


def test_missing_data_file_fails_the_run_with_path_and_format(tmp_path):
    record = run_in_process(tmp_path, *TINY, "task=pwc", "task.path=/no/such/pwc.jsonl")
    assert record["status"] == "failed"
    assert "DataError" in record["error"] and "/no/such/pwc.jsonl" in record["error"]
    assert '"input": <context>, "prompt": <question>, "answer": <answer>' in record["error"]


def test_malformed_jsonl_fails_the_run_with_file_line_and_field(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"input": "c", "prompt": "q", "answer": "a"}\n{"input": "c", "answer": "a"}\n')
    record = run_in_process(tmp_path / "run", *TINY, "task=pwc", f"task.path={data}")
    assert record["status"] == "failed" and f"{data}:2: missing field(s) ['prompt']" in record["error"]


def test_empty_context_fails_the_run(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text('{"input": "", "prompt": "q", "answer": "a"}\n')
    record = run_in_process(tmp_path / "run", *TINY, "task=pwc", f"task.path={data}")
    assert record["status"] == "failed" and "field 'input' (the context) is empty" in record["error"]


def test_missing_model_path_says_how_to_get_a_model(tmp_path):
    record = run_in_process(tmp_path, "model=hf", "model.name_or_path=/no/such/model", "logger=none")
    assert record["status"] == "failed"
    assert "model path does not exist: /no/such/model" in record["error"]
    assert "model=gemma3_270m" in record["error"] and "--local-dir" in record["error"]


def test_kbench_errors_are_user_errors():
    assert issubclass(DataError, KBenchError) and issubclass(ConfigError, KBenchError)


@pytest.mark.slow
def test_embedded_model_reads_context_and_base_cannot(tmp_path):
    """The embedded Gemma 3 270M: the premise of every injection experiment."""
    context = run_in_process(tmp_path / "ctx", "method=context", "task.limit=2", "logger=none")
    base = run_in_process(tmp_path / "base", "method=base", "task.limit=2", "logger=none")
    assert context["status"] == base["status"] == "done"
    assert context["metrics"]["qa_f1"] >= 0.5
    assert base["metrics"]["qa_f1"] <= 0.15
