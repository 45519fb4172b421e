"""The GPU path, checked on CPU: the dtype decisions, fp32 trainable pieces, and device handling.

No GPU is needed: the dtype policy is a pure decision (`dtype_policy`) that is inspected for every
device × dtype; fp32 adapters / master weights / MEMOIR memory are checked on a bf16 copy of the tiny
model on CPU; device correctness is checked by giving the model a first parameter on the `meta`
device, so any code that sends tensors to "the first parameter's device" fails (meta tensors have no
values), while code that follows the input embeddings / hidden state / head works unchanged.
tests/test_cuda.py runs the same paths on a real GPU and on a model split between cuda:0 and cpu.
"""
from __future__ import annotations

import re

import pytest
import torch

from conftest import ROOT, compose_config
from core.models import DtypePolicy, dtype_policy, resolve_dtype
from core.training import WeightUpdate, fp32_masters, train
from core.types import EditSpec, KBenchError, Knowledge

BF16, FP32 = torch.bfloat16, torch.float32


# ---------------------------------------------------------------------------------------- dtype policy
@pytest.mark.parametrize(
    "device, dtype, model, tf32",
    [
        ("cpu", "auto", FP32, False),  # fp32 is faster than bf16 on these CPUs
        ("cpu", "float32", FP32, False),
        ("cpu", "bfloat16", BF16, False),
        ("cuda", "auto", BF16, True),  # bf16 by default on GPUs, TF32 for what stays fp32
        ("cuda", "float32", FP32, True),
        ("cuda", "bfloat16", BF16, True),
        ("cuda:1", "auto", BF16, True),
    ],
)
def test_dtype_policy_per_device_and_dtype(device, dtype, model, tf32):
    policy = dtype_policy(dtype, device, cuda_available=False)
    assert policy == DtypePolicy(device=device.split(":")[0], model=model, trainable=FP32, tf32=tf32)
    assert policy.trainable == FP32  # adapters, MEMOIR's memory, full-FT master weights, optimiser states
    assert resolve_dtype(dtype, device) == model


@pytest.mark.parametrize("available, kind, model", [(True, "cuda", BF16), (False, "cpu", FP32)])
def test_device_map_auto_follows_the_gpus_that_exist(available, kind, model):
    policy = dtype_policy("auto", "auto", cuda_available=available)
    assert (policy.device, policy.model, policy.tf32) == (kind, model, kind == "cuda")


@pytest.mark.parametrize("dtype", ["float16", "fp16", "half"])
def test_fp16_is_refused_with_the_alternative_named(dtype):
    with pytest.raises(KBenchError, match="bfloat16") as err:
        dtype_policy(dtype, "cuda", cuda_available=True)
    assert "GradScaler" in str(err.value) or "loss scaling" in str(err.value)


def test_unknown_dtype_is_refused():
    with pytest.raises(KBenchError, match="model.dtype"):
        dtype_policy("int8", "cpu")


def test_hardware_presets_set_device_dtype_and_inference_batches_together():
    cpu = compose_config("logger=none", "method=selfparam")
    assert (cpu.model.device, cpu.model.dtype, cpu.model.batch_size, cpu.method.teacher_batch_size) == ("cpu", "float32", 8, 4)
    gpu = compose_config("logger=none", "method=selfparam", "hardware=gpu")
    assert (gpu.model.device, gpu.model.dtype) == ("cuda", "auto")
    assert gpu.model.batch_size > cpu.model.batch_size and gpu.method.teacher_batch_size > 4
    assert gpu.method.batch_size == cpu.method.batch_size  # a training hyper-parameter: never a hardware knob
    dense = compose_config("logger=none", "method=rag_dense", "hardware=gpu")
    assert dense.method.encoder_device == "cuda"
    assert compose_config("logger=none", "hardware=gpu", "model.batch_size=3").model.batch_size == 3


def test_the_hardware_node_is_not_part_of_the_run_identity():
    from runners.results import run_identity

    cfg = compose_config("logger=none", "model=tiny")
    renamed = compose_config("logger=none", "model=tiny", "+hardware.note=x")  # a hardware value nothing reads
    assert run_identity(cfg) == run_identity(renamed)
    assert run_identity(cfg) != run_identity(compose_config("logger=none", "model=tiny", "hardware=gpu"))


# ---------------------------------------------------------------------------------------- fp32 trainables
def _bf16(lm):
    lm.model.to(BF16)
    return lm


def test_lora_adapter_is_fp32_on_a_bf16_model_and_trains(tiny_lm):
    from methods.finetune import FineTuneContext

    lm = _bf16(tiny_lm)
    method = FineTuneContext(lm, update={"mode": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}},
                             lr=1e-2, epochs=2, batch_size=2)
    method.inject([Knowledge(id="k", context="The town of Velmora was founded in 1742 by Ada Quill.")])
    adapters = {n: p.dtype for n, p in lm.model.named_parameters() if "lora_" in n}
    assert adapters and set(adapters.values()) == {FP32}
    assert {p.dtype for n, p in lm.model.named_parameters() if "lora_" not in n} == {BF16}
    assert method.losses[-1] < method.losses[0]


