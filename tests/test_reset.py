"""reset() restores bit-identical weights, for every weight-changing method and every LoRA target form.

Issue 12, item 2: with `merge=true` and targets in peft's suffix form (`self_attn.q_proj`), reset() left
the merged layers changed and the next context trained from them. Each case here hashes every parameter
and buffer of the tiny model (built from conf/model/tiny.yaml) before anything is injected, injects two
contexts (so a second adapter is merged on top of the first), checks that the weights did change (else
the test would prove nothing), resets, and compares every hash.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from omegaconf import OmegaConf

from core.types import Knowledge
from runners.build import build
from tests.conftest import compose_config

# Every form peft accepts for `target_modules`, on the tiny Llama (2 layers, lm_head tied to the embeddings).
TARGET_FORMS = {
    "names": ["q_proj", "v_proj"],
    "suffixes": ["self_attn.q_proj", "mlp.down_proj"],  # the form of the issue
    "full_names": ["model.layers.0.self_attn.o_proj", "model.layers.1.mlp.gate_proj"],
    "regex": r".*\.(k_proj|up_proj)",
    "all_linear": "all-linear",
    "tied_head": ["lm_head", "q_proj"],  # merging into lm_head changes the tied embedding matrix too
}

KNOWLEDGE = [
    Knowledge("k0", "Zarnel Quib founded the Blue Lantern Company in 1893 in the port of Vessa.",
              ("Question: Who founded the Blue Lantern Company?\nAnswer: Zarnel Quib\n",
               "Question: When was the Blue Lantern Company founded?\nAnswer: 1893\n")),
    Knowledge("k1", "The river Thoum flows past the town of Brelly, famous for its copper bells.",
              ("Question: Which river flows past Brelly?\nAnswer: Thoum\n",
               "Question: What is Brelly famous for?\nAnswer: copper bells\n")),
]

FAST = ["method.epochs=2", "method.lr=1e-2", "method.batch_size=2"]


def digest(lm) -> dict[str, str]:
    """sha256 of every parameter and buffer of the LM's underlying model, by name."""
    state = lm.model.state_dict(keep_vars=False)
    return {name: hashlib.sha256(t.detach().to("cpu").contiguous().numpy().tobytes()).hexdigest()
            for name, t in state.items() if not isinstance(t, torch.Tensor) or t.dtype != torch.bfloat16}


def plain_digest(lm) -> dict[str, str]:
    """The digest of the served weights: with an adapter attached, the weights it would serve merged
    are not visible in state_dict, so compare the base parameters by their plain names."""
    return {name.replace("base_model.model.", "").replace(".base_layer", ""): value
            for name, value in digest(lm).items() if "lora_" not in name}


def method_of(lm, *overrides: str, targets=None):
    cfg = compose_config("model=tiny", *overrides)
    if targets is not None:
        cfg.method["update"]["lora"]["target_modules"] = targets  # ["update"]: .update is a DictConfig method
    return build(cfg.method, "method", lm=lm)


def check_reset_restores(lm, method, must_change: bool = True) -> None:
    before = digest(lm)
    method.prepare([])
    assert digest(lm) == before, "prepare() changed the weights"
    for item in KNOWLEDGE:
        method.inject([item])
    if must_change:
        after = plain_digest(lm)
        changed = [n for n in before if after.get(n) != before[n]]
        adapter = any("lora_" in n for n, _ in lm.model.named_parameters())
        assert changed or adapter, "injection changed nothing: this case would not test reset"
    method.reset()
    after = digest(lm)
    assert after.keys() == before.keys(), f"parameter names differ after reset: {set(after) ^ set(before)}"
    differing = sorted(n for n in before if after[n] != before[n])
    assert not differing, f"{len(differing)} tensor(s) not restored by reset(): {differing[:6]}"


