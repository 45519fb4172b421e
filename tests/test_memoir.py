"""MEMOIR sparse residual memory on hand-made activations and the tiny real model."""
import dataclasses
import json

import pytest
import torch

from core.types import EditSpec, GenerationSpec, KBenchError, Knowledge, Query
from methods.memoir import MemoirMethod, best_match, select_mask
from metrics.retrieval import retrieval_scores
from runners.experiment import Experiment
from tests.conftest import compose_config, read_record

EDIT = Knowledge(id="e0", context="Velmora founded Orvane",
                 edit=EditSpec(" Velmora founded", " Orvane glass"))
OTHER = Knowledge(id="e1", context="The copper clocks are old",
                  edit=EditSpec(" The copper clocks", " are old"))


LOCALITY = Knowledge(id="t0", context="c", edit=EditSpec(
    " Orvane glass comes from", " Velmora",
    locality_prompts=(" The copper clocks of the river", " A quiet town"), locality_answers=("ring", "sleeps")))
PREVIOUS = dict(augment_lengths=[], unrelated_in_batch=False, background_source="edit_prompts",
                weight_decay_scope="columns", include_start_tokens=False, stop_flat=None)


def memoir(lm, **knobs) -> MemoirMethod:
    settings = dict(layer=-1, iterations=8, lr=1.0, background_source="model", n_background=8, background_tokens=8) | knobs
    return MemoirMethod(lm, **settings)


@pytest.fixture(autouse=True)
def own_cache(tiny_lm, tmp_path, monkeypatch):
    """Augmentation prefixes are cached under $KBENCH_CACHE: each test gets its own (after the model is built)."""
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path / "cache"))


def test_mask_is_the_permuted_top_k_of_the_decentred_activation():
    features = torch.tensor([5.0, -2.0, 0.2, 3.0, 0.0])
    background = torch.ones(5)  # |f - 1| = [4, 3, 0.8, 2, 1] -> top-2 columns 0 and 1
    permutation = torch.tensor([3, 0, 4, 1, 2])  # column 0 -> 3, column 1 -> 0
    mask = select_mask(features, background, 2, permutation)
    assert mask.tolist() == [[True, False, False, True, False]]
    identity = select_mask(features, background, 3, torch.arange(5))
    assert identity.tolist() == [[True, True, False, True, False]]  # decentring matters: raw top-3 would be 0, 3, 1


def test_overlap_picks_the_best_stored_mask_as_a_fraction_of_k():
    stored = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0]], dtype=torch.bool)
    queries = torch.tensor([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 1], [1, 1, 0, 0, 0, 0]], dtype=torch.bool)
    index, overlap = best_match(queries, stored, k=3)
    # query 0 shares 1 column with edit 0 and 2 with edit 1; query 1 none (tie -> edit 0); query 2 is edit 0's mask
    assert index.tolist() == [1, 0, 0]
    assert overlap.tolist() == pytest.approx([2 / 3, 0.0, 2 / 3])


def test_memory_off_below_threshold_leaves_the_logits_exactly_unchanged(tiny_lm):
    ids = torch.tensor([tiny_lm.prompt_ids(" The river Orvane runs north")])
    with torch.no_grad():
        before = tiny_lm.model(ids).logits.clone()
    unrelated = Query(id="u", prompt=" The river Orvane runs north")
    base_score = MemoirMethod.loglikelihood(memoir(tiny_lm), [unrelated], [" again"])  # hook installed, nothing stored
    method = memoir(tiny_lm, threshold=1.0)  # only a prompt with exactly an edit's mask switches the memory on
    method.inject([EDIT])
    assert method.memory.weight.abs().sum() > 0
    assert method.route([unrelated])[0][0] is None
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(ids).logits, before)  # the hook adds nothing while the memory is off
    after = method.loglikelihood([unrelated], [" again"])[0]
    assert after.logprob == base_score[0].logprob and after.predicted_ids == base_score[0].predicted_ids
    edited = method.loglikelihood([Query(id="e", prompt=EDIT.edit.prompt)], [EDIT.edit.target])[0]
    assert method.route([Query(id="e", prompt=EDIT.edit.prompt)])[0] == (0, 1.0)
    assert edited.logprob > MemoirMethod.loglikelihood(memoir(tiny_lm), [Query(id="e", prompt=EDIT.edit.prompt)],
                                               [EDIT.edit.target])[0].logprob


