"""Continuous prompts in the LM wrapper: vectors spliced after the start token via `inputs_embeds`."""
import pytest
import torch

from core.types import GenerationSpec

# the tiny model reads this answer from the context (tests/test_lm.py) and cannot know it without
CONTEXT = ("Dropesdra is a small town in the hills. The town was founded by Sobei Klerdus. About 4580 people live in "
           "Dropesdra. Dropesdra lies on the banks of the Stouveth river. Dropesdra was founded in 1702.")
PROMPT, TARGET = "Question: On the banks of which river does Dropesdra lie?\nAnswer:", " Stouveth"


def test_no_vectors_score_and_generate_exactly_like_the_token_path(tiny_lm):
    prefix, target = tiny_lm.prompt_ids(PROMPT), tiny_lm.encode(TARGET)
    none = torch.zeros(0, tiny_lm.hidden_size)
    (plain,) = tiny_lm.loglikelihood([(prefix, target)])
    (spliced,) = tiny_lm.loglikelihood_with_vectors([(prefix, target)], [none])
    assert spliced.logprob == pytest.approx(plain.logprob, abs=1e-5)
    assert spliced.n_tokens == plain.n_tokens and spliced.token_accuracy == plain.token_accuracy
    assert spliced.predicted_ids == plain.predicted_ids and len(plain.predicted_ids) == len(target)
    prompts = [tiny_lm.prompt_ids(PROMPT, context=CONTEXT), tiny_lm.prompt_ids(" river")]
    spec = GenerationSpec(max_new_tokens=5, stop=())
    assert tiny_lm.generate_until_with_vectors(prompts, [none, none], spec) == tiny_lm.generate_until(prompts, spec)


def test_vectors_equal_to_context_embeddings_act_like_the_context(tiny_lm):
    """Splicing the embeddings of the rendered context after BOS is the same sequence as the context prompt."""
    context_vectors = tiny_lm.embed(tiny_lm.context_ids(CONTEXT))
    target = tiny_lm.encode(TARGET)
    (with_tokens,) = tiny_lm.loglikelihood([(tiny_lm.prompt_ids(PROMPT, context=CONTEXT), target)])
    (with_vectors,) = tiny_lm.loglikelihood_with_vectors([(tiny_lm.prompt_ids(PROMPT), target)], [context_vectors])
    (without,) = tiny_lm.loglikelihood([(tiny_lm.prompt_ids(PROMPT), target)])
    assert with_vectors.logprob == pytest.approx(with_tokens.logprob, abs=1e-4)
    assert with_vectors.logprob > without.logprob + 4.0  # the tiny model reads " Stouveth" only with the context
    spec = GenerationSpec(max_new_tokens=2, stop=())
    (answer,) = tiny_lm.generate_until_with_vectors([tiny_lm.prompt_ids(PROMPT)], [context_vectors], spec)
    assert answer.startswith("Sto")


def test_batched_rows_with_different_vector_counts_match_one_by_one(tiny_lm):
    context_vectors = tiny_lm.embed(tiny_lm.context_ids(CONTEXT))
    prompts = [tiny_lm.prompt_ids(PROMPT), tiny_lm.prompt_ids(" river capital and more words"), tiny_lm.prompt_ids(" Quill")]
    vectors = [context_vectors, torch.zeros(0, tiny_lm.hidden_size), context_vectors[:2]]
    spec = GenerationSpec(max_new_tokens=4, stop=())
    batched = tiny_lm.generate_until_with_vectors(prompts, vectors, spec)
    assert batched == [tiny_lm.generate_until_with_vectors([p], [v], spec)[0] for p, v in zip(prompts, vectors)]
    target = tiny_lm.encode(TARGET)
    scores = tiny_lm.loglikelihood_with_vectors([(p, target) for p in prompts], vectors)
    singles = [tiny_lm.loglikelihood_with_vectors([(p, target)], [v])[0] for p, v in zip(prompts, vectors)]
    assert [s.logprob for s in scores] == pytest.approx([s.logprob for s in singles], abs=1e-4)


def test_gradients_flow_into_the_vectors_only(tiny_lm):
    vectors = torch.randn(3, tiny_lm.hidden_size, requires_grad=True)
    batch = tiny_lm.collate_with_vectors([(tiny_lm.prompt_ids(PROMPT), tiny_lm.encode(TARGET))], [vectors])
    assert batch.inputs_embeds.shape[1] == len(tiny_lm.prompt_ids(PROMPT)) + 3 + len(tiny_lm.encode(TARGET))
    assert batch.target_ids.tolist() == tiny_lm.encode(TARGET)
    logits = tiny_lm.target_logits_with_vectors(batch)
    torch.nn.functional.cross_entropy(logits, batch.target_ids).backward()
    assert vectors.grad is not None and vectors.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_lm.model.parameters())


def test_vector_slot_and_bad_shapes(tiny_lm):
    ids = tiny_lm.prompt_ids(PROMPT)
    assert tiny_lm.vector_slot(ids) == 1 and tiny_lm.vector_slot(ids[1:]) == 0
    with pytest.raises(ValueError, match=r"vectors must be \[k, 64\]"):
        tiny_lm.loglikelihood_with_vectors([(ids, tiny_lm.encode(TARGET))], [torch.zeros(2, 7)])
    with pytest.raises(ValueError, match="2 prompts but 1 vector tensors"):
        tiny_lm.generate_until_with_vectors([ids, ids], [torch.zeros(0, 64)], GenerationSpec())
