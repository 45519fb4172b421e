"""RECIPE continuous prompts on the tiny real model: sentinel, exact memory-off path, save/load, the
reference's trainable encoder and retrieval query, and the knobs that deviate from it."""
import json
import math
import random

import pytest
import torch
from omegaconf import OmegaConf

from core.types import GenerationSpec, KBenchError, Knowledge, Query
from methods.base import BaseMethod
from methods.recipe import Recipe, _TrainingData, hinged_nll, is_reference_encoder, training_edits
from tasks.editing import EditingTask
from tasks.synthetic import SyntheticTask
from tests.conftest import compose_config, read_record

GENERAL = [["What is the capital of France?", "Paris"], ["Who wrote Romeo and Juliet?", "William Shakespeare"]]
UNRELATED = Query(id="unrelated", prompt="Question: How many legs does a spider have?\nAnswer:")  # never in training
# the earlier CPU variant (docs/recipe.md, "previous behaviour"): frozen encoder, cheap retrieval epochs
PREVIOUS = dict(train_encoder=False, rep_dim=256, sentinel="feature_vector", head_init="shared_projection",
                standardise=True, lr=1e-3, epochs=2, retrieval_epochs=20, max_grad_norm=1.0, similarity="cosine",
                temperature=20.0, contrastive_negatives=64, edit_gradients="prompt_generator", retrieval_query="prompt")
FAST = PREVIOUS | dict(batch_size=8, seed=0)
SPEC = GenerationSpec(max_new_tokens=4, stop=("\n",))


@pytest.fixture(scope="module")
def lm(tiny_lm_factory):
    return tiny_lm_factory()


@pytest.fixture(scope="module")
def task():
    return EditingTask(n_edits=4, n_train=48, generate=False, general_questions=GENERAL)


@pytest.fixture(scope="module")
def trained(lm, task, tmp_path_factory):
    """One RECIPE module trained on the task's 48 held-out edits (shared: tests reset what they inject)."""
    method = Recipe(lm, cache=False, **FAST)
    method.prepare(task.training_knowledge())
    return method


def edit_queries(task, index=0):
    edit = task.edits[index]
    return [Query(id="rewrite", prompt=edit.prompt), Query(id="rephrase", prompt=edit.rephrase_prompts[0])]


def test_training_lowers_the_loss_and_records_its_cost(trained):
    info = trained.info()["prepare"]
    assert info["source"] == "trained" and info["train_edits"] == 48
    assert info["joint_steps"] == 2 * 6 and info["retrieval_steps"] == 20 * 6  # 48 edits / batch 8
    for first, last in (info["joint_loss_first_last"], info["retrieval_loss_first_last"]):
        assert last < first
    assert set(info["final_loss_components"]) == {"reliability", "generality", "locality_kl", "query_to_knowledge",
                                                  "query_to_sentinel", "locality_to_sentinel"}


def test_sentinel_rejects_an_unrelated_query_after_training(trained, lm, task):
    trained.reset()
    trained.inject([task.knowledge(e) for e in task.edits])
    unrelated, rewrite = trained.retrieve([UNRELATED, edit_queries(task)[0]])
    assert unrelated["index"] is None and unrelated["sentinel"] > unrelated["similarity"]
    assert rewrite["index"] == 0 and rewrite["similarity"] > rewrite["sentinel"]
    # the same knowledge base with an untrained module accepts the unrelated query: training is what rejects it
    untrained = Recipe(lm, cache=False, **FAST)
    untrained.trained = True
    untrained.inject([task.knowledge(e) for e in task.edits])
    assert untrained.retrieve([UNRELATED])[0]["index"] is not None
    before = trained.info()["retrieval"]
    trained.retrieve([UNRELATED, edit_queries(task)[0]])
    after = trained.info()["retrieval"]
    assert after["queries"] - before["queries"] == 2 and after["accepted"] - before["accepted"] == 1
    assert after["rejected_by_sentinel"] - before["rejected_by_sentinel"] == 1


def test_memory_off_leaves_the_outputs_exactly_the_base_models(trained, lm, task):
    base = BaseMethod(lm)
    queries = [UNRELATED, *edit_queries(task)]
    targets = [" eight", " " + task.edits[0].target_new, " " + task.edits[0].target_new]
    trained.reset()  # empty knowledge base: nothing can be retrieved
    answers = trained.answer(queries, SPEC)
    assert [a.text for a in answers] == [a.text for a in base.answer(queries, SPEC)]
    assert all(a.meta["retrieved_knowledge_ids"] == [] for a in answers)
    assert trained.loglikelihood(queries, targets) == base.loglikelihood(queries, targets)  # bit-identical TargetScores
    trained.inject([task.knowledge(e) for e in task.edits])  # now only the unrelated query is rejected
    (rejected,) = trained.loglikelihood([UNRELATED], targets[:1])
    assert rejected == base.loglikelihood([UNRELATED], targets[:1])[0]
    assert rejected.meta["retrieved_knowledge_ids"] == [] and rejected.meta["recipe_sentinel"] > rejected.meta["recipe_similarity"]


