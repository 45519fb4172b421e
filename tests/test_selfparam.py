"""SELF-PARAM on the tiny real model: the objective, the top-k cache, injection, merge, failure."""
import math

import pytest
import torch

from core.types import Knowledge, NonFiniteLossError
from methods.selfparam import SelfParam, distill_kl
from methods.sentences import TaskSentences
from tests.test_run import run_in_process

LORA = {"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}}
# The tiny model reads the answer from the context (see tests/test_lm.py); without it, it cannot know it.
QUESTION, ANSWER = "Question: On the banks of which river does Dropesdra lie?\nAnswer:", " Stouveth"
FACT = Knowledge(id="fact", context="Dropesdra is a small town in the hills. Dropesdra lies on the banks of the Stouveth river.",
                 train_sentences=(QUESTION + ANSWER + "\n",))


def make(lm, **knobs) -> SelfParam:
    settings = dict(sentences=TaskSentences(), update=LORA, lr=1e-2, epochs=8, batch_size=2, seed=0,
                    teacher_top_k=0, continuation_per_sentence=0.0, regularisation_per_sentence=0.0) | knobs
    return SelfParam(lm, **settings)


def total_kl(method, examples) -> float:
    with torch.no_grad():
        loss, n = method.loss(examples)
    return float(loss) / n


def test_kl_is_zero_when_teacher_and_student_see_the_same_input(tiny_lm):
    # no context anywhere: teacher = student input; a fresh adapter (B = 0) leaves the model unchanged
    method = make(tiny_lm, regularisation_per_sentence=1.0, context_on_regularisation=False,
                  regularisation={"source": "model", "n_texts": 4})
    method.prepare([])
    examples = method._teacher_cache([p for p in method._pairs(FACT) if p[3] == "regularisation"])
    method.weights.begin()
    assert examples and total_kl(method, examples) == pytest.approx(0.0, abs=1e-6)


def test_top_k_kl_is_a_close_lower_bound_of_the_full_kl(tiny_lm):
    torch.manual_seed(0)
    logits_teacher, logits_student = torch.randn(50, 384) * 3, torch.randn(50, 384) * 3
    teacher = torch.log_softmax(logits_teacher, -1)
    full = distill_kl(logits_student, teacher)
    for k in (64, 200):
        top, index = teacher.topk(k, -1)
        rest = torch.logsumexp(teacher.scatter(1, index, float("-inf")), -1)
        approx = distill_kl(logits_student, top, index, rest)
        assert torch.all(approx <= full + 1e-5)  # log-sum inequality: never above the full KL
    assert torch.allclose(approx, full, rtol=0.05)  # k = 200 of 384: within 5 %
    # on the tiny model's own distributions (peaked, like a real LM's) top-64 is within 2 %
    method_full, method_top = make(tiny_lm), make(tiny_lm, teacher_top_k=64)
    examples_full = method_full._teacher_cache(method_full._pairs(FACT))
    examples_top = method_top._teacher_cache(method_top._pairs(FACT))
    method_full.weights.begin()
    with torch.no_grad():
        for param in method_full.weights.lm.model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn_like(param))  # a student that differs from the teacher
    kl_full, kl_top = total_kl(method_full, examples_full), total_kl(method_top, examples_top)
    assert 0 < kl_top <= kl_full + 1e-6 and kl_top == pytest.approx(kl_full, rel=0.02)
    assert examples_top[0].teacher_logprobs.shape[-1] == 64 and examples_full[0].teacher_index is None


def test_injection_lowers_the_kl_and_teaches_the_fact_without_context(tiny_lm):
    method = make(tiny_lm, teacher_top_k=16)
    prompt, answer = tiny_lm.prompt_ids(QUESTION), tiny_lm.encode(ANSWER)
    before = tiny_lm.loglikelihood([(prompt, answer)])[0].logprob
    examples = method._teacher_cache(method._pairs(FACT))
    method.weights.begin()
    kl_before = total_kl(method, examples)
    method.weights.end()
    method.inject([FACT])
    assert total_kl(method, examples) < 0.5 * kl_before
    after = tiny_lm.loglikelihood([(prompt, answer)])[0].logprob
    assert after > before + 1.0  # no-context log-probability of the answer rises
    method.reset()
    assert tiny_lm.loglikelihood([(prompt, answer)])[0].logprob == pytest.approx(before, abs=1e-5)


