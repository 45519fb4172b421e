"""Issue 13 (runs that never collide, never silently redo work, never load pickles, and say what they
did) and issue 12 item 3 (a changed data file is never served from an old run), end to end on the
tiny model and real files: run.py as a subprocess where the entry point matters, in-process otherwise."""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from core.io import atomic_write_json, atomic_write_text, file_digest, to_json
from core.models import hub_unreachable, load_pretrained
from core.progress import heartbeat, progress
from core.types import KBenchError
from runners import report, resume
from runners.experiment import Experiment
from tests.conftest import ROOT, compose_config, read_record, run_cli

TINY = ["model=tiny", "logger=none"]


def strict(text: str):
    """json.loads that refuses NaN / Infinity / -Infinity (RFC 8259 has no such tokens)."""
    def refuse(token):
        raise ValueError(f"non-RFC 8259 token {token}")
    return json.loads(text, parse_constant=refuse)


def run_in_process(run_dir: Path, *overrides: str) -> dict:
    try:
        Experiment(compose_config(*overrides), run_dir, names={"method": "m", "task": "t", "model": "tiny"}).run()
    except Exception:
        pass  # the record says what happened
    return read_record(run_dir)


def start(args: list[str], cwd: Path = ROOT, log: Path | None = None) -> subprocess.Popen:
    out = log.open("w") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *args], cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True, env=os.environ | {"TQDM_DISABLE": "1"})


def records_in(directory: Path) -> list[Path]:
    return sorted(directory.glob("*/record.json"))


