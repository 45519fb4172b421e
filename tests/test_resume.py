"""Resumable runs: a method's state survives a save / load into a fresh copy (part 1), and a run killed
mid-way continues after its last checkpoint with the same result as an uninterrupted one (part 2)."""
from pathlib import Path

import pytest
import torch

from core.types import Knowledge
from methods.base import BaseMethod, Method
from methods.finetune import FineTuneContext, FineTuneSentences
from methods.sentences import TaskSentences
from runners import resume
from runners.experiment import Experiment
from tasks.synthetic import SyntheticTask
from tests.conftest import compose_config, read_record, run_cli

LORA = {"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}}
FAST = dict(lr=1e-2, epochs=3, batch_size=2, seed=0)
FIRST = Knowledge(id="k0", context="Velmora is a town.", train_sentences=("Velmora lies on the Orvane.\n",))
SECOND = Knowledge(id="k1", context="Brask is a river.", train_sentences=("The Brask runs north to Quell.\n",))


def logits(lm, text="Velmora lies on the"):
    with torch.no_grad():
        return lm.model(torch.tensor([lm.prompt_ids(text)])).logits.clone()


@pytest.mark.parametrize("update,merge", [(LORA, False), (LORA, True), ({"mode": "full"}, False)],
                         ids=["lora", "lora-merged", "full"])
def test_finetune_state_round_trip_continues_exactly(tiny_lm_factory, tmp_path, update, merge):
    """Save after one injection, load into a freshly built method: same outputs now, after the next
    injection (training continues from the restored weights), and after reset (the original model)."""
    lm_a, lm_b = tiny_lm_factory(), tiny_lm_factory()
    original = logits(lm_b)
    uninterrupted = FineTuneSentences(lm_a, sentences=TaskSentences(), update=update, merge=merge, **FAST)
    uninterrupted.inject([FIRST])
    assert uninterrupted.save_state(tmp_path / "state") is True
    assert (tmp_path / "state/update.json").is_file()
    assert not list((tmp_path / "state").glob("*.pt")) and not list((tmp_path / "state").glob("*.bin"))

    resumed = FineTuneSentences(lm_b, sentences=TaskSentences(), update=update, merge=merge, **FAST)
    resumed.load_state(tmp_path / "state")
    assert torch.allclose(logits(lm_a), logits(lm_b), atol=1e-6)
    assert not torch.allclose(logits(lm_b), original, atol=1e-4)
    assert resumed.extra_storage_bytes() == uninterrupted.extra_storage_bytes()
    assert resumed.info() == uninterrupted.info()

    uninterrupted.inject([SECOND])
    resumed.inject([SECOND])
    assert torch.allclose(logits(lm_a), logits(lm_b), atol=1e-5)
    resumed.reset()
    assert torch.allclose(logits(lm_b), original, atol=1e-6)


def test_loading_a_state_of_another_update_mode_is_refused(tiny_lm_factory, tmp_path):
    lora = FineTuneSentences(tiny_lm_factory(), sentences=TaskSentences(), update=LORA, **FAST)
    lora.inject([FIRST])
    lora.save_state(tmp_path)
    full = FineTuneSentences(tiny_lm_factory(), sentences=TaskSentences(), update={"mode": "full"}, **FAST)
    with pytest.raises(ValueError, match="mode='lora'"):
        full.load_state(tmp_path)


def test_state_api_defaults(tiny_lm, tmp_path):
    """A method that does not implement the API says so (False); stateless reference methods can resume."""
    assert Method(tiny_lm).save_state(tmp_path) is False
    with pytest.raises(NotImplementedError, match="cannot restore"):
        Method(tiny_lm).load_state(tmp_path)
    assert BaseMethod(tiny_lm).save_state(tmp_path) is True


# ---------------------------------------------------------------------------------------------------
# Resumable runs, part 2: a run killed mid-way continues after its last checkpoint, with the same result.
class ContinualSynthetic(SyntheticTask):
    """The synthetic contexts injected one after another without reset: sequential injection in miniature."""

    def steps(self):
        steps = super().steps()
        for step in steps[1:]:
            step.reset_before = False
        return steps


SEQUENTIAL = ["model=tiny", "logger=none", "task.limit=3", "task._target_=tests.test_resume.ContinualSynthetic",
              "method=ft_context", "method.epochs=2", "method.lr=1e-2"]
SEQUENTIAL_TASK = ["model=tiny", "logger=none", "task=sequential", "task.n_sequences=1", "task.length=3",
                   "task.source.n_contexts=3", "method=ft_context", "method.epochs=2", "method.lr=1e-2"]
NAMES = {"method": "ft_context", "task": "continual", "model": "tiny"}


def kill_at_injection(monkeypatch, number: int) -> None:
    """Make the `number`-th injection of this process die like a Ctrl-C (the record says `failed`)."""
    calls = {"n": 0}
    original = FineTuneContext.inject

    def dying(self, knowledge):
        calls["n"] += 1
        if calls["n"] == number:
            raise KeyboardInterrupt("killed")
        original(self, knowledge)

    monkeypatch.setattr(FineTuneContext, "inject", dying)


def killed_attempt(tmp_path: Path, monkeypatch, overrides: list[str], at: int) -> Path:
    with monkeypatch.context() as patch:
        kill_at_injection(patch, at)
        with pytest.raises(KeyboardInterrupt):
            Experiment(compose_config(*overrides), tmp_path / "attempt", names=NAMES).run()
    return tmp_path / "attempt"


@pytest.mark.parametrize("overrides,finished", [(SEQUENTIAL, 2), (SEQUENTIAL_TASK, 3)], ids=["continual", "task=sequential"])
def test_a_killed_sequential_run_continues_after_its_last_step_exactly(tmp_path, monkeypatch, overrides, finished):
    """The third injection dies: 2 steps are finished (task=sequential: 3, with its probe before any injection)."""
    cfg = compose_config(*overrides)
    full = Experiment(cfg, tmp_path / "full", names=NAMES).run()
    attempt = killed_attempt(tmp_path, monkeypatch, overrides, at=3)
    assert read_record(attempt)["status"] == "failed" and len(read_record(attempt)["steps"]) == finished
    checkpoint = resume.latest_checkpoint(attempt, full.run_id)
    assert checkpoint.steps_done == finished and (checkpoint.method_state / "adapter.safetensors").is_file()

    resumed = Experiment(cfg, tmp_path / "resumed", names=NAMES, resume_from=attempt).run()
    assert resumed.status == "done" and resumed.resumed_from["steps_reused"] == finished
    assert "method state restored" in resumed.resumed_from["note"]
    # the last injection trained from the restored adapter: same loss, same answers, same metrics
    assert resumed.method_info["final_train_loss"] == pytest.approx(full.method_info["final_train_loss"], abs=1e-6)
    assert (tmp_path / "resumed/predictions.jsonl").read_text() == (tmp_path / "full/predictions.jsonl").read_text()
    assert resumed.metrics == pytest.approx(full.metrics, abs=1e-9)
    assert [s["metrics"] for s in resumed.steps] == [s["metrics"] for s in full.steps]
    assert resumed.task_report.get("retention") == full.task_report.get("retention")  # task=sequential's matrix
    assert resumed.timings["inject"] >= sum(s["inject_seconds"] for s in read_record(attempt)["steps"])
    assert not (tmp_path / "resumed/checkpoints").exists() and not (attempt / "checkpoints").exists()


def test_a_method_that_cannot_save_its_state_starts_over_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(FineTuneContext, "save_state", lambda self, directory: False)
    attempt = killed_attempt(tmp_path, monkeypatch, SEQUENTIAL, at=2)
    resumed = Experiment(compose_config(*SEQUENTIAL), tmp_path / "resumed", names=NAMES, resume_from=attempt).run()
    assert resumed.status == "done" and len(resumed.steps) == 3
    assert resumed.resumed_from["steps_reused"] == 0 and "started over: no checkpoint" in resumed.resumed_from["note"]


def test_single_injection_runs_resume_without_any_method_state(tmp_path, monkeypatch):
    single = ["model=tiny", "logger=none", "task.limit=3", "method=ft_context", "method.epochs=2"]
    full = Experiment(compose_config(*single), tmp_path / "full", names=NAMES).run()
    attempt = killed_attempt(tmp_path, monkeypatch, single, at=3)
    checkpoint = resume.latest_checkpoint(attempt, full.run_id)
    assert checkpoint.steps_done == 2 and checkpoint.method_state is None  # the next step resets first
    resumed = Experiment(compose_config(*single), tmp_path / "resumed", names=NAMES, resume_from=attempt).run()
    assert resumed.resumed_from["steps_reused"] == 2
    assert resumed.metrics == pytest.approx(full.metrics, abs=1e-9)
    assert (tmp_path / "resumed/predictions.jsonl").read_text() == (tmp_path / "full/predictions.jsonl").read_text()


def test_relaunching_the_command_finds_the_killed_attempt(tmp_path, monkeypatch):
    attempt = killed_attempt(tmp_path, monkeypatch, SEQUENTIAL, at=3)
    result = run_cli(*SEQUENTIAL, f"resume.search_dir={tmp_path}", f"hydra.run.dir={tmp_path / 'relaunched'}")
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(tmp_path / "relaunched")
    assert record["status"] == "done" and record["resumed_from"]["steps_reused"] == 2
    assert Path(record["resumed_from"]["directory"]).resolve() == attempt.resolve()