def test_full_finetuning_keeps_fp32_master_weights():
    """AdamW steps of ~1e-3 on a bf16 weight of 1.0 (resolution 2^-7 there) round away without a master
    copy; with one they accumulate and the bf16 weight moves."""
    weight = torch.nn.Parameter(torch.ones(4, dtype=BF16))
    assert [m.dtype for m in fp32_masters([weight])] == [FP32]
    assert fp32_masters([torch.nn.Parameter(torch.ones(2))]) == [None]  # fp32 weights are their own master
    history = train([weight], [0], lambda batch: ((weight.float() * 0.5).sum(), 1), epochs=30, lr=1e-3,
                    batch_size=1, max_grad_norm=None)
    assert len(history) == 30 and weight.dtype == BF16
    assert torch.all(weight < 0.99), weight  # 30 x 1e-3: about 0.97


def test_memoir_memory_is_fp32_on_a_bf16_model(tiny_lm):
    from methods.memoir import MemoirMethod

    lm = _bf16(tiny_lm)
    method = MemoirMethod(lm, layer=-1, iterations=4, lr=1.0, background_source="model", n_background=4,
                          background_tokens=4)
    assert method.memory.weight.dtype == FP32
    method.inject([Knowledge(id="e", context="The capital of Velmora is Quill.", edit=EditSpec("The capital of Velmora is", " Quill"))])
    assert method.memory.weight.dtype == FP32 and method.memory.weight.abs().sum() > 0


# ---------------------------------------------------------------------------------------- devices
FIRST_PARAMETER = re.compile(r"next\([^)]*\.parameters\(\)\)\.device")


def test_no_code_takes_the_first_parameters_device():
    offenders = [f"{path.relative_to(ROOT)}:{n}" for package in ("core", "methods", "runners", "tasks")
                 for path in sorted((ROOT / package).glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if FIRST_PARAMETER.search(line)]
    assert not offenders, f"tensors must follow the input embeddings / hidden state / head, not: {offenders}"


def _meta_first(lm):
    """Give the model a first parameter on the meta device (`next(model.parameters())` now lies)."""
    lm.model.register_parameter("aaa_meta_first", torch.nn.Parameter(torch.zeros(1, device="meta"), requires_grad=False))
    assert next(lm.model.parameters()).device.type == "meta"
    return lm


PAIRS = [([1], [40, 41, 42]), ([1, 50, 51], [60, 61]), ([1, 7, 8, 9, 10], [70])]


def test_scoring_and_collating_follow_the_input_embeddings(tiny_lm_factory):
    reference = tiny_lm_factory().loglikelihood(PAIRS)
    lm = _meta_first(tiny_lm_factory())
    assert lm.device.type == "cpu"
    batch = lm.collate(PAIRS)
    assert {t.device.type for t in (batch.input_ids, batch.attention_mask, batch.target_ids)} == {"cpu"}
    assert batch.target_lengths == [3, 2, 1] and batch.positions.device.type == "cpu"
    scores = lm.loglikelihood(PAIRS)
    assert [s.n_tokens for s in scores] == [3, 2, 1]
    for got, want in zip(scores, reference):
        assert got.logprob == pytest.approx(want.logprob, abs=1e-4)


def test_finetune_and_selfparam_losses_follow_the_logits(tiny_lm_factory):
    from methods.finetune import FineTuneSentences
    from methods.selfparam import SelfParam
    from methods.sentences import TaskSentences

    lm = _meta_first(tiny_lm_factory())
    lora = {"mode": "lora", "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]}}
    item = Knowledge(id="k", context="Velmora was founded in 1742.",
                     train_sentences=("Question: When was Velmora founded?\nAnswer: 1742\n",))
    ft = FineTuneSentences(lm, sentences=TaskSentences(), update=lora, lr=1e-2, epochs=1, batch_size=2)
    loss, n = ft.loss(ft.training_examples([item]))
    assert loss.device.type == "cpu" and n > 0 and torch.isfinite(loss)
    sp = SelfParam(lm, sentences=TaskSentences(), update=lora, lr=1e-2, epochs=1, batch_size=2,
                   continuation_per_sentence=0, regularisation_per_sentence=0, teacher_top_k=0)
    examples = sp.training_examples([item])
    assert all(e.teacher_logprobs.device.type == "cpu" for e in examples)  # full rows wait in host memory
    kl, n = sp.loss(examples)
    assert kl.device.type == "cpu" and n > 0 and float(kl) >= -1e-4  # a KL: never below 0


def test_generation_follows_the_input_embeddings(tiny_lm_factory):
    from core.types import GenerationSpec

    spec = GenerationSpec(max_new_tokens=4, stop=())
    prompts = [[1, 40, 41], [1, 50]]
    assert _meta_first(tiny_lm_factory()).generate_until(prompts, spec) == tiny_lm_factory().generate_until(prompts, spec)


def test_memoir_features_follow_the_captured_state(tiny_lm_factory):
    from methods.memoir import MemoirMethod

    lm = _meta_first(tiny_lm_factory())
    method = MemoirMethod(lm, layer=-1, iterations=2, background_source="model", n_background=4, background_tokens=4)
    features = method.prompt_features(["The capital of Velmora is", "Who founded it?"])
    assert features.shape[0] == 2 and features.device.type == "cpu" and torch.isfinite(features).all()
