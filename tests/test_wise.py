"""WISE's side memory on the tiny real model: routing, shards and merging, reset, state round trip, config."""
import pytest
import torch

from core.options import ConfigError
from core.types import EditSpec, GenerationSpec, Knowledge, Query
from methods.wise import WiseMethod, positive_mean, routing_activation, ties_merge
from runners.build import check_run
from runners.experiment import Experiment
from tests.conftest import compose_config, read_record

EDITS = [Knowledge(id=f"e{i}", context=f"{p}{t}", edit=EditSpec(p, t)) for i, (p, t) in enumerate([
    ("Question: Who founded Velmora?\nAnswer:", " Orvane"),
    ("Question: Which river runs through Kalden?\nAnswer:", " Tessa"),
    ("Question: In what year did Brask open?\nAnswer:", " 1911"),
])]
# the held-out split's locality rows stand for the reference's training-set `loc_prompt`s
HELD_OUT = [Knowledge(id="t0", context="x", edit=EditSpec("Question: Who built Kalden?\nAnswer:", " Ada", locality_prompts=(
    "Question: Who designed Pell Tower?\nAnswer:",), locality_answers=("Mara Finch",)))]
UNRELATED = Query(id="u", prompt="The weather is nice today")


def wise(lm, **knobs) -> WiseMethod:
    method = WiseMethod(lm, **({"iterations": 12} | knobs))
    method.prepare(HELD_OUT)
    return method


def test_margin_pieces_on_hand_made_tensors():
    original = torch.zeros(1, 3, 2)
    edited = torch.tensor([[[3.0, 4.0], [0.0, 0.0], [6.0, 8.0]]])
    weights = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    assert routing_activation(original, edited, torch.nn.Identity(), weights).tolist() == [2.5]
    assert positive_mean(torch.tensor([-1.0, 2.0, 4.0])) == 3.0 and positive_mean(torch.tensor([-1.0])) == 0.0


def test_ties_merge_keeps_the_top_entries_and_the_elected_sign():
    base = torch.zeros(4)
    a, b = torch.tensor([4.0, -1.0, 2.0, 0.5]), torch.tensor([-2.0, -3.0, 2.0, 0.1])
    merged = ties_merge(base, [a, b], [0.5, 0.5], density=0.5)
    # kept: a -> {4, 2}, b -> {-2, -3}; entry 0: +2 - 1 > 0 elects +, only a agrees -> 4; entry 1: b alone -> -3
    # entry 2: both agree -> mean 2; entry 3: pruned in both -> 0
    assert merged.tolist() == [4.0, -3.0, 2.0, 0.0]


def test_an_unrelated_query_uses_the_main_memory_bit_identically_and_the_edit_the_side_memory(tiny_lm):
    queries = [UNRELATED, Query(id="e", prompt=EDITS[0].edit.prompt)]
    targets = [" indeed", EDITS[0].edit.target]
    before = wise(tiny_lm).loglikelihood(queries, targets)
    spec = GenerationSpec(max_new_tokens=3, stop=())
    generated_before = [a.text for a in wise(tiny_lm).answer(queries, spec)]
    # the reference's margins (alpha 5, beta 20) are activation norms set for 7B models: on the 64-wide tiny model
    # lr 1.0 moves W' so far that every prompt's activation clears the threshold; at lr 0.01 routing separates
    method = wise(tiny_lm, lr=0.01, iterations=40)
    method.inject([EDITS[0]])
    assert not torch.equal(method.side, method.main) and method.side_threshold < float("inf")
    pairs = [tiny_lm.prompt_ids(q.prompt) + tiny_lm.encode(t) for q, t in zip(queries, targets)]
    assert method.route(pairs) == [None, -1]
    after = method.loglikelihood(queries, targets)
    assert after[0].logprob == before[0].logprob and after[0].predicted_ids == before[0].predicted_ids
    assert after[1].logprob > before[1].logprob
    answers = method.answer(queries, spec)
    assert answers[0].text == generated_before[0] and answers[0].meta == {"wise_memory": "main"}
    # with only the main memory's weights touched nowhere, the model itself is unchanged
    assert torch.equal(method.target_module.weight.float(), method.main)