def test_continuous_prompts_change_the_scored_target(trained, lm, task):
    trained.reset()
    trained.inject([task.knowledge(task.edits[0])])
    query, target = edit_queries(task)[:1], [" " + task.edits[0].target_new]
    (edited,) = trained.loglikelihood(query, target)
    (plain,) = BaseMethod(lm).loglikelihood(query, target)
    assert trained.retrieve(query)[0]["index"] == 0
    assert abs(edited.logprob - plain.logprob) > 1e-2
    assert len(edited.predicted_ids) == edited.n_tokens == plain.n_tokens
    (answer,) = trained.answer(query, SPEC)
    assert answer.meta["retrieved_knowledge_ids"] == [task.edits[0].id]
    assert trained.extra_storage_bytes() > sum(t.numel() * 4 for t in trained.module.state_dict().values())


def test_save_and_load_give_identical_outputs(trained, lm, task, tmp_path):
    path = tmp_path / "recipe.safetensors"
    trained.save(path)
    loaded = Recipe(lm, checkpoint=str(path), **FAST)
    loaded.prepare([])  # a checkpoint needs no training split
    assert loaded.info()["prepare"]["source"] == "checkpoint"
    queries = [UNRELATED, *edit_queries(task), *edit_queries(task, 1)]
    targets = [" eight"] + [" " + task.edits[0].target_new] * 2 + [" " + task.edits[1].target_new] * 2
    for method in (trained, loaded):
        method.reset()
        method.inject([task.knowledge(e) for e in task.edits])
    assert loaded.loglikelihood(queries, targets) == trained.loglikelihood(queries, targets)
    assert [a.text for a in loaded.answer(queries, SPEC)] == [a.text for a in trained.answer(queries, SPEC)]
    with pytest.raises(KBenchError, match="was trained for"):
        Recipe(lm, checkpoint=str(path), **(FAST | {"prompt_tokens": 2})).prepare([])
    with pytest.raises(KBenchError, match="no trained RECIPE module"):
        Recipe(lm, checkpoint=str(tmp_path / "missing.safetensors")).prepare([])


def test_the_trained_module_is_cached_for_identical_training(lm, task, tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    knobs = FAST | {"epochs": 1, "retrieval_epochs": 1}
    first = Recipe(lm, **knobs)
    first.prepare(task.training_knowledge())
    second = Recipe(lm, **knobs)
    second.prepare(task.training_knowledge())
    assert first.info()["prepare"]["source"] == "trained"
    assert second.info()["prepare"]["source"] == "cache"
    assert second.info()["prepare"]["training"]["train_seconds"] == first.info()["prepare"]["train_seconds"]
    third = Recipe(lm, **(knobs | {"rep_dim": 32}))  # other knobs: trained anew
    third.prepare(task.training_knowledge())
    assert third.info()["prepare"]["source"] == "trained"


def test_bad_training_input_fails_clearly(lm):
    method = Recipe(lm, cache=False, **FAST)
    with pytest.raises(KBenchError, match="gave no training split"):
        method.prepare([])
    with pytest.raises(KBenchError, match=r"'k' has no structured edit \(Knowledge.edit\)"):
        training_edits([Knowledge(id="k", context="a paragraph")])
    with pytest.raises(KBenchError, match="before prepare"):
        method.inject([Knowledge(id="k", context="a paragraph")])
    with pytest.raises(ValueError, match=r"method.edit_hinge: expected float >= 1, got 0.5 \(float\)"):
        Recipe(lm, edit_hinge=0.5)


def test_hinged_nll_by_hand():
    logits = torch.tensor([[2.0, 0.0, 0.0], [2.0, 0.0, 0.0]])
    p_top, p_low = math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)
    # row 0 already won (p = 0.79 >= 1.2 * 0.11): no loss; row 1's target lost: −log 0.11
    total, active = hinged_nll(logits, torch.tensor([0, 1]), scale=1.2)
    assert active == 1 and float(total) == pytest.approx(-math.log(p_low), abs=1e-5)
    # a hinge above the odds ratio keeps the winning row in the loss
    total, active = hinged_nll(logits, torch.tensor([0, 1]), scale=p_top / p_low + 0.1)
    assert active == 2 and float(total) == pytest.approx(-math.log(p_low) - math.log(p_top), abs=1e-5)


def test_training_edits_read_the_editing_contract(task):
    (edit,) = training_edits([task.knowledge(task.edits[0])])
    source = task.edits[0]
    assert edit.statement == source.prompt + " " + source.target_new
    assert edit.target == " " + source.target_new and edit.rephrases == source.rephrase_prompts
    assert edit.locality == tuple((p, " " + a) for p, a in zip(source.locality_prompts, source.locality_answers))


