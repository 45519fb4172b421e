"""The GPU path on a real GPU (marker `cuda`; skipped without one; scripts/gpu_check.py runs them).

- the dtype policy as loaded: `model.dtype=auto` gives bf16 weights on CUDA, fp32 LoRA adapters, TF32 on;
- scoring, training and generation on `cuda` agree with the same model on CPU;
- a model split between cuda:0 and cpu (by hand, and with accelerate's `device_map`) scores, trains
  and generates like the unsplit model: the hidden state, the head and the inputs then sit on
  different devices, which is what `core/lm.py` must handle.

`KBENCH_CUDA_TESTS_ON=cpu` runs them on the CPU instead (the split is then cpu/cpu): that only checks
the tests themselves, which is what `scripts/gpu_check.py --dry-run` does.
"""
from __future__ import annotations

import os

import pytest
import torch

from core.types import EditSpec, GenerationSpec, Knowledge

FAKE = os.environ.get("KBENCH_CUDA_TESTS_ON") == "cpu"
DEV = "cpu" if FAKE else "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not FAKE and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PAIRS = [([1], [40, 41, 42, 43]), ([1, 50, 51], [60, 61]), ([1, 7, 8, 9, 10, 11, 12], [70, 71, 72])]
PROMPTS = [[1, 40, 41, 42], [1, 50], [1, 7, 8, 9, 10]]
SPEC = GenerationSpec(max_new_tokens=6, stop=())
# dropout 0: the CPU and CUDA generators draw different masks, and these tests compare the two devices
LORA = {"mode": "lora", "lora": {"r": 4, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}}


@pytest.fixture(autouse=True)
def exact_fp32():
    """Comparisons with CPU: no TF32 inside these tests (the policy switches it on for real runs)."""
    if FAKE:
        yield
        return
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "ieee"
    else:
        matmul.allow_tf32 = False
    yield
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = before
    else:
        matmul.allow_tf32 = before


def random_llama_folder(path, hidden=64, layers=2, heads=4):
    """A random-init, untied Llama saved as a folder (with the tiny tokenizer): loadable by `load_lm`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    try:
        from core.tiny import build_tiny_tokenizer
    except ImportError:
        from core.models import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(384)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                         max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _agree(a: list[str], b: list[str]) -> bool:
    """Greedy outputs on two devices: all equal but at most one (different kernels may flip a near-tie)."""
    return len(a) == len(b) and sum(x != y for x, y in zip(a, b)) <= 1


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def _inputs_follow(module, device):
    """What accelerate's hooks do: move a module's inputs to its device before its forward."""
    return module.register_forward_pre_hook(lambda m, args, kwargs: (_move(args, device), _move(kwargs, device)),
                                            with_kwargs=True)


def split_by_hand(lm, head_device: str):
    """Embeddings + layer 0 on DEV, the other layers and the final norm on cpu, the head on `head_device`."""
    causal = lm.causal_lm
    causal.model.embed_tokens.to(DEV)
    causal.model.rotary_emb.to(DEV)
    causal.model.layers[0].to(DEV)
    for layer in causal.model.layers[1:]:
        layer.to("cpu")
        _inputs_follow(layer, "cpu")
    causal.model.norm.to("cpu")
    causal.lm_head.to(head_device)
    return lm


def test_load_lm_applies_the_dtype_policy(tmp_path):
    from core.models import load_lm, tf32_enabled
    from core.training import WeightUpdate

    lm = load_lm(str(random_llama_folder(tmp_path / "m")), dtype="auto", device=DEV)
    weights = {p.dtype for p in lm.model.parameters()}
    assert weights == ({torch.float32} if FAKE else {torch.bfloat16})
    assert lm.device.type == DEV
    if not FAKE:
        assert tf32_enabled()
    WeightUpdate(lm, **LORA).begin()
    assert {p.dtype for n, p in lm.model.named_parameters() if "lora_" in n} == {torch.float32}
    assert len(lm.loglikelihood(PAIRS)) == 3 and len(lm.generate_until(PROMPTS, SPEC)) == 3


def test_scoring_training_and_generation_on_the_gpu_match_the_cpu(tiny_lm_factory):
    from methods.finetune import FineTuneContext

    cpu, gpu = tiny_lm_factory(), tiny_lm_factory(device=DEV)
    for a, b in zip(gpu.loglikelihood(PAIRS), cpu.loglikelihood(PAIRS)):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
    assert _agree(gpu.generate_until(PROMPTS, SPEC), cpu.generate_until(PROMPTS, SPEC))
    item = Knowledge(id="k", context="The town of Velmora was founded in 1742 by Ada Quill.")
    losses = []
    for lm in (cpu, gpu):
        method = FineTuneContext(lm, update=LORA, lr=1e-2, epochs=3, batch_size=2, seed=0)
        method.inject([item])
        losses.append(method.losses)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-3)


@pytest.mark.parametrize("head_device", ["cpu", DEV])
def test_a_model_split_by_hand_matches_the_unsplit_one(tmp_path, head_device):
    from core.models import load_lm
    from methods.finetune import FineTuneContext

    folder = random_llama_folder(tmp_path / "m")
    whole = load_lm(str(folder), dtype="float32", device="cpu")
    split = split_by_hand(load_lm(str(folder), dtype="float32", device="cpu"), head_device)
    assert split.device.type == DEV  # inputs go where the embeddings are
    for a, b in zip(split.loglikelihood(PAIRS), whole.loglikelihood(PAIRS)):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-3)
        assert a.predicted_ids == b.predicted_ids
    item = Knowledge(id="k", context="The town of Velmora was founded in 1742 by Ada Quill.")
    losses = []
    for lm in (whole, split):
        method = FineTuneContext(lm, update=LORA, lr=1e-2, epochs=2, batch_size=2, seed=0)
        method.inject([item])
        losses.append(method.losses)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3, abs=1e-3)
    _inputs_follow(split.causal_lm.lm_head, head_device)  # HF's own forward (generate) needs the hook there
    assert _agree(split.generate_until(PROMPTS, SPEC), whole.generate_until(PROMPTS, SPEC))


def test_a_model_split_with_device_map_matches_within_bf16_tolerance(tmp_path):
    """accelerate's device_map (what `model.device=auto` uses): cuda:0 for the bottom, cpu for the top."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from core.lm import LM

    folder = random_llama_folder(tmp_path / "m")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gpu = 0 if not FAKE else "cpu"
    device_map = {"model.embed_tokens": gpu, "model.rotary_emb": gpu, "model.layers.0": gpu, "model.layers.1": "cpu",
                  "model.norm": "cpu", "lm_head": gpu}
    split = LM(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device_map),
               tokenizer, name="split")
    whole = LM(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).to(DEV), tokenizer, name="whole")
    for a, b in zip(split.loglikelihood(PAIRS), whole.loglikelihood(PAIRS)):
        assert a.logprob == pytest.approx(b.logprob, abs=0.05 * a.n_tokens)
    assert _agree(split.generate_until(PROMPTS, SPEC), whole.generate_until(PROMPTS, SPEC))


