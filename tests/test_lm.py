"""The LM wrapper on the tiny real model: token layout, batching, generation, scoring."""
import pytest
import torch

from core.lm import cut_at_stop
from core.types import GenerationSpec

# A copyable fact in the form the tiny model reads (core/tiny.py): the answer is in the context, and
# without it the model cannot know the name (task=synthetic's first town, data seed 0).
CONTEXT = ("Dropesdra is a small town in the hills. The town was founded by Sobei Klerdus. About 4580 people live in "
           "Dropesdra. Dropesdra lies on the banks of the Stouveth river. Dropesdra was founded in 1702.")
PROMPT, TARGET = "Question: On the banks of which river does Dropesdra lie?\nAnswer:", " Stouveth"


def test_tiny_model_is_built_from_config_and_deterministic(tiny_lm_factory):
    first, second = tiny_lm_factory(), tiny_lm_factory()
    ids = first.prompt_ids("hello world")
    assert torch.equal(first.model(torch.tensor([ids])).logits, second.model(torch.tensor([ids])).logits)
    assert first.model.config.model_type == "llama"
    assert first.tokenizer.decode(first.encode("any text: ünïcode 123")) == "any text: ünïcode 123"


def test_prompt_ids_concatenate_pieces(tiny_lm):
    ids = tiny_lm.prompt_ids(PROMPT, context=CONTEXT)
    expected = tiny_lm.start_ids + tiny_lm.encode(CONTEXT + "\n") + tiny_lm.encode(PROMPT)
    assert ids == expected
    assert ids[0] == tiny_lm.tokenizer.bos_token_id
    assert tiny_lm.prompt_ids(PROMPT) == tiny_lm.start_ids + tiny_lm.encode(PROMPT)


def test_collate_right_pads_and_masks_targets(tiny_lm):
    batch = tiny_lm.collate([([1, 5], [6, 7, 8]), ([1], [9])])
    assert batch.input_ids.tolist() == [[1, 5, 6, 7, 8], [1, 9, 0, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    assert batch.target_ids.tolist() == [6, 7, 8, 9]
    logits = tiny_lm.target_logits(batch)
    assert logits.shape == (4, len(tiny_lm.tokenizer)) and logits.dtype == torch.float32
    with pytest.raises(ValueError, match="empty target"):
        tiny_lm.collate([([1], [])])


def test_target_logits_match_a_plain_forward(tiny_lm):
    prefix, target = tiny_lm.prompt_ids(PROMPT), tiny_lm.encode(TARGET)
    full = tiny_lm.model(torch.tensor([prefix + target])).logits[0]
    expected = full[len(prefix) - 1 : len(prefix) + len(target) - 1]
    padded = tiny_lm.collate([(prefix, target), (prefix + [7, 7, 7], target)])  # padding must not leak in
    got = tiny_lm.target_logits(padded)[: len(target)]
    assert torch.allclose(got, expected, atol=1e-5)


def test_score_is_the_sum_of_token_logprobs(tiny_lm):
    prefix, target = tiny_lm.prompt_ids(PROMPT), tiny_lm.encode(TARGET)
    logprobs = torch.log_softmax(tiny_lm.model(torch.tensor([prefix + target])).logits[0].float(), -1)
    manual = sum(float(logprobs[len(prefix) - 1 + i, t]) for i, t in enumerate(target))
    (score,) = tiny_lm.score([(prefix, target)])
    assert score.logprob == pytest.approx(manual, abs=1e-4)
    assert score.n_tokens == len(target)


def test_tiny_model_copies_from_context(tiny_lm):
    with_context, without = tiny_lm.score([
        (tiny_lm.prompt_ids(PROMPT, context=CONTEXT), tiny_lm.encode(TARGET)),
        (tiny_lm.prompt_ids(PROMPT), tiny_lm.encode(TARGET)),
    ])
    assert with_context.token_accuracy == 1.0 and with_context.logprob > -1.0
    assert without.token_accuracy < 1.0 and without.logprob < -5.0


def test_batched_generation_equals_one_by_one(tiny_lm):
    prompts = [tiny_lm.prompt_ids(p, context=c) for p, c in
               [(PROMPT, CONTEXT), (" river", " river capital and more words here"), (" Quill", None)]]
    spec = GenerationSpec(max_new_tokens=6, stop=())
    batched = tiny_lm.generate(prompts, spec)
    assert batched == [tiny_lm.generate([p], spec)[0] for p in prompts]
    assert batched[0].startswith("Stouveth")


def test_cut_at_stop():
    assert cut_at_stop(" Paris\nQuestion: next", ["\n"]) == "Paris"
    assert cut_at_stop("a. b; c", [";", "."]) == "a"
    assert cut_at_stop("no stop here ", ["\n"]) == "no stop here"
