"""GRACE's codebook on the tiny real model: routing, the radius rules, reset, state round trip, config."""
import dataclasses

import pytest
import torch

from core.options import ConfigError
from core.types import EditSpec, GenerationSpec, Knowledge, Query
from methods.grace import GraceMethod
from runners.build import check_run
from runners.experiment import Experiment
from tests.conftest import compose_config, read_record

EDIT = Knowledge(id="e0", context="Velmora founded Orvane",
                 edit=EditSpec("Question: Who founded Velmora?\nAnswer:", " Orvane"))
OTHER = Knowledge(id="e1", context="The river Tessa",
                  edit=EditSpec("Question: Which river runs through Kalden?\nAnswer:", " Tessa"))
UNRELATED = [Query(id=f"u{i}", prompt=p) for i, p in enumerate(
    ["Question: In what year was Brindle Hall established?\nAnswer:", " The copper clocks are old", "Who set up Marrow Inn?"])]


def grace(lm, **knobs) -> GraceMethod:
    return GraceMethod(lm, **({"iterations": 15} | knobs))


def test_queries_outside_every_radius_are_bit_identical_and_the_edit_is_learned(tiny_lm):
    pairs = [(q, " again") for q in UNRELATED] + [(Query(id="e", prompt=EDIT.edit.prompt), EDIT.edit.target)]
    queries, targets = [q for q, _ in pairs], [t for _, t in pairs]
    before = GraceMethod.loglikelihood(grace(tiny_lm), queries, targets)  # hook installed, empty codebook
    spec = GenerationSpec(max_new_tokens=4, stop=())
    generated_before = [a.text for a in grace(tiny_lm).answer(queries, spec)]
    method = grace(tiny_lm)
    method.inject([EDIT, OTHER])
    decisions = method.route(queries)
    assert [entry for entry, _ in decisions] == [None, None, None, 0]
    assert all(d > method.eps for _, d in decisions[:3])  # really outside: the rule, not an accident of the hook
    after = method.loglikelihood(queries, targets)  # one batch mixing edited and unrelated rows
    for b, a in zip(before[:3], after[:3]):
        assert a.logprob == b.logprob and a.predicted_ids == b.predicted_ids  # bit-identical
    # at the top layer the value (at the last prompt token) writes the first target token only: later target
    # positions never see it (no layer above to carry it there)
    first = tiny_lm.encode(EDIT.edit.target)[0]
    assert after[3].logprob > before[3].logprob + 1.0 and after[3].predicted_ids[0] == first != before[3].predicted_ids[0]
    assert after[3].predicted_ids[1:] == before[3].predicted_ids[1:]
    generated = method.answer(queries, spec)
    assert [a.text for a in generated[:3]] == generated_before[:3]
    assert generated[3].text != generated_before[3] and generated[3].meta["grace_entry"] == 0
    # the edit the query was routed to is reported like a retrieval (retrieval recall), none for the others
    assert [a.meta["retrieved_knowledge_ids"] for a in generated] == [[], [], [], ["e0"]]


def test_codebook_rules_add_expand_split(tiny_lm):
    method = grace(tiny_lm, iterations=2)
    method.inject([EDIT])
    method.inject([OTHER])
    assert [e["action"] for e in method.edit_log] == ["add", "add"] and len(method.keys) == 2
    assert method.epsilons.tolist() == [1.0, 1.0]
    # the same prompt with the same target again: no new entry; with another target: a split
    method.inject([Knowledge(id="e0b", context="again", edit=EDIT.edit)])
    assert method.edit_log[-1]["action"] == "expand" and len(method.keys) == 2 and method.edit_ids[0] == ["e0", "e0b"]
    method.inject([Knowledge(id="e0c", context="conflict", edit=dataclasses.replace(EDIT.edit, target=" Brask"))])
    assert method.edit_log[-1]["action"] == "split" and len(method.keys) == 3
    assert method.epsilons[0] < 0 and method.epsilons[2] == 0  # d = 0: both radii halve to (almost) nothing
    # as in the reference, the tie goes to the older entry, whose radius is now negative: the prompt is deferred
    assert method.route([Query(id="q", prompt=EDIT.edit.prompt)])[0][0] is None
    # a key just out of reach of the nearest entry's radius + eps gets its own entry; within it, coverage grows
    near = method.keys[1] + 0.5 / method.keys.shape[1] ** 0.5
    entry, action = method._update_codebook(near, method.labels[1], "n", tiny_lm.prompt_ids("x"))
    assert (entry, action) == (1, "expand") and method.epsilons[1] == 1.0  # inside the radius already: unchanged
    far = method.keys[1] + 3.0 / method.keys.shape[1] ** 0.5
    assert method._update_codebook(far, method.labels[1], "f", tiny_lm.prompt_ids("x"))[1] == "add"
    storage = 4 * len(method.keys) * (method.keys.shape[1] + method.values.shape[1] + 1) + 4 * sum(map(len, method.labels))
    assert method.extra_storage_bytes() == storage