def test_memoir_and_selfparam_on_the_gpu(tiny_lm_factory):
    from methods.memoir import MemoirMethod
    from methods.selfparam import SelfParam
    from methods.sentences import TaskSentences

    lm = tiny_lm_factory(device=DEV)
    lm.model.to(torch.bfloat16)
    memoir = MemoirMethod(lm, layer=-1, iterations=4, background_source="model", n_background=4, background_tokens=4)
    memoir.inject([Knowledge(id="e", context="The capital of Velmora is Quill.",
                             edit=EditSpec("The capital of Velmora is", " Quill"))])
    assert memoir.memory.weight.dtype == torch.float32 and memoir.memory.weight.device.type == DEV
    memoir.remove()
    item = Knowledge(id="k", context="Velmora was founded in 1742.",
                     train_sentences=("Question: When was Velmora founded?\nAnswer: 1742\n",))
    sp = SelfParam(lm, sentences=TaskSentences(), update=LORA, lr=1e-2, epochs=2, batch_size=2,
                   continuation_per_sentence=0, regularisation_per_sentence=0, teacher_top_k=0)
    sp.inject([item])
    assert all(torch.isfinite(torch.tensor(sp.losses)))


def test_a_run_on_the_device_records_its_peak_gpu_memory(tmp_path):
    """record.cost (issue 20 item 3): a CUDA run records torch's allocator peak; a CPU run has no such key."""
    from runners.experiment import Experiment
    from tests.conftest import compose_config, read_record

    overrides = ["model=tiny", "logger=none", "method=ft_context", "method.epochs=1", "task.n_contexts=1"]
    cfg = compose_config(*overrides, *([] if FAKE else ["hardware=gpu"]))
    Experiment(cfg, tmp_path, names={"method": "ft_context", "task": "synthetic", "model": "tiny"}).run()
    record = read_record(tmp_path)
    assert record["status"] == "done", record["error"]
    cost = record["cost"]
    if DEV == "cuda":
        assert 0 < cost["peak_gpu_bytes"] < torch.cuda.get_device_properties(0).total_memory
    else:
        assert "peak_gpu_bytes" not in cost
    assert cost["peak_rss_bytes"] > 0 and cost["items_injected"] == 1
