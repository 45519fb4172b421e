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
    (score,) = tiny_lm.loglikelihood([(prefix, target)])
    assert score.logprob == pytest.approx(manual, abs=1e-4)
    assert score.n_tokens == len(target)


def test_tiny_model_copies_from_context(tiny_lm):
    with_context, without = tiny_lm.loglikelihood([
        (tiny_lm.prompt_ids(PROMPT, context=CONTEXT), tiny_lm.encode(TARGET)),
        (tiny_lm.prompt_ids(PROMPT), tiny_lm.encode(TARGET)),
    ])
    assert with_context.token_accuracy == 1.0 and with_context.logprob > -1.0
    assert without.token_accuracy < 1.0 and without.logprob < -5.0


def test_batched_generation_equals_one_by_one(tiny_lm):
    prompts = [tiny_lm.prompt_ids(p, context=c) for p, c in
               [(PROMPT, CONTEXT), (" river", " river capital and more words here"), (" Quill", None)]]
    spec = GenerationSpec(max_new_tokens=6, stop=())
    batched = tiny_lm.generate_until(prompts, spec)
    assert batched == [tiny_lm.generate_until([p], spec)[0] for p in prompts]
    assert batched[0].startswith("Stouveth")


def test_cut_at_stop():
    assert cut_at_stop(" Paris\nQuestion: next", ["\n"]) == "Paris"
    assert cut_at_stop("a. b; c", [";", "."]) == "a"
    assert cut_at_stop("no stop here ", ["\n"]) == "no stop here"


def test_module_inputs_capture_what_a_full_forward_sees_and_skip_the_layers_above(tiny_lm):
    """The editors' one capture path: the input of a module and the output of a layer, as a plain hook in a
    full forward records them; the forward stops there, and a module off the path is named."""
    layers = tiny_lm.decoder_layers()
    index, down = tiny_lm.linear_at(0.5, "mlp.down_proj")
    assert index == round(0.5 * len(layers)) and down is layers[index].mlp.down_proj
    assert tiny_lm.linear_at(-1, "mlp.down_proj")[0] == len(layers) - 1
    with pytest.raises(ValueError, match="fraction of the depth"):
        tiny_lm.linear_at(1.5, "mlp.down_proj")
    with pytest.raises(ValueError, match="not a Linear layer"):
        tiny_lm.linear_at(0, "mlp")
    ids = torch.tensor([tiny_lm.prompt_ids("The river of Velmora")], device=tiny_lm.device)
    seen = {}
    handles = [down.register_forward_pre_hook(lambda m, args: seen.setdefault("in", args[0].detach())),
               layers[index].register_forward_hook(lambda m, a, out: seen.setdefault("out", (out[0] if isinstance(out, tuple) else out).detach()))]
    try:
        tiny_lm.causal_lm.get_decoder()(input_ids=ids)
    finally:
        for handle in handles:
            handle.remove()
    ran = []
    top = layers[-1].register_forward_hook(lambda *args: ran.append(1))
    try:
        x, out = tiny_lm.module_inputs([down], ids, outputs_of=[layers[index]])
    finally:
        top.remove()
    assert torch.equal(x, seen["in"]) and torch.equal(out, seen["out"])
    assert not ran or index == len(layers) - 1  # the layers above the last capture are not run
    with pytest.raises(Exception, match="never reached"):
        tiny_lm.module_inputs([torch.nn.Linear(2, 2)], ids)


def _gemma3_lm(tiny_lm, sliding_window: int):
    """A random tiny Gemma 3 (sliding and full attention layers, logit soft-capping) on the tiny tokenizer."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from core.lm import LM

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tiny_lm.tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=sliding_window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], final_logit_softcapping=30.0,
        pad_token_id=tiny_lm.tokenizer.pad_token_id, bos_token_id=tiny_lm.tokenizer.bos_token_id,
    )
    return LM(Gemma3ForCausalLM(config), tiny_lm.tokenizer, name="tiny-gemma3")


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_target_logits_after_a_cached_prefix_equal_reading_it_in_every_row(tiny_lm, family):
    lm = tiny_lm if family == "llama" else _gemma3_lm(tiny_lm, sliding_window=512)
    shared = lm.prompt_ids(PROMPT)  # rows of unequal length after it: padding must not leak into the cache
    rows = [(lm.encode(" Where"), lm.encode(TARGET)), (lm.encode(" The river is"), lm.encode(" long and wide")),
            (lm.encode(" ."), lm.encode(TARGET + " indeed"))]
    plain = lm.target_logits(lm.collate([(shared + p, t) for p, t in rows]))
    cached = lm.target_logits(lm.collate(rows), prefix=lm.read_prefix(shared))
    assert cached.shape == plain.shape == (sum(len(t) for _, t in rows), len(lm.tokenizer))
    assert torch.allclose(cached, plain, atol=1e-4)
    assert not torch.allclose(cached, lm.target_logits(lm.collate(rows)), atol=1e-2)  # the prefix is read


def test_a_cached_prefix_is_refused_past_the_sliding_window_or_max_length(tiny_lm):
    lm = _gemma3_lm(tiny_lm, sliding_window=32)
    assert lm.fits_after_prefix(20, 12) and not lm.fits_after_prefix(20, 13)
    tiny_lm.max_length, kept = 40, tiny_lm.max_length
    try:
        assert tiny_lm.fits_after_prefix(30, 10) and not tiny_lm.fits_after_prefix(30, 11)
    finally:
        tiny_lm.max_length = kept


def test_common_prefix_length():
    from core.lm import common_prefix_length

    assert common_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert common_prefix_length([[1, 2], [3]]) == 0 and common_prefix_length([]) == 0
    assert common_prefix_length([[4, 5, 6]]) == 3


def test_a_model_whose_cache_cannot_be_reused_reads_every_prefix_in_full(tiny_lm, monkeypatch, caplog):
    from core.lm import LM

    assert tiny_lm.prefix_cache_ok and tiny_lm.fits_after_prefix(4, 4)
    # a cache holding the wrong prefix, as a family whose cache is not reusable would: its logits differ
    monkeypatch.setattr(LM, "read_prefix", lambda self, ids, real=LM.read_prefix: real(self, [i + 1 for i in ids]))
    with caplog.at_level("WARNING"):
        lm = LM(tiny_lm.model, tiny_lm.tokenizer, name="tiny")  # the load-time check finds it
    assert not lm.prefix_cache_ok and not lm.fits_after_prefix(4, 4)
    assert "prefixes are re-read per row" in caplog.text