def test_a_batch_mixes_routed_and_unrouted_rows_exactly_as_one_by_one(tiny_lm):
    method = memoir(tiny_lm, threshold=1.0)
    method.inject([EDIT, OTHER])
    queries = [Query(id="a", prompt=EDIT.edit.prompt), Query(id="u", prompt=" The river Orvane runs north"),
               Query(id="b", prompt=OTHER.edit.prompt)]
    targets = [EDIT.edit.target, " again", OTHER.edit.target]
    assert [edit for edit, _ in method.route(queries)] == [0, None, 1]
    together = method.loglikelihood(queries, targets)
    alone = [method.loglikelihood([q], [t])[0] for q, t in zip(queries, targets)]
    assert [s.logprob for s in together] == pytest.approx([s.logprob for s in alone], abs=1e-4)
    assert [s.predicted_ids for s in together] == [s.predicted_ids for s in alone]
    spec = GenerationSpec(max_new_tokens=3, stop=())
    assert [a.text for a in method.answer(queries, spec)] == [method.answer([q], spec)[0].text for q in queries]
    answers = method.answer(queries, spec)
    assert [a.meta["retrieved_knowledge_ids"] for a in answers] == [["e0"], [], ["e1"]]
    # the routed edit counts as a retrieval; records written before (meta "memoir_edit") rescore without one
    assert retrieval_scores(answers[0].meta, "e0") == {"retrieval_recall@1": 1.0}
    assert retrieval_scores(answers[1].meta, "e0") == {"retrieval_recall@1": 0.0}
    assert retrieval_scores({"memoir_edit": "e0", "overlap": 1.0}, "e0") == {}


def test_an_edit_trains_only_its_mask_columns_and_lowers_its_loss(tiny_lm):
    method = memoir(tiny_lm, weight_decay_scope="columns")
    method.inject([EDIT])
    first = method.memory.weight.clone()
    mask0 = method.masks[0]
    assert mask0.sum() == method.k == round(0.2857 * method.dim)
    assert torch.all(first[:, ~mask0] == 0) and first[:, mask0].abs().sum() > 0
    first_loss, last_loss, _ = method.edit_losses[0]
    assert last_loss < first_loss
    method.inject([OTHER])
    mask1 = method.masks[1]
    untouched = ~mask1
    assert torch.equal(method.memory.weight[:, untouched], first[:, untouched])  # minimal overwrite
    assert method.edit_ids == ["e0", "e1"]
    expected = method.memory.weight.numel() * 4 + 2 * method.dim + method.dim * 8 + method.dim * 4
    assert method.extra_storage_bytes() == expected


@pytest.mark.parametrize("scope", ["memory", "columns"])
def test_weight_decay_reaches_the_whole_memory_like_the_reference_sgd(tiny_lm, scope):
    # stop_loss=0: no early stop, so every iteration is one SGD step
    method = memoir(tiny_lm, weight_decay=0.01, weight_decay_scope=scope, stop_loss=0.0, iterations=4, augment_lengths=[])
    method.inject([EDIT])
    first = method.memory.weight.clone()
    method.inject([OTHER])
    untouched = ~method.masks[1]
    assert first[:, untouched].abs().sum() > 0  # the first edit's columns outside the second's mask
    factor = (1.0 - 1.0 * 0.01) ** 4 if scope == "memory" else 1.0  # the reference: W <- W - lr * wd * W each step
    assert torch.allclose(method.memory.weight[:, untouched], first[:, untouched] * factor, rtol=1e-6, atol=0)


