"""The reference and fine-tuning methods on the tiny real model."""
import re

import pytest
import torch

from core.types import GenerationSpec, KBenchError, Knowledge, NonFiniteLossError, Query
from methods.base import BaseMethod, ContextMethod
from methods.finetune import FineTuneContext, FineTuneSentences
from methods.sentences import AutoSentences, LocalGenerator, TaskSentences, parse_qa_pairs

# A copyable fact in the form the tiny model reads (core/tiny.py): the answer is in the context, and
# without it the model cannot know the name (task=synthetic's first town, data seed 0).
CONTEXT = ("Dropesdra is a small town in the hills. The town was founded by Sobei Klerdus. About 4580 people live in "
           "Dropesdra. Dropesdra lies on the banks of the Stouveth river. Dropesdra was founded in 1702.")
PROMPT, TARGET = "Question: On the banks of which river does Dropesdra lie?\nAnswer:", " Stouveth"
LORA = {"mode": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}}
FAST = dict(lr=1e-2, epochs=4, batch_size=2, seed=0)


def fact(sentences=("The river Orvane runs north.\n", "Velmora lies on the Orvane.\n")) -> Knowledge:
    return Knowledge(id="k0", context="Velmora is a town on the Orvane river.", train_sentences=tuple(sentences))


def mean_loss(method, pairs) -> float:
    with torch.no_grad():
        loss, n = method.loss(pairs)
    return float(loss) / n


def test_context_method_answers_a_copyable_fact_that_base_cannot(tiny_lm):
    query = Query(id="q", prompt=PROMPT, context=CONTEXT)
    spec = GenerationSpec(max_new_tokens=8, stop=("\n",))
    assert ContextMethod(tiny_lm).answer([query], spec)[0].text == "Stouveth"
    assert "Stouveth" not in BaseMethod(tiny_lm).answer([query], spec)[0].text
    with pytest.raises(ValueError, match="carries no context"):
        ContextMethod(tiny_lm).answer([Query(id="q", prompt=PROMPT)], spec)


def test_ft_sentences_lowers_the_loss_on_its_sentences(tiny_lm):
    method = FineTuneSentences(tiny_lm, sentences=TaskSentences(), update=LORA, **FAST)
    knowledge = fact()
    pairs = method.training_examples([knowledge])
    before = mean_loss(method, pairs)
    method.inject([knowledge])
    after = mean_loss(method, pairs)
    assert after < 0.8 * before
    assert method.extra_storage_bytes() > 0
    assert method.losses[-1] < method.losses[0]


def test_ft_context_lowers_the_loss_on_the_context_and_chunks_it(tiny_lm):
    method = FineTuneContext(tiny_lm, chunk_tokens=8, update=LORA, **FAST)
    knowledge = fact()
    pairs = method.training_examples([knowledge])
    assert all(len(target) <= 8 for _, target in pairs)
    assert sum(len(t) for _, t in pairs) == len(tiny_lm.encode(knowledge.context))
    before = mean_loss(method, pairs)
    method.inject([knowledge])
    assert mean_loss(method, pairs) < 0.8 * before


def _logits(lm, text="Velmora lies on the"):
    with torch.no_grad():
        return lm.model(torch.tensor([lm.prompt_ids(text)])).logits.clone()


def test_reset_restores_the_untouched_model_lora_and_full(tiny_lm):
    original = _logits(tiny_lm)
    for update in (LORA, {"mode": "full"}):
        method = FineTuneSentences(tiny_lm, sentences=TaskSentences(), update=update, **FAST)
        method.inject([fact()])
        assert not torch.allclose(_logits(tiny_lm), original, atol=1e-4)
        method.reset()
        assert torch.allclose(_logits(tiny_lm), original, atol=1e-6)
        assert method.extra_storage_bytes() == 0


def test_merge_keeps_outputs_and_frees_storage(tiny_lm):
    original = _logits(tiny_lm)
    unmerged = FineTuneSentences(tiny_lm, sentences=TaskSentences(), update=LORA, merge=False, **FAST)
    unmerged.inject([fact()])
    adapter_logits = _logits(tiny_lm)
    unmerged.reset()
    merged = FineTuneSentences(tiny_lm, sentences=TaskSentences(), update=LORA, merge=True, **FAST)
    merged.inject([fact()])
    assert torch.allclose(_logits(tiny_lm), adapter_logits, atol=1e-4)
    assert merged.extra_storage_bytes() == 0 and merged.info()["merged"] is True
    merged.reset()
    assert torch.allclose(_logits(tiny_lm), original, atol=1e-6)