@pytest.mark.parametrize("form", sorted(TARGET_FORMS))
def test_merged_lora_reset_is_bit_identical_for_every_target_form(tiny_lm, form):
    method = method_of(tiny_lm, "method=ft_context", "method.merge=true", *FAST, targets=TARGET_FORMS[form])
    before = digest(tiny_lm)
    method.inject([KNOWLEDGE[0]])
    merged = digest(tiny_lm)
    assert merged != before and not any("lora_" in n for n in merged), "the adapter was not merged into the weights"
    method.inject([KNOWLEDGE[1]])  # a second adapter, merged on top of the first
    method.reset()
    assert digest(tiny_lm) == before
    # and the third context trains from the original weights, as the first did
    fresh = method_of(tiny_lm, "method=ft_context", "method.merge=true", *FAST, targets=TARGET_FORMS[form])
    fresh.inject([KNOWLEDGE[1]])
    once = digest(tiny_lm)
    fresh.reset()
    method.inject([KNOWLEDGE[1]])
    assert digest(tiny_lm) == once


CASES = {
    "ft_context/lora": ["method=ft_context"],
    "ft_context/lora+merge": ["method=ft_context", "method.merge=true"],
    "ft_context/full": ["method=ft_context", "method.update.mode=full"],
    "ft_sentences/lora+merge": ["method=ft_sentences", "method/sentences=task", "method.merge=true"],
    "ft_sentences/full": ["method=ft_sentences", "method/sentences=task", "method.update.mode=full"],
    "selfparam/lora+merge": ["method=selfparam", "method/sentences=task", "method.merge=true",
                             "method.regularisation_per_sentence=0"],
    "selfparam/full": ["method=selfparam", "method/sentences=task", "method.update.mode=full",
                       "method.regularisation_per_sentence=0"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_weight_changing_method_resets_bit_identically(tiny_lm, case):
    method = method_of(tiny_lm, *CASES[case], *FAST, targets=TARGET_FORMS["suffixes"])
    check_reset_restores(tiny_lm, method)


def test_memoir_reset_is_bit_identical(tiny_lm):
    method = method_of(tiny_lm, "method=memoir", "method.layer=-1", "method.iterations=3", "method.background_source=model",
                       "method.n_background=4", "method.background_tokens=8")
    check_reset_restores(tiny_lm, method, must_change=False)  # its memory lives beside the weights


def test_update_options_reach_peft(tiny_lm):
    """The record's `method.update.lora.r=2` is the adapter's rank (issue 12 item 1: it used to say 2 and train 8)."""
    method = method_of(tiny_lm, "method=ft_context", "method.update.lora.r=2", "method.update.lora.alpha=4", *FAST,
                       targets=TARGET_FORMS["suffixes"])
    method.inject([KNOWLEDGE[0]])
    config = tiny_lm.model.peft_config["default"]
    assert config.r == 2 and config.lora_alpha == 4
    assert set(config.target_modules) == {"self_attn.q_proj", "mlp.down_proj"}
    ranks = {p.shape[0] for n, p in tiny_lm.model.named_parameters() if "lora_A" in n}
    assert ranks == {2}
    assert OmegaConf.to_container(compose_config("method=ft_context", "method.update.lora.r=2").method)["update"]["lora"]["r"] == 2


@pytest.mark.parametrize("name", ["base", "context", "rag_bm25", "recipe"])
def test_methods_that_keep_knowledge_outside_the_weights_never_change_them(tiny_lm, name):
    """The same hashes for the methods whose knowledge lives in the prompt, a store or a side module."""
    from tasks.editing import EditingTask

    task = EditingTask(n_edits=2, n_train=8, generate=False)
    knobs = ["method.epochs=1", "method.retrieval_epochs=1", "method.cache=false"] if name == "recipe" else []
    method = method_of(tiny_lm, f"method={name}", *knobs)
    before = digest(tiny_lm)
    method.prepare(task.training_knowledge())
    for edit in task.edits:
        method.inject([task.knowledge(edit)])
    assert digest(tiny_lm) == before
    method.reset()
    assert digest(tiny_lm) == before