# ------------------------------------------------------------------ 1. a rerun finds its own records
def test_a_killed_sweep_outside_outputs_reruns_exactly_the_missing_runs(tmp_path):
    """The issue's case: `hydra.sweep.dir` elsewhere than ./outputs (and resume.search_dir=null, so only
    the sweep's own folder can be searched), killed after two runs; the same command runs the rest."""
    sweep = tmp_path / "sweep"
    command = ["-m", *TINY, "method=base,context", "seed=0,1", "task.limit=2", "resume.search_dir=null",
               f"hydra.sweep.dir={sweep}"]
    process = start(command, log=tmp_path / "first.log")
    deadline = time.monotonic() + 300
    while True:
        statuses = [strict(p.read_text())["status"] for p in records_in(sweep)]
        if statuses.count("done") >= 2 and "running" in statuses:
            break
        assert process.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "the sweep did not get half way in time"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_before = {p: p.read_bytes() for p in records_in(sweep) if strict(p.read_text())["status"] == "done"}
    assert len(done_before) == 2

    again = run_cli(*command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("skipped: run") == 2 and "Launching 4 jobs" in again.stdout + again.stderr
    assert all(p.read_bytes() == text for p, text in done_before.items())  # not recomputed, not rewritten
    records = [strict(p.read_text()) for p in records_in(sweep)]
    assert len(records) == 4 and all(r["status"] == "done" for r in records)
    killed = [r for r in records if r["resumed_from"]]
    assert len(killed) == 1 and Path(killed[0]["resumed_from"]["directory"]).parent == sweep


# ------------------------------------------------------------------ 2. a run owns its folder
def test_two_identical_runs_started_together_write_two_complete_records(tmp_path):
    """Default folders: the time has second resolution, the launching pid tells the two apart."""
    args = [*TINY, "method=context", "task.limit=2", "resume.search_dir=null"]
    processes = [start(args, cwd=tmp_path, log=tmp_path / f"{i}.log") for i in range(2)]
    assert [p.wait(timeout=600) for p in processes] == [0, 0], (tmp_path / "0.log").read_text()[-3000:]
    folders = sorted((tmp_path / "outputs/runs").iterdir())
    assert len(folders) == 2
    for folder in folders:
        record = strict((folder / "record.json").read_text())
        lines = (folder / "predictions.jsonl").read_text().splitlines()
        assert record["status"] == "done" and len(lines) == record["method_info"]["task"]["n_questions"] == 8
        assert len({strict(line)["probe_id"] for line in lines}) == len(lines)  # nothing written twice


def test_a_folder_held_by_a_live_run_is_refused_and_never_written(tmp_path):
    run_dir = tmp_path / "run"
    holder = resume.claim_folder(run_dir, "some-run-id")  # this test process plays the running run
    try:
        result = run_cli(*TINY, "method=base", "task.limit=1", f"hydra.run.dir={run_dir}")
        assert result.returncode != 0
        assert f"{run_dir} is in use by a run still going (pid {os.getpid()}" in result.stderr
        assert not (run_dir / "record.json").exists() and not (run_dir / "predictions.jsonl").exists()
    finally:
        holder.close()
    assert run_cli(*TINY, "method=base", "task.limit=1", f"hydra.run.dir={run_dir}").returncode == 0
    assert read_record(run_dir)["status"] == "done"
    # the folder now holds that run: another config is not written over it
    other = run_cli(*TINY, "method=context", "task.limit=1", f"hydra.run.dir={run_dir}")
    assert other.returncode != 0 and "holds the record of another run" in other.stderr
    assert read_record(run_dir)["config"]["method"]["_target_"].endswith("BaseMethod")


def test_same_folder_launched_twice_at_once_never_interleaves(tmp_path):
    """The issue's case with an explicit shared folder: one run computes, the other refuses (or, if it
    starts after the first is done, skips it); predictions.jsonl has each probe once."""
    run_dir = tmp_path / "shared"
    args = [*TINY, "method=context", "task.limit=2", "resume.search_dir=null", f"hydra.run.dir={run_dir}"]
    processes = [start(args, log=tmp_path / f"{i}.log") for i in range(2)]
    codes = [p.wait(timeout=600) for p in processes]
    logs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
    assert 0 in codes
    for code, text in zip(codes, logs):
        assert code == 0 or "is in use by a run still going" in text
    record = strict((run_dir / "record.json").read_text())
    lines = (run_dir / "predictions.jsonl").read_text().splitlines()
    assert record["status"] == "done" and len(lines) == record["method_info"]["task"]["n_questions"]


# ------------------------------------------------------------------ 3. truncation is counted
def test_truncation_of_a_long_context_is_counted_and_keeps_the_question(tmp_path):
    """A context far beyond the tiny model's max_length (4096 tokens) with method=context."""
    words = " ".join(f"Velmora{i} lies north of Brask{i}." for i in range(2500))  # ~15k tokens
    data = tmp_path / "long.jsonl"
    rows = [{"input": words + " The founder of Velmora was Ada Quill.", "prompt": q, "answer": "Ada Quill"}
            for q in ("Who founded Velmora?", "Who was Velmora's founder?")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    record = run_in_process(tmp_path / "run", *TINY, "method=context", "task=pwc", f"task.path={data}")
    assert record["status"] == "done", record["error"]
    probes = record["truncation"]["probes"]
    assert probes["sequences"] == 2 and probes["tokens_dropped"] > 10_000
    assert "inject" not in record["truncation"]  # method=context trains nothing


def test_a_cut_keeps_the_start_token_and_the_end(tiny_lm):
    ids = tiny_lm.prompt_ids("Question: who? Answer:", context="word " * 3000)
    cut = tiny_lm.fit(ids, 100)
    assert len(cut) == 100 and cut[0] == tiny_lm.tokenizer.bos_token_id and cut[-20:] == ids[-20:]
    assert tiny_lm.truncation == {"sequences": 1, "tokens_dropped": len(ids) - 100}
    batch = tiny_lm.collate([(ids, tiny_lm.encode(" Ada"))])  # training / scoring: the target survives whole
    assert batch.input_ids.shape[1] == tiny_lm.max_length and batch.input_ids[0, 0] == tiny_lm.tokenizer.bos_token_id
    assert tiny_lm.truncation["sequences"] == 2


# ------------------------------------------------------------------ 4. divergence
def test_a_run_that_diverged_to_a_uniform_model_is_failed_and_not_tabled(tmp_path):
    record = run_in_process(tmp_path / "run", *TINY, "method=ft_context", "method.lr=1e9", "task.limit=1",
                            "task.probes=[qa,drift]")
    assert record["status"] == "failed" and record["error"].startswith("DivergedError")
    assert record["diverged"]["reason"] and record["metrics"]  # the numbers stay inspectable
    uniform = math.log(record["config"]["model"]["vocab_size"])
    loss = record["method_info"].get("final_train_loss")
    assert loss == pytest.approx(uniform, rel=2e-3) or "empty" in record["diverged"]["reason"]
    text = report.render([tmp_path])
    assert "Failed or unfinished runs (1):" in text and "DivergedError" in text
    assert "drift/ppl_ratio" not in text.split("Failed or unfinished")[0]  # no 'improved' ratio in a table


# ------------------------------------------------------------------ 5. permissions and strict JSON
@pytest.mark.parametrize("overrides", [
    ["method=ft_context", "method.epochs=1", "task.limit=2", "resume.keep_checkpoints=true"],  # done, checkpoints kept
    ["method=ft_context", "method.lr=nan", "task.limit=1"],  # the NaN in the config
    ["task=sequential", "task.n_sequences=1", "task.length=2", "task.source.n_contexts=2", "method=ft_context",
     "method.epochs=1", "resume.keep_checkpoints=true"],  # a saved LoRA adapter (safetensors writes 0600)
], ids=["done", "nan-config", "method-state"])
def test_every_file_a_run_writes_is_strict_json_with_the_folders_permissions(tmp_path, overrides):
    run_dir = tmp_path / "run"
    run_cli(*TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=ROOT)
    record = strict((run_dir / "record.json").read_text())
    if "method.lr=nan" in overrides:
        assert record["config"]["method"]["lr"] == "NaN" and record["status"] == "failed"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    written = [p for p in files if p.suffix in (".json", ".jsonl")]
    assert len(written) >= (1 if "method.lr=nan" in overrides else 3)  # the record (+ predictions, checkpoints)
    for path in written:
        for line in (path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]):
            strict(line)
    if "task=sequential" in overrides:
        assert list(run_dir.glob("checkpoints/step-*/method/*.safetensors"))
    hydra_mode = (run_dir / ".hydra/config.yaml").stat().st_mode & 0o777  # written by Hydra with open()
    assert {p.relative_to(run_dir).as_posix(): p.stat().st_mode & 0o777 for p in files} == \
        {p.relative_to(run_dir).as_posix(): hydra_mode for p in files}


def test_atomic_writes_take_the_mode_open_would_give(tmp_path):
    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        (tmp_path / "b.json").write_text("{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == (tmp_path / "b.json").stat().st_mode & 0o777 == 0o640


def test_non_finite_numbers_become_strings():
    import numpy as np

    text = to_json({"nan": float("nan"), "inf": [float("inf"), -math.inf], "np": np.float64("nan"),
                    "arr": np.array([1.0, np.inf]), "ok": 0.5})
    assert strict(text) == {"nan": "NaN", "inf": ["Infinity", "-Infinity"], "np": "NaN", "arr": [1.0, "Infinity"],
                            "ok": 0.5}
    assert float(strict(text)["inf"][1]) == -math.inf  # float() reads the names back


# ------------------------------------------------------------------ 6. no pickles, no slow hub failures
@pytest.fixture()
def pickle_only_model(tiny_lm, tmp_path) -> Path:
    folder = tmp_path / "pickled"
    tiny_lm.model.config.save_pretrained(folder)
    tiny_lm.tokenizer.save_pretrained(folder)
    torch.save(tiny_lm.model.state_dict(), folder / "pytorch_model.bin")
    return folder


def test_a_pickle_only_model_folder_is_refused_by_default(pickle_only_model, tmp_path, caplog):
    record = run_in_process(tmp_path / "run", "model=hf", f"model.name_or_path={pickle_only_model}", "logger=none",
                            "method=base", "task.limit=1")
    assert record["status"] == "failed"
    assert "only pickled weights (pytorch_model.bin)" in record["error"] and "model.allow_pickle=true" in record["error"]
    with caplog.at_level(logging.WARNING):
        model, _ = load_pretrained(str(pickle_only_model), "float32", "cpu", False, allow_pickle=True)
    assert "allow_pickle=true" in caplog.text and model.config.hidden_size == 64


def test_a_hub_id_without_a_reachable_hub_fails_at_once(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    record = run_in_process(tmp_path / "run", "model=hf", "model.name_or_path=nobody-here/no-such-model", "logger=none",
                            "method=base", "task.limit=1")
    assert time.monotonic() - started < 20
    assert record["status"] == "failed" and "hub is unreachable (HF_HUB_OFFLINE is set)" in record["error"]
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    started = time.monotonic()
    assert hub_unreachable().startswith("no connection to 127.0.0.1:9") and time.monotonic() - started < 4


# ------------------------------------------------------------------ 8. orphaned workers
def test_joblib_workers_exit_when_the_sweep_process_is_killed(tmp_path):
    sweep = tmp_path / "sweep"
    process = start(["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", *TINY, "method=ft_context",
                     "method.epochs=500", "seed=0,1", "task.limit=1", "resume.search_dir=null",
                     f"hydra.sweep.dir={sweep}"], log=tmp_path / "sweep.log")
    deadline = time.monotonic() + 300
    while len(records_in(sweep)) < 2:  # both workers are inside a job
        assert process.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.1)
    workers = [c for c in psutil.Process(process.pid).children(recursive=True) if "python" in c.name()]
    assert workers
    os.kill(process.pid, signal.SIGKILL)  # the parent only, as `kill -9 <pid>` does
    process.wait()
    gone, alive = psutil.wait_procs(workers, timeout=15)
    for leftover in alive:
        leftover.kill()
    assert not alive, f"{len(alive)} worker(s) outlived their parent"
    assert {strict(p.read_text())["status"] for p in records_in(sweep)} == {"running"}  # resumable next time


# ------------------------------------------------------------------ progress
def test_progress_goes_to_the_log_where_no_bar_is_drawn(caplog):
    with caplog.at_level(logging.INFO, logger="kbench.progress"):
        for _ in progress(range(3), desc="teacher", every=0.0):
            pass
        with heartbeat("converting", every=0.05):
            time.sleep(0.12)
        bar = progress(total=2, desc="quiet", disable=True)  # a caller's "too short to show"
        bar.update(2)
        bar.close()
    assert "teacher: 1/3 (33%)" in caplog.text and "teacher: 3/3 (100%)" in caplog.text
    assert "converting ..." in caplog.text and "converting: still running" in caplog.text
    assert "converting: done in" in caplog.text and "quiet" not in caplog.text


# ------------------------------------------------------------------ issue 12.3: inputs beyond the config
def test_a_rerun_after_a_data_change_computes_and_says_which_file(tmp_path):
    data = tmp_path / "pwc.jsonl"
    row = {"input": "Velmora is a town on the Orvane. It was founded by Ada Quill.", "prompt": "Who founded Velmora?"}
    data.write_text(json.dumps(row | {"answer": "Ada Quill"}) + "\n")

    def run(name: str):
        result = run_cli(*TINY, "method=context", "task=pwc", f"task.path={data}", f"resume.search_dir={tmp_path}",
                         f"hydra.run.dir={tmp_path / name}")
        assert result.returncode == 0, result.stderr[-3000:]
        return result

    run("first")
    first = read_record(tmp_path / "first")
    assert first["inputs"][str(data.resolve())] == file_digest(data)
    assert "skipped: run" in run("same").stdout  # nothing changed: served from the done run

    data.write_text(json.dumps(row | {"answer": "Ada Quilt"}) + "\n")  # same size: only the content tells
    changed = run("changed")
    assert "skipped: run" not in changed.stdout
    assert f"not skipping run {first['run_id']}" in changed.stdout and f"{data.resolve()} changed" in changed.stdout
    record = read_record(tmp_path / "changed")
    assert record["status"] == "done" and record["run_id"] == first["run_id"]
    gold = strict((tmp_path / "changed/predictions.jsonl").read_text().splitlines()[0])["gold"]
    assert gold == ["Ada Quilt"] or gold == "Ada Quilt"


def test_a_record_without_input_digests_is_not_trusted(tmp_path):
    atomic_write_json(tmp_path / "record.json", {"run_id": "x", "status": "done"})
    assert resume.input_changes({"run_id": "x"}) and not resume.input_changes({"inputs": {}})
    gone = {"inputs": {str(tmp_path / "nope"): {"sha256": "0", "bytes": 1}}}
    assert resume.input_changes(gone) == [f"{tmp_path / 'nope'} is gone"]
    with pytest.raises(KBenchError):
        resume.claim_folder(tmp_path, "y")  # it holds run x's record


def test_the_report_reads_non_finite_metrics_back_as_numbers(tmp_path):
    from tests.test_report import write_run

    write_run(tmp_path / "a", "ft_sentences", 0, {"qa_f1": 0.5, "drift/ppl_ratio": float("inf")})
    write_run(tmp_path / "b", "ft_sentences", 1, {"qa_f1": 0.7, "drift/ppl_ratio": 2.0})
    assert '"drift/ppl_ratio": "Infinity"' in (tmp_path / "a/record.json").read_text()
    table = report.summarize(report.runs_frame(report.load_runs([tmp_path]).records))
    assert table.loc[0, "drift/ppl_ratio_mean"] == math.inf and table.loc[0, "qa_f1_mean"] == pytest.approx(0.6)


def test_a_predictions_line_with_an_infinite_logprob_is_read_back_for_resume_and_rescoring():
    from core.io import to_json
    from core.predictions import output_of

    row = strict(to_json({"target_logprob": float("-inf"), "target_tokens": 2, "target_token_accuracy": 0.5}))
    assert row["target_logprob"] == "-Infinity" and output_of(row, "here").logprob == -math.inf


def test_encoders_follow_the_same_rules_as_models(pickle_only_model, monkeypatch):
    """Dense RAG / RECIPE encoders: a pickle-only folder is refused, a hub id without a hub fails at once."""
    from core.encoder import load_sentence_encoder

    with pytest.raises(KBenchError, match=r"only pickled weights \(pytorch_model.bin\)"):
        load_sentence_encoder(str(pickle_only_model))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with pytest.raises(KBenchError, match=r"hub is unreachable \(HF_HUB_OFFLINE is set\)"):
        load_sentence_encoder("nobody-here/no-such-encoder")
    assert time.monotonic() - started < 5