def test_the_training_batch_is_the_edit_its_augmented_prefixes_and_one_unrelated_text(tiny_lm, tmp_path):
    method = memoir(tiny_lm)
    method.prepare([])
    prefixes = method.augment_prefixes()
    assert len(prefixes) == 10  # [[5, 5], [10, 5]]: one continuation of each of 5 start words, per length
    starts = ["I", "You", "Because", "Yes", "Q:"]  # the decoded text keeps its start word, as the reference's
    assert all(p.startswith(w) for p, w in zip(prefixes, starts * 2))
    for short, long in zip(prefixes[:5], prefixes[5:]):  # 5 then 10 new tokens after the start word
        assert len(tiny_lm.encode(short)) <= len(tiny_lm.encode(long)) <= len(tiny_lm.encode(short)) + 6
    rows, n_loss = method.training_rows(EDIT.edit.prompt, EDIT.edit.target, position=3)
    target = tiny_lm.encode(EDIT.edit.target + "\n")
    assert len(rows) == 12 and n_loss == 11
    assert rows[0] == (tiny_lm.prompt_ids(EDIT.edit.prompt), target)
    assert rows[1:11] == [(tiny_lm.prompt_ids(f"{p} {EDIT.edit.prompt}"), target) for p in prefixes]
    unrelated = method.text_ids(method.unrelated_texts[3 % len(method.unrelated_texts)])
    assert rows[11][0] + rows[11][1] == unrelated
    # cached on disk and read back by the next method, which generates nothing
    cached = list((tmp_path / "cache" / "memoir").glob("prefixes-*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text()) == prefixes
    again = memoir(tiny_lm)
    again.lm.model.generate = lambda *a, **k: pytest.fail("the cached prefixes must be read, not generated")
    assert again.augment_prefixes() == prefixes
    del again.lm.model.generate
    bare, n_bare = memoir(tiny_lm, augment_lengths=[], unrelated_in_batch=False).training_rows(
        EDIT.edit.prompt, EDIT.edit.target, 0)
    assert (len(bare), n_bare) == (1, 1)  # the previous behaviour: the bare prompt alone


def test_the_unrelated_row_carries_no_loss(tiny_lm):
    weights = []
    for unrelated in (True, False):
        method = memoir(tiny_lm, unrelated_in_batch=unrelated, iterations=3)
        method.prepare([])
        method.inject([EDIT])
        weights.append(method.memory.weight.clone())
        assert method.info()["training_batch_rows"] == (12 if unrelated else 11)
    assert torch.allclose(weights[0], weights[1], atol=1e-5)


def test_stop_rule_is_the_reference_early_stop_meter(tiny_lm):
    method = memoir(tiny_lm)  # stop_loss 0.02, stop_flat 1e-4: the previous loss low and flat
    assert not method._stop([0.5, 0.01])
    assert not method._stop([0.5, 0.01, 0.001])  # previous 0.01 but 0.49 below the one before
    assert method._stop([0.01, 0.01005, 0.3])  # decided on the previous two, whatever the current
    assert not method._stop([0.03, 0.03, 0.0])
    previous = memoir(tiny_lm, stop_flat=None)
    assert previous._stop([0.5, 0.01]) and not previous._stop([0.01, 0.5])


def test_reset_forgets_every_edit(tiny_lm):
    method = memoir(tiny_lm, threshold=0.0)
    query = Query(id="q", prompt=EDIT.edit.prompt)
    before = method.loglikelihood([query], [EDIT.edit.target])[0].logprob
    method.inject([EDIT])
    assert method.loglikelihood([query], [EDIT.edit.target])[0].logprob != before
    method.reset()
    assert method.memory.weight.abs().sum() == 0 and len(method.masks) == 0
    assert method.loglikelihood([query], [EDIT.edit.target])[0].logprob == before
    answers = method.answer([query], GenerationSpec(max_new_tokens=2, stop=()))
    assert answers[0].meta == {"retrieved_knowledge_ids": [], "overlap": 0.0}


def test_qa_sentences_become_prompt_target_pairs_and_bad_knowledge_is_refused(tiny_lm):
    method = memoir(tiny_lm)
    qa = Knowledge(id="k", context="ctx", train_sentences=("Question: Who founded Velmora?\nAnswer: Ada Quill\n",))
    assert method.edit_pairs(qa) == [("Question: Who founded Velmora?\nAnswer:", " Ada Quill")]
    with pytest.raises(KBenchError, match="no answer after"):
        method.edit_pairs(Knowledge(id="k", context="ctx", train_sentences=("Velmora is old.\n",)))
    with pytest.raises(KBenchError, match="neither a structured edit"):
        method.edit_pairs(Knowledge(id="k", context="ctx"))
    with pytest.raises(ValueError, match="out of range"):
        memoir(tiny_lm, layer=7)
    with pytest.raises(KBenchError, match="needs a task with a training split"):
        memoir(tiny_lm, background_source="edit_prompts").prepare([])


def test_background_mean_comes_from_unrelated_locality_texts_not_edit_prompts(tiny_lm):
    method = memoir(tiny_lm, background_source="auto", n_background=3)
    method.prepare([LOCALITY, EDIT, LOCALITY])
    texts = [" The copper clocks of the river ring", " A quiet town sleeps", " The copper clocks of the river ring"]
    assert method.background_source == "locality" and method.background_used == "locality (3 texts)"
    assert method.unrelated_texts == texts
    bos = tiny_lm.start_ids
    expected = method.features_of([bos + tiny_lm.encode(t) for t in texts]).mean(0)
    assert torch.allclose(method.background_mean, expected)
    edit_prompts = method.prompt_features([LOCALITY.edit.prompt, EDIT.edit.prompt]).mean(0)
    assert not torch.allclose(method.background_mean, edit_prompts, atol=1e-3)
    previous = memoir(tiny_lm, background_source="edit_prompts")
    previous.prepare([LOCALITY, EDIT])
    assert torch.allclose(previous.background_mean, edit_prompts)
    with pytest.raises(KBenchError, match="carries locality prompts"):
        memoir(tiny_lm, background_source="locality").prepare([EDIT])


def test_background_from_general_text_is_detokenised_without_unk_sentences(tiny_lm, tmp_path):
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(" = Velmora = \n"
                    " The town of Velmora lies on the river , north of the old mill @-@ race . "
                    "Its mayor was <unk> for twelve long years in a row . "
                    "The copper clocks ( all of them ) ring every hour of the day .\n", encoding="utf-8")
    method = memoir(tiny_lm, background_source="auto", general_text=str(wiki))
    method.prepare([EDIT])  # no locality prompts: auto falls back to the general text
    assert method.background_source == "general_text"
    assert sorted(method.unrelated_texts) == sorted([
        "The town of Velmora lies on the river, north of the old mill-race.",
        "The copper clocks (all of them) ring every hour of the day."])
    with pytest.raises(KBenchError, match="no text read"):
        memoir(tiny_lm, background_source="general_text", general_text=str(tmp_path / "missing.txt")).prepare([])


def test_prompt_mean_includes_the_start_token_like_the_reference(tiny_lm):
    ids = tiny_lm.prompt_ids(EDIT.edit.prompt)
    assert tiny_lm.start_ids and ids[0] == tiny_lm.start_ids[0]
    assert memoir(tiny_lm)._feature_ids(ids) == ([], ids)
    assert memoir(tiny_lm, include_start_tokens=False)._feature_ids(ids) == (ids[:1], ids[1:])
    with_bos = memoir(tiny_lm).features_of([ids])
    without = memoir(tiny_lm, include_start_tokens=False).features_of([ids])
    assert not torch.allclose(with_bos, without)


def test_knobs_off_the_reference_are_named_deviations(tiny_lm):
    faithful = MemoirMethod(tiny_lm, layer=-1)
    faithful.prepare([LOCALITY])
    # layer: an index instead of the reference's fraction; target_suffix: kept on principle (generations stop)
    assert set(faithful.reference_deviations()) == {"layer", "target_suffix"}
    assert faithful.reference_deviations()["target_suffix"] == "'\\n' (reference: '')"
    previous = MemoirMethod(tiny_lm, layer=0.84, target_suffix="", **PREVIOUS)
    previous.prepare([LOCALITY])
    assert set(previous.reference_deviations()) == set(PREVIOUS)
    fallback = MemoirMethod(tiny_lm, layer=0.84, target_suffix="", background_source="auto", n_background=4, general_text=None)
    fallback.prepare([])  # no locality prompts, no general text: the model's own samples, named
    assert fallback.reference_deviations() == {"background_source": "'model' (reference: 'locality')",
                                               "n_background": "4 (reference: 100)"}


@pytest.mark.parametrize("task", ["editing", "synthetic"])
def test_memoir_runs_end_to_end_on_the_tiny_model(tmp_path, task):
    overrides = ["model=tiny", "logger=none", "method=memoir", f"task={task}", "method.layer=-1", "method.iterations=2",
                 "method.n_background=4", "method.background_tokens=4"]
    overrides += ["task.n_edits=2", "task.n_train=4", "task.max_new_tokens=3"] if task == "editing" else \
                 ["task.n_contexts=1", "task.facts_per_context=1", "task.max_new_tokens=3", "method.background_source=model"]
    Experiment(compose_config(*overrides), tmp_path, names={"method": "memoir", "task": task, "model": "tiny"}).run()
    record = read_record(tmp_path)
    assert record["status"] == "done"
    info = record["method_info"]
    assert info["edits_stored"] == (2 if task == "editing" else 3)  # synthetic: one edit per QA sentence
    assert info["background"].startswith("locality" if task == "editing" else "model")
    assert info["training_batch_rows"] == 12
    assert record["extra_storage_bytes"] > 0
    deviations = record["method_deviations"]
    assert {"layer", "iterations", "target_suffix"} <= set(deviations) and "augment_lengths" not in deviations
    assert all("iterations=2 (reference: 30)" in p for p in record["metric_protocols"].values())
    report = info["report"]
    assert (tmp_path / "memoir_overlap.png").stat().st_size > 0 and set(report["files"]) == {"memoir_overlap.png",
                                                                                           "memoir_overlap.json"}
    kinds = {"edit", "rephrase", "locality"} if task == "editing" else {"edit"}
    assert set(report["overlap"]) == kinds and report["overlap"]["edit"]["routed_on"] == 1.0
    values = json.loads((tmp_path / "memoir_overlap.json").read_text())["overlaps"]
    assert len(values["edit"]) == info["edits_stored"] and all(v == 1.0 for v in values["edit"])


def test_threshold_calibration_on_the_held_out_split_routes_its_locality_prompts_off(tiny_lm):
    from tasks.editing import EditingTask

    held_out = EditingTask(n_edits=3, n_train=12, general_questions=[["What is the capital of France?", "Paris"]])
    training = held_out.training_knowledge()
    method = memoir(tiny_lm, background_source="locality", calibrate_threshold=0.75)
    method.prepare(training)
    stored = method.masks_of([k.edit.prompt for k in training])
    _, best = best_match(method.masks_of([p for k in training for p in k.edit.locality_prompts]), stored, method.k)
    assert (best < method.threshold).float().mean() >= 0.75
    assert (best < max(v for v in best.tolist() if v < method.threshold)).float().mean() < 0.75  # the lowest such
    assert method.info()["threshold_source"].startswith("calibrated")
    with pytest.raises(KBenchError, match="needs held-out edits with locality prompts"):
        memoir(tiny_lm, background_source="model", calibrate_threshold=0.9).prepare([EDIT])


def test_report_overlaps_match_the_routing_of_each_kind_of_prompt(tiny_lm, tmp_path):
    method = memoir(tiny_lm, iterations=2, augment_lengths=[])
    edit = Knowledge(id="e0", context="c", edit=dataclasses.replace(
        EDIT.edit, rephrase_prompts=(" Velmora was founded by",), locality_prompts=(" The river runs north",),
        locality_answers=(" again",)))
    method.inject([edit, OTHER])
    routed = method.route([Query(id="r", prompt=" Velmora was founded by")])[0][1]  # cached for the report
    fresh = memoir(tiny_lm, iterations=2, augment_lengths=[])
    fresh.inject([edit, OTHER])  # the same edits, nothing routed: the report computes every overlap itself
    for m in (method, fresh):
        values = m.overlaps()
        assert values["edit"] == [1.0, 1.0] and values["rephrase"] == [pytest.approx(routed, abs=1e-4)]
        assert len(values["locality"]) == 1
    summary = fresh.report(tmp_path)
    assert summary["overlap"]["edit"] == {"n": 2, "mean": 1.0, "routed_on": 1.0}
    assert (tmp_path / "memoir_overlap.png").stat().st_size > 0
    assert memoir(tiny_lm).report(tmp_path / "empty") == {}  # nothing stored: nothing written
