"""MEMOIR-style sparse residual memory on hand-made activations and the tiny real model."""
import pytest
import torch

from core.types import GenerationSpec, KBenchError, Knowledge, Query
from methods.memoir import MemoirMethod, best_match, select_mask
from runners.experiment import Experiment
from tests.conftest import compose_config, read_record

EDIT = Knowledge(id="e0", context="Velmora founded Orvane",
                 meta={"prompt": " Velmora founded", "target": " Orvane glass"})
OTHER = Knowledge(id="e1", context="The copper clocks are old",
                  meta={"prompt": " The copper clocks", "target": " are old"})


def memoir(lm, **knobs) -> MemoirMethod:
    settings = dict(layer=-1, iterations=8, lr=1.0, background_source="model", n_background=8, background_tokens=8) | knobs
    return MemoirMethod(lm, **settings)


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
    base_score = MemoirMethod.score(memoir(tiny_lm), [unrelated], [" again"])  # hook installed, nothing stored
    method = memoir(tiny_lm, threshold=1.0)  # only a prompt with exactly an edit's mask switches the memory on
    method.inject([EDIT])
    assert method.memory.weight.abs().sum() > 0
    assert method.route([unrelated])[0][0] is None
    with torch.no_grad():
        assert torch.equal(tiny_lm.model(ids).logits, before)  # the hook adds nothing while the memory is off
    after = method.score([unrelated], [" again"])[0]
    assert after.logprob == base_score[0].logprob and after.predicted_ids == base_score[0].predicted_ids
    edited = method.score([Query(id="e", prompt=EDIT.meta["prompt"])], [EDIT.meta["target"]])[0]
    assert method.route([Query(id="e", prompt=EDIT.meta["prompt"])])[0] == (0, 1.0)
    assert edited.logprob > MemoirMethod.score(memoir(tiny_lm), [Query(id="e", prompt=EDIT.meta["prompt"])],
                                               [EDIT.meta["target"]])[0].logprob


def test_a_batch_mixes_routed_and_unrouted_rows_exactly_as_one_by_one(tiny_lm):
    method = memoir(tiny_lm, threshold=1.0)
    method.inject([EDIT, OTHER])
    queries = [Query(id="a", prompt=EDIT.meta["prompt"]), Query(id="u", prompt=" The river Orvane runs north"),
               Query(id="b", prompt=OTHER.meta["prompt"])]
    targets = [EDIT.meta["target"], " again", OTHER.meta["target"]]
    assert [edit for edit, _ in method.route(queries)] == [0, None, 1]
    together = method.score(queries, targets)
    alone = [method.score([q], [t])[0] for q, t in zip(queries, targets)]
    assert [s.logprob for s in together] == pytest.approx([s.logprob for s in alone], abs=1e-4)
    assert [s.predicted_ids for s in together] == [s.predicted_ids for s in alone]
    spec = GenerationSpec(max_new_tokens=3, stop=())
    assert [a.text for a in method.answer(queries, spec)] == [method.answer([q], spec)[0].text for q in queries]
    assert [a.meta["memoir_edit"] for a in method.answer(queries, spec)] == ["e0", None, "e1"]


def test_an_edit_trains_only_its_mask_columns_and_lowers_its_loss(tiny_lm):
    method = memoir(tiny_lm)
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


def test_reset_forgets_every_edit(tiny_lm):
    method = memoir(tiny_lm, threshold=0.0)
    query = Query(id="q", prompt=EDIT.meta["prompt"])
    before = method.score([query], [EDIT.meta["target"]])[0].logprob
    method.inject([EDIT])
    assert method.score([query], [EDIT.meta["target"]])[0].logprob != before
    method.reset()
    assert method.memory.weight.abs().sum() == 0 and len(method.masks) == 0
    assert method.score([query], [EDIT.meta["target"]])[0].logprob == before
    answers = method.answer([query], GenerationSpec(max_new_tokens=2, stop=()))
    assert answers[0].meta == {"memoir_edit": None, "overlap": 0.0}


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
        memoir(tiny_lm, background_source="training").prepare([])


def test_background_from_the_training_split(tiny_lm):
    method = memoir(tiny_lm, background_source="auto", n_background=2)
    method.prepare([EDIT, OTHER, EDIT])
    assert method.background_used == "training (2 prompts)"
    expected = method.prompt_features([EDIT.meta["prompt"], OTHER.meta["prompt"]]).mean(0)
    assert torch.allclose(method.background_mean, expected)


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
    assert info["background"].startswith("training" if task == "editing" else "model")
    assert record["extra_storage_bytes"] > 0


def test_threshold_calibration_on_the_held_out_split_routes_its_locality_prompts_off(tiny_lm):
    from tasks.editing import EditingTask

    held_out = EditingTask(n_edits=3, n_train=12, general_questions=[["What is the capital of France?", "Paris"]])
    training = held_out.training_knowledge()
    method = memoir(tiny_lm, background_source="training", calibrate_threshold=0.75)
    method.prepare(training)
    stored = method.masks_of([k.meta["prompt"] for k in training])
    _, best = best_match(method.masks_of([p for k in training for p in k.meta["locality_prompts"]]), stored, method.k)
    assert (best < method.threshold).float().mean() >= 0.75
    assert (best < max(v for v in best.tolist() if v < method.threshold)).float().mean() < 0.75  # the lowest such
    assert method.info()["threshold_source"].startswith("calibrated")
    with pytest.raises(KBenchError, match="needs held-out edits with locality prompts"):
        memoir(tiny_lm, background_source="training", calibrate_threshold=0.9).prepare([EDIT])