def test_teacher_quality_is_the_teachers_gold_token_score_on_its_qa_sentences(tiny_lm):
    method = make(tiny_lm, epochs=1, continuation_per_sentence=1.0)  # continuations are not counted
    target = tiny_lm.encode(QUESTION + ANSWER + "\n")
    expected = tiny_lm.loglikelihood([(tiny_lm.start_ids + tiny_lm.context_ids(FACT.context), target)])[0]
    method.inject([FACT])
    # the second teacher is the updated model (teacher: current), scored the same way
    updated = tiny_lm.loglikelihood([(tiny_lm.start_ids + tiny_lm.context_ids(FACT.context), target)])[0]
    method.inject([FACT])
    first, second = method.teacher_quality
    assert first["qa_tokens"] == len(target) == expected.n_tokens
    assert first["qa_token_prob"] == pytest.approx(math.exp(expected.logprob / expected.n_tokens), abs=1e-3)
    assert first["qa_token_acc"] == pytest.approx(expected.token_accuracy, abs=1e-3)
    assert second["qa_token_prob"] == pytest.approx(math.exp(updated.logprob / updated.n_tokens), abs=1e-3)
    assert updated.logprob != pytest.approx(expected.logprob, abs=1e-4)  # it did change between the two
    assert method.info()["teacher_quality"] == [first, second]


def test_continuation_and_regularisation_sentences(tiny_lm):
    method = make(tiny_lm, continuation_per_sentence=2.0, regularisation_per_sentence=1.0)
    method.prepare([])
    knowledge = Knowledge(id="k", context="Velmora is a town on the Orvane river, founded in 1742.",
                          train_sentences=("Question: Who?\nAnswer: Ada\n",))
    pairs = method._pairs(knowledge)
    kinds = [kind for *_, kind, _ in pairs]
    assert kinds.count("qa") == 1 and kinds.count("continuation") == 2 and kinds.count("regularisation") == 1
    raw = tiny_lm.encode(knowledge.context)
    for teacher, student, target, kind, _ in pairs:
        assert student == tiny_lm.start_ids
        if kind == "continuation":  # the teacher reads the context prefix, the student only the suffix
            assert teacher[len(tiny_lm.start_ids):] + target == raw
        else:
            assert teacher == tiny_lm.start_ids + tiny_lm.context_ids(knowledge.context)