def test_shards_are_stored_in_their_own_subspace_and_merged(tiny_lm):
    method = wise(tiny_lm, iterations=3, save_freq=1, merge_freq=2, mask_ratio=0.3)
    method.inject([EDITS[0]])
    assert len(method.memories) == 1 and torch.equal(method.side, method.main)  # shard stored, W' fresh
    moved = (method.memories[0] - method.main).abs()
    # only the shard's subspace learns; outside it W' moves by the reference's weight decay alone (3 steps of 1e-5)
    assert moved[method.mask].max() > 1e-2
    assert torch.all(moved[~method.mask] <= 3 * 1e-5 * method.main.abs()[~method.mask] * 1.01 + 1e-9)
    first_mask = method.mask.clone()
    method.inject([EDITS[1]])
    assert method.merges == 1 and len(method.memories) == 1 and not torch.equal(method.mask, first_mask)
    method.inject([EDITS[2]])
    assert len(method.memories) == 2 and method.info()["memories"] == 2
    assert method.extra_storage_bytes() == 3 * method.main.numel() * 4 + method.main.numel() + 8 * 3


def test_reset_restores_the_original_weights_and_outputs(tiny_lm):
    weights = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    method = wise(tiny_lm)
    query = Query(id="q", prompt=EDITS[0].edit.prompt)
    before = method.loglikelihood([query], [EDITS[0].edit.target])[0]
    method.inject([EDITS[0]])
    assert method.loglikelihood([query], [EDITS[0].edit.target])[0].logprob != before.logprob
    method.reset()
    assert torch.equal(method.side, method.main) and not method.memories and method.extra_storage_bytes() == 0
    after = method.loglikelihood([query], [EDITS[0].edit.target])[0]
    assert after.logprob == before.logprob and after.predicted_ids == before.predicted_ids
    assert all(torch.equal(v, weights[k]) for k, v in tiny_lm.model.state_dict().items())


def test_state_round_trip_continues_exactly(tiny_lm_factory, tmp_path):
    lm = tiny_lm_factory()
    full = wise(lm, iterations=3, save_freq=1, merge_freq=2)
    full.inject([EDITS[0]])
    assert full.save_state(tmp_path)
    full.inject([EDITS[1]])
    full.remove()
    resumed = WiseMethod(lm, iterations=3, save_freq=1, merge_freq=2)  # no prepare: the state carries its data
    resumed.load_state(tmp_path)
    resumed.inject([EDITS[1]])
    assert torch.equal(resumed.memories[0], full.memories[0]) and torch.equal(resumed.mask, full.mask)
    assert resumed.edit_log == full.edit_log and resumed.memory_thresholds == full.memory_thresholds


def test_reference_values_and_config_checks(tiny_lm):
    cfg = compose_config("model=tiny", "method=wise")
    assert cfg.method.layer == pytest.approx(WiseMethod.reference["layer"])
    check_run(cfg)
    assert WiseMethod(tiny_lm).reference_deviations() == {}
    assert WiseMethod(tiny_lm, save_freq=10, merge_freq=20).reference_deviations() == {
        "save_freq": "10 (reference: 500)", "merge_freq": "20 (reference: 1000)"}
    with pytest.raises(ConfigError, match="method.mask_ration: unknown option"):
        check_run(compose_config("model=tiny", "method=wise", "+method.mask_ration=0.2"))
    with pytest.raises(ConfigError, match="method.mask_ratio"):
        check_run(compose_config("model=tiny", "method=wise", "method.mask_ratio=0"))
    with pytest.raises(ValueError, match="multiple of method.save_freq"):
        WiseMethod(tiny_lm, save_freq=3, merge_freq=4)


def test_wise_runs_end_to_end_on_the_tiny_model(tmp_path):
    overrides = ["model=tiny", "logger=none", "method=wise", "task=editing", "method.iterations=3",
                 "task.n_edits=2", "task.n_train=2", "task.max_new_tokens=3"]
    Experiment(compose_config(*overrides), tmp_path, names={"method": "wise", "task": "editing", "model": "tiny"}).run()
    record = read_record(tmp_path)
    assert record["status"] == "done"
    assert record["method_info"]["edits"] == 2 and record["method_info"]["templates"] == 11
    assert record["extra_storage_bytes"] > 0 and record["method_deviations"] == {"iterations": "3 (reference: 70)"}
