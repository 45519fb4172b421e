"""Resumable runs, part 1: a method's state survives a save / load into a fresh process-like copy."""
import pytest
import torch

from core.types import Knowledge
from methods.base import BaseMethod, Method
from methods.finetune import FineTuneSentences
from methods.sentences import TaskSentences

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