def test_nan_loss_stops_injection(tiny_lm):
    method = FineTuneSentences(tiny_lm, sentences=TaskSentences(), update=LORA, **FAST)
    method.loss = lambda pairs: (torch.tensor(float("nan"), requires_grad=True), 3)
    with pytest.raises(NonFiniteLossError, match="loss became nan"):
        method.inject([fact()])


def test_sentence_sources(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    with pytest.raises(Exception, match="no training sentences"):
        TaskSentences()(Knowledge(id="x", context="some text"), tiny_lm)
    generator = LocalGenerator(n_sentences=3, prompt="Text: {context}\nQuestion:", max_attempts=2)
    auto = AutoSentences(generator)
    assert auto(fact(), tiny_lm) == list(fact().train_sentences)


def test_parse_qa_pairs():
    text = "Question: Who founded it?\nAnswer: Ada Quill\nQuestion: When?\nAnswer: 1742\nQuestion: dangling"
    assert parse_qa_pairs(text) == [("Who founded it?", "Ada Quill"), ("When?", "1742")]
    assert parse_qa_pairs("Question: a b c d Answer: x Question: y") == []  # answer runs into a question


def test_local_generator_samples_questions_and_answers_them(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    generator = LocalGenerator(n_sentences=3, prompt="Text: {context}\nQuestion:", max_attempts=3)
    sentences = generator(Knowledge(id="x", context="Velmora founded the river town."), tiny_lm)
    assert 1 <= len(sentences) <= 3
    for sentence in sentences:  # the tiny model writes nonsense, but in the configured shape
        question, answer = re.fullmatch(r"Question: (.+)\nAnswer: (.+)\n", sentence, re.S).groups()
        assert len(question) > 3 and "\n" not in answer
    with pytest.raises(ValueError, match="end with 'Question:'"):
        LocalGenerator(prompt="{context}")


def test_generator_that_finds_nothing_fails_clearly(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))

    class Mute(LocalGenerator):
        def generate_pairs(self, context, lm, attempt):
            return []

    with pytest.raises(KBenchError, match=r"produced no 'Question: ... Answer: ...' pair for 'x' .*in 2 attempts \(0 generated\)"):
        Mute(prompt="{context} Question:", max_attempts=2)(Knowledge(id="x", context="some text"), tiny_lm)


def test_generated_sentences_are_cached_per_context_and_config(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    calls = []

    class Scripted(LocalGenerator):  # the real caching path; only the model's output is scripted
        def generate_pairs(self, context, lm, attempt):
            calls.append(context)
            return [(f"What is in {context}?", "a fact"), ("Second?", "yes")]

    # the teacher filter off: this is about caching, and the tiny reader rejects scripted answers it cannot read
    generator = Scripted(n_sentences=2, prompt="{context} Question:", min_answer_prob=0)
    first = generator(Knowledge(id="a", context="ctx one"), tiny_lm)
    assert first == ["Question: What is in ctx one?\nAnswer: a fact\n", "Question: Second?\nAnswer: yes\n"]
    assert generator(Knowledge(id="a", context="ctx one"), tiny_lm) == first
    assert len(calls) == 1
    generator(Knowledge(id="b", context="ctx two"), tiny_lm)
    Scripted(n_sentences=1, prompt="{context} Question:", min_answer_prob=0)(Knowledge(id="a", context="ctx one"), tiny_lm)
    assert len(calls) == 3  # a new context and a new config both miss the cache


def test_an_edit_left_in_meta_by_an_old_task_is_refused_naming_editspec():
    """A task written to the contract before EditSpec (meta["prompt"], meta["target"]) must not be read as
    QA sentences silently: editors name the field to fill instead."""
    from core.types import EditSpec, KBenchError, Knowledge
    from methods.base import edit_pairs

    old = Knowledge(id="k", context="c", meta={"prompt": "The capital of Velmora is", "target": " Quill"})
    with pytest.raises(KBenchError, match=r"Knowledge\(edit=EditSpec"):
        edit_pairs(old, "\nAnswer:", "grace")
    new = Knowledge(id="k", context="c", edit=EditSpec("The capital of Velmora is", " Quill"))
    assert edit_pairs(new, "\nAnswer:", "grace") == [("The capital of Velmora is", " Quill")]
    qa = Knowledge(id="q", context="c", train_sentences=("Question: Who?\nAnswer: Ada\n",))
    assert edit_pairs(qa, "\nAnswer:", "grace") == [("Question: Who?\nAnswer:", " Ada")]