def test_synthetic_training_split_is_held_out_and_follows_the_contract():
    task = SyntheticTask(n_contexts=6, n_train_contexts=5)
    split = task.training_knowledge()
    assert len(split) == 5 * 4 and len({k.id for k in split}) == 20  # one Knowledge per fact
    evaluated = {f["subject"] for item in task.items for f in item.knowledge.meta["facts"]}
    edits = training_edits(split)
    assert not evaluated & {k.edit.subject for k in split}
    assert all(e.prompt.startswith("Question: ") and e.prompt.endswith("\nAnswer:") for e in edits)
    assert all(e.target.startswith(" ") and e.target.strip() in e.statement for e in edits)
    assert all(e.locality and e.locality[0][0] not in {x.prompt for x in edits} for e in edits)
    test_questions = {q for item in task.items for q, _ in item.questions}
    assert not test_questions & {e.prompt.removeprefix("Question: ").removesuffix("\nAnswer:") for e in edits}
    assert SyntheticTask().training_knowledge() == []
    with pytest.raises(ValueError, match="must differ"):
        SyntheticTask(n_train_contexts=2, train_data_seed=0)


@pytest.mark.parametrize("overrides", [
    ("task=editing", "task.n_edits=3", "task.n_train=8", "task.generate=true", "task.max_new_tokens=3"),
    ("task=synthetic", "task.n_contexts=2", "task.n_train_contexts=2"),
])
def test_recipe_runs_end_to_end_on_the_tiny_model(tmp_path, overrides):
    from runners.experiment import Experiment

    cfg = compose_config("model=tiny", "logger=none", "method=recipe", "method.epochs=1", "method.retrieval_epochs=2",
                         "method.cache=false", "method.rep_dim=64", "method.retrieval_query=prompt", *overrides)
    Experiment(cfg, tmp_path, names={"method": "recipe", "task": "t", "model": "tiny"}).run()
    record = read_record(tmp_path)
    assert record["status"] == "done", record["error"]
    assert record["timings"]["prepare"] > 0 and record["method_info"]["prepare"]["source"] == "trained"
    retrieval = record["method_info"]["retrieval"]
    assert retrieval["queries"] > 0
    assert retrieval["accepted"] + retrieval["rejected_by_sentinel"] + retrieval["empty_store"] == retrieval["queries"]
    assert record["extra_storage_bytes"] > 0
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    probed = [r for r in rows if not r["probe_set"].startswith("pre_edit")]  # the pre-edit pass sees no store
    assert probed and all("retrieved_knowledge_ids" in r["method_meta"] for r in probed)
    # every metric's protocol names the knobs off the reference, the retrieval query among them
    assert record["method_deviations"]["retrieval_query"] == "'prompt' (reference: 'forward_input')"
    assert record["metric_protocols"] and all("retrieval_query='prompt'" in p for p in record["metric_protocols"].values())


def test_state_round_trip_restores_the_knowledge_base(trained, lm, task, tmp_path):
    trained.reset()
    trained.inject([task.knowledge(e) for e in task.edits[:2]])
    assert trained.save_state(tmp_path) is True
    fresh = Recipe(lm, checkpoint=None, cache=False, **FAST)
    fresh.module.load_state_dict(trained.module.state_dict())  # what prepare() restores from the cache
    fresh.trained = True
    fresh.load_state(tmp_path)
    queries = [UNRELATED, *edit_queries(task, 1)]
    assert fresh.ids == trained.ids and torch.equal(fresh.prompts, trained.prompts)
    assert [a.text for a in fresh.answer(queries, SPEC)] == [a.text for a in trained.answer(queries, SPEC)]


def test_the_two_retrieval_queries_retrieve_differently(lm):
    """The reference's hook retrieves on the whole forward input (teacher-forced: prompt + target without
    its last token), `prompt` on the prompt alone. With the query head made the knowledge head and cosine
    similarity, retrieval ranks by the encoder's own similarity, so each mode finds the stored statement
    identical to what it reads: one store entry is the prompt, the other the teacher-forced input."""
    prompt = "Question: Which river flows through Velmora?\nAnswer:"
    target = " the Silver Brook of the northern hills"
    teacher_forced = lm.decode(lm.prompt_ids(prompt) + lm.encode(target)[:-1])
    assert teacher_forced.startswith(prompt.split("\n")[0]) and "Silver Brook" in teacher_forced
    store = [Knowledge(id="as_prompt", context=prompt), Knowledge(id="as_input", context=teacher_forced)]
    query = [Query(id="q", prompt=prompt)]
    got = {}
    for mode in ("prompt", "forward_input"):
        method = Recipe(lm, cache=False, retrieval_query=mode, similarity="cosine", rep_dim=64,
                        sentinel="feature_vector", head_init="shared_projection", train_encoder=False)
        method.module.query_head.load_state_dict(method.module.knowledge_head.state_dict())
        method.trained = True
        method.inject(store)
        (scored,) = method.loglikelihood(query, [target])
        (generated,) = method.answer(query, SPEC)
        got[mode] = (scored.meta["retrieved_knowledge_ids"], generated.meta["retrieved_knowledge_ids"])
        assert method.info()["retrieval_query"] == mode
    assert got["prompt"] == (["as_prompt"], ["as_prompt"])
    # scoring reads the target too; generation's forward input is the prompt, as in the reference
    assert got["forward_input"] == (["as_input"], ["as_prompt"])