def test_reset_restores_the_original_model(tiny_lm):
    weights = {k: v.clone() for k, v in tiny_lm.model.state_dict().items()}
    method = grace(tiny_lm)
    query = Query(id="q", prompt=EDIT.edit.prompt)
    before = method.loglikelihood([query], [EDIT.edit.target])[0]
    method.inject([EDIT])
    assert method.loglikelihood([query], [EDIT.edit.target])[0].logprob != before.logprob
    method.reset()
    assert len(method.keys) == 0 and method.extra_storage_bytes() == 0
    after = method.loglikelihood([query], [EDIT.edit.target])[0]
    assert after.logprob == before.logprob and after.predicted_ids == before.predicted_ids
    assert all(torch.equal(v, weights[k]) for k, v in tiny_lm.model.state_dict().items())  # GRACE never writes weights


def test_state_round_trip_continues_exactly(tiny_lm_factory, tmp_path):
    lm = tiny_lm_factory()
    full = grace(lm, iterations=5)
    full.inject([EDIT])
    assert full.save_state(tmp_path)
    full.inject([OTHER])
    full.remove()
    resumed = grace(lm, iterations=5)
    resumed.load_state(tmp_path)
    resumed.inject([OTHER])
    for a, b in ((full.keys, resumed.keys), (full.values, resumed.values), (full.epsilons, resumed.epsilons)):
        assert torch.equal(a, b)  # the cold value of the second edit too: the generator state was saved
    assert resumed.edit_log == full.edit_log and resumed.labels == full.labels


def test_reference_deviations_and_config_checks():
    cfg = compose_config("model=tiny", "method=grace")
    assert cfg.method.layer == pytest.approx(GraceMethod.reference["layer"])
    check_run(cfg)
    with pytest.raises(ConfigError, match="method.epss: unknown option"):
        check_run(compose_config("model=tiny", "method=grace", "+method.epss=2"))
    with pytest.raises(ConfigError, match="method.replacement"):
        check_run(compose_config("model=tiny", "method=grace", "method.replacement=first"))


def test_the_default_deviates_from_the_reference_in_replacement_only(tiny_lm):
    assert grace(tiny_lm, iterations=100).reference_deviations() == {
        "replacement": "'last' (reference: 'prompt')"}
    # why: at the top layer, replacing the tokens before the key token cannot reach any target logit
    method = grace(tiny_lm, iterations=3, replacement="prompt")
    method.inject([EDIT])
    assert method.edit_log[0]["first_loss"] == method.edit_log[0]["last_loss"]


def test_grace_runs_end_to_end_on_the_tiny_model(tmp_path):
    overrides = ["model=tiny", "logger=none", "method=grace", "task=editing", "method.iterations=3",
                 "task.n_edits=3", "task.n_train=0", "task.max_new_tokens=3"]
    Experiment(compose_config(*overrides), tmp_path, names={"method": "grace", "task": "editing", "model": "tiny"}).run()
    record = read_record(tmp_path)
    assert record["status"] == "done"
    assert record["method_info"]["edits"] == 3 and record["extra_storage_bytes"] > 0
    assert record["method_deviations"] == {"iterations": "3 (reference: 100)", "replacement": "'last' (reference: 'prompt')"}
    assert record["metrics"]["after_all/locality"] == 1.0


def test_replaying_the_frozen_layers_gives_the_full_forward(tiny_lm):
    from core.replay import FrozenPrefix

    batch = tiny_lm.collate([(tiny_lm.prompt_ids(EDIT.edit.prompt), tiny_lm.encode(EDIT.edit.target))] * 2)
    full = tiny_lm.target_logits(batch)
    frozen = FrozenPrefix(tiny_lm.decoder_layers(), 3, check=True)
    calls = []
    hook = tiny_lm.decoder_layers()[1].self_attn.register_forward_hook(lambda *a: calls.append(1))
    for _ in range(3):
        assert torch.allclose(frozen.verified(lambda: tiny_lm.target_logits(batch)), full, atol=1e-5)
    hook.remove()
    assert len(calls) == 2  # the first pass and the one full check: replayed passes skip the frozen layers
    assert torch.equal(tiny_lm.target_logits(batch), full)  # the layers' own forwards are back