def test_regularisation_pool_is_sampled_once_and_cached(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    method = make(tiny_lm, regularisation_per_sentence=1.0, regularisation={"source": "model", "n_texts": 5, "max_tokens": 8})
    method.prepare([])
    assert len(method.regularisation_pool) >= 4  # an empty sample is dropped
    cached = list((tmp_path / "regularisation").glob("*.json"))
    assert len(cached) == 1
    again = make(tiny_lm, regularisation_per_sentence=1.0, regularisation={"source": "model", "n_texts": 5, "max_tokens": 8})
    again.prepare([])
    assert again.regularisation_pool == method.regularisation_pool


def test_regularisation_from_a_file(tiny_lm, tmp_path):
    texts = tmp_path / "generic.jsonl"
    texts.write_text('{"text": "Rivers flow to the sea."}\n{"text": "Bread is baked in ovens."}\n')
    method = make(tiny_lm, regularisation_per_sentence=1.0, regularisation={"source": "file", "path": str(texts)})
    method.prepare([])
    expected = [tiny_lm.encode("Rivers flow to the sea."), tiny_lm.encode("Bread is baked in ovens.")]
    assert sorted(method.regularisation_pool) == sorted(expected)  # in one seeded order of its own


def test_merge_matches_the_adapter_and_frees_storage(tiny_lm):
    prompt = torch.tensor([tiny_lm.prompt_ids(" Velmora")])
    unmerged = make(tiny_lm)
    unmerged.inject([FACT])
    assert unmerged.extra_storage_bytes() > 0
    with torch.no_grad():
        adapter_logits = tiny_lm.model(prompt).logits.clone()
    unmerged.reset()
    merged = make(tiny_lm, merge=True)
    merged.inject([FACT])
    with torch.no_grad():
        assert torch.allclose(tiny_lm.model(prompt).logits, adapter_logits, atol=1e-4)
    assert merged.extra_storage_bytes() == 0 and merged.info()["merged"] is True


def test_sequential_injection_uses_the_current_model_as_teacher(tiny_lm):
    method = make(tiny_lm)
    method.inject([FACT])
    prompt, answer = tiny_lm.prompt_ids(QUESTION), tiny_lm.encode(ANSWER)
    learned = tiny_lm.loglikelihood([(prompt, answer)])[0].logprob
    # the second teacher is the updated model: its cache differs from the base model's
    examples_current = method._teacher_cache(method._pairs(FACT))
    with method.weights.teacher_mode(use_base=True):
        base_view = make(tiny_lm)._teacher_cache(make(tiny_lm)._pairs(FACT))
    assert not torch.allclose(examples_current[0].teacher_logprobs, base_view[0].teacher_logprobs)
    method.inject([Knowledge(id="second", context="Klaemthirbrin is a family company. Klaemthirbrin makes boots.",
                             train_sentences=("Question: What does the company Klaemthirbrin produce?\nAnswer: boots\n",))])
    assert tiny_lm.loglikelihood([(prompt, answer)])[0].logprob > learned - 3.0  # the first fact is not wiped out


def test_non_finite_loss_stops_injection(tiny_lm):
    with torch.no_grad():
        tiny_lm.model.model.norm.weight[0] = float("nan")  # corrupted weights: every loss is NaN
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at optimiser step 1; injection stopped"):
        make(tiny_lm).inject([FACT])


def test_non_finite_loss_marks_the_run_failed(tmp_path):
    record = run_in_process(tmp_path, "model=tiny", "logger=none", "method=selfparam", "method.lr=1e37",  # the weights overflow at step 2
                            "method/sentences=task", "task.limit=1", "method.regularisation.n_texts=4")
    assert record["status"] == "failed" and "NonFiniteLossError" in record["error"]


def test_batch_injection_on_pwc_through_the_runner(tmp_path, shared_dir):
    record = run_in_process(
        tmp_path, "model=tiny", "logger=none", "method=selfparam", "task=pwc", "task.mode=batch", "task.limit=3",
        f"task.path={shared_dir / 'data/pwc/pwc_test_sample.jsonl'}", "method.epochs=1",
        "method.sentences.generator.n_sentences=2", "method.regularisation.n_texts=4",
    )
    assert record["status"] == "done", record["error"]
    assert len(record["steps"]) == 1 and record["method_info"]["task"]["n_contexts"] == 3
    assert record["method_info"]["examples_per_injection"]["qa"] >= 3
    assert record["extra_storage_bytes"] > 0 and record["method_info"]["teacher_cache_bytes"] > 0


def test_saved_state_restores_the_adapter_and_the_sampling_state(tiny_lm_factory, tmp_path):
    first_lm = tiny_lm_factory()
    method = make(first_lm, continuation_per_sentence=1.0)
    method.inject([FACT])
    assert method.save_state(tmp_path / "state") is True
    prompt = torch.tensor([first_lm.prompt_ids(" Velmora")])
    fresh_lm = tiny_lm_factory()
    restored = make(fresh_lm, continuation_per_sentence=1.0)
    restored.load_state(tmp_path / "state")
    with torch.no_grad():
        assert torch.allclose(fresh_lm.model(prompt).logits, first_lm.model(prompt).logits, atol=1e-6)
    assert restored.rng.random() == method.rng.random()  # the next continuation cut is the same
    assert restored.losses == method.losses and restored.extra_storage_bytes() == method.extra_storage_bytes()


def test_teacher_cache_reading_the_shared_context_once_equals_reading_it_in_every_row(tiny_lm, monkeypatch):
    fact = Knowledge(id="fact", context=FACT.context, train_sentences=(
        QUESTION + ANSWER + "\n", "Question: Where does Dropesdra lie?\nAnswer: in the hills\n",
        "Question: What kind of place is Dropesdra?\nAnswer: a small town\n"))
    method = make(tiny_lm, teacher_top_k=16, continuation_per_sentence=1.0, regularisation_per_sentence=1.0,
                  regularisation={"source": "model", "n_texts": 4})
    method.prepare([])
    pairs = method._pairs(fact)
    read = []
    monkeypatch.setattr(tiny_lm, "read_prefix", lambda ids, real=tiny_lm.read_prefix: read.append(len(ids)) or real(ids))
    shared = method._teacher_cache(pairs)
    assert read and min(read) > len(tiny_lm.start_ids)  # the context (or a continuation's start) was shared
    monkeypatch.setattr(tiny_lm, "fits_after_prefix", lambda *_: False)  # every row reads its whole prefix
    plain = method._teacher_cache(pairs)
    assert [e.kind for e in shared] == [e.kind for e in plain] and len(shared) == len(pairs)
    for a, b in zip(shared, plain):
        assert torch.equal(a.teacher_index, b.teacher_index)
        assert torch.allclose(a.teacher_logprobs, b.teacher_logprobs, atol=1e-4)
        assert torch.allclose(a.teacher_rest, b.teacher_rest, atol=1e-4)
        # top-k and rest are one distribution: they sum to 1
        assert torch.allclose(torch.logsumexp(torch.cat([a.teacher_logprobs, a.teacher_rest[:, None]], 1), 1),
                              torch.zeros(len(a.teacher_rest)), atol=1e-4)
    # and they are the top-k of the log-softmax of the teacher's logits, the rest its remaining mass
    with torch.inference_mode():
        reference = torch.log_softmax(tiny_lm.target_logits(tiny_lm.collate([(pairs[0][0], pairs[0][2])])), -1)
    top, index = reference.topk(16, dim=-1)
    assert torch.equal(plain[0].teacher_index, index) and torch.allclose(plain[0].teacher_logprobs, top, atol=1e-5)
    assert torch.allclose(plain[0].teacher_rest, torch.logsumexp(reference.scatter(1, index, float("-inf")), -1), atol=1e-5)