@pytest.mark.parametrize("edit_gradients", ["all", "prompt_generator"])
def test_edit_loss_gradients_reach_the_encoder_as_in_the_reference(lm, task, edit_gradients):
    edits = training_edits(task.training_knowledge())[:4]
    method = Recipe(lm, cache=False, rep_dim=64, train_encoder=True, edit_gradients=edit_gradients)
    data = _TrainingData(edits, method.features, random.Random(0), cached=False)
    params = method.trained_parameters(retrieval_only=False)
    assert {id(p) for p in method.encoder.parameters()} <= {id(p) for p in params}
    method.module.requires_grad_(True)
    method.encoder.requires_grad_(True)
    keys = method.module.knowledge(data.text_features([e.statement for e in edits]))
    parts = method.edit_losses(edits, keys, data)
    assert float(parts["reliability"].detach()) > 0  # untrained prompts: the targets are not won yet
    sum(parts.values()).backward()

    def reached(module: torch.nn.Module) -> bool:
        return any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters())

    assert reached(method.module.prompt_out)
    assert reached(method.module.knowledge_head) == reached(method.encoder) == (edit_gradients == "all")
    assert not reached(method.module.query_head)  # the edit losses never see a query


def test_reference_training_moves_the_encoder_and_saves_its_curves(lm, task, tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    method = Recipe(lm, rep_dim=64, epochs=1, retrieval_epochs=1, lr=1e-4)
    before = {n: t.clone() for n, t in method.encoder.state_dict().items()}
    method.prepare(task.training_knowledge()[:16])
    after = method.encoder.state_dict()
    assert any(not torch.equal(before[n], after[n]) for n in before)
    info = method.info()["prepare"]
    assert [(e["phase"], e["epoch"]) for e in info["epochs"]] == [("retrieval", 0), ("retrieval", 1), ("joint", 0), ("joint", 1)]
    assert all(0 <= e["retrieval_prompt"] <= 1 and 0 <= e["sentinel_rejection"] <= 1 for e in info["epochs"])
    png = tmp_path / "recipe" / (method.identity(training_edits(task.training_knowledge()[:16])) + ".png")
    assert info["curves"] == str(png) and png.stat().st_size > 1000
    steps = json.loads(png.with_suffix(".json").read_text())["steps"]
    assert len(steps) == 4 and {"reliability", "batch_retrieval", "batch_rejection"} <= set(steps[-1])
    # the fine-tuned encoder is part of the saved module: a cached load restores it
    again = Recipe(lm, rep_dim=64, epochs=1, retrieval_epochs=1, lr=1e-4)
    again.prepare(task.training_knowledge()[:16])
    assert again.info()["prepare"]["source"] == "cache"
    assert all(torch.equal(after[n], t) for n, t in again.encoder.state_dict().items())
    assert again.extra_storage_bytes() > sum(t.numel() * 4 for t in after.values())


def test_deviations_from_the_reference_are_listed(lm):
    cfg = OmegaConf.to_container(compose_config("model=tiny", "method=recipe").method, resolve=True)
    cfg.pop("_target_")
    default = Recipe(lm, **cfg)
    # the shipped defaults deviate only in the encoder and the CPU schedule
    assert set(default.reference_deviations()) == {"encoder", "lr", "epochs"}
    assert default.reference_deviations()["lr"] == "0.0001 (reference: 1e-05)"
    previous = Recipe(lm, **(cfg | PREVIOUS)).reference_deviations()
    assert previous["retrieval_query"] == "'prompt' (reference: 'forward_input')"
    assert previous["edit_gradients"] == "'prompt_generator' (reference: 'all')"
    assert set(PREVIOUS) - {"epochs"} <= set(previous)
    assert is_reference_encoder("/models/roberta-base/") and not is_reference_encoder("embedded:all-minilm-l6-v2")
    reference = OmegaConf.to_container(compose_config("model=tiny", "+experiment=reference_recipe").method, resolve=True)
    assert {k: reference[k] for k in Recipe.reference if k != "encoder"} == {
        k: v for k, v in Recipe.reference.items() if k != "encoder"}
