"""The editing task: loaders on small files, metric definitions on hand-computed cases, protocols, a tiny run."""
import json
import logging
from pathlib import Path

import pytest

from core.types import Answer, DataError, KBenchError, TargetScore
from metrics.editing import generated_scores, locality_agreement, macro_average
from runners.experiment import Experiment
from runners.results import score_probe_set
from tasks.base import ProbeResult
from tasks.edit_data import generate_synthetic_edits, load_counterfact, load_zsre
from tasks.editing import PRE_EDIT, PRE_EDIT_GEN, EditingTask
from tests.conftest import compose_config, read_record

ZSRE = [
    {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "pred": "Trinity College",
     "rephrase": "What university did Watts Humphrey take part in?", "alt": "University of Michigan",
     "answers": ["Illinois Institute of Technology"], "loc": "nq question: who played desmond doss father in hacksaw ridge",
     "loc_ans": "Hugo Weaving", "cond": "Trinity College >> University of Michigan || What university did Watts Humphrey attend?"},
    {"subject": "Ramalinaceae", "src": "Which family does Ramalinaceae belong to?", "pred": "Lecanorales",
     "rephrase": "What family are Ramalinaceae?", "alt": "", "answers": ["Lecanorales"],
     "loc": "nq question: types of skiing in the winter olympics 2018", "loc_ans": "Downhill", "cond": ""},
]
COUNTERFACT = [
    {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
     "subject": "Danielle Darrieux", "ground_truth": "French",
     "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
     "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"},
    {"case_id": 7, "prompt": "Toko Yasuda, the", "target_new": "piano", "subject": "Toko Yasuda",
     "ground_truth": "guitar", "rephrase_prompt": ["Toko Yasuda is incredible at", "Toko Yasuda plays the"],
     "locality_prompt": "John Lennon performs on the", "locality_ground_truth": "guitar"},
]


def write_json(path: Path, rows, lines: bool = False) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if lines else json.dumps(rows, indent=1))
    return path


# ---------------------------------------------------------------------- loaders
@pytest.mark.parametrize("lines", [False, True])
def test_zsre_loader_maps_the_easyedit_fields_and_skips_empty_targets(tmp_path, lines):
    edits, dropped = load_zsre(write_json(tmp_path / "zsre.json", ZSRE, lines=lines))
    assert dropped["empty_target"] == 1 and len(edits) == 1
    edit = edits[0]
    assert edit.prompt == "What university did Watts Humphrey attend?" and edit.target_new == "University of Michigan"
    assert edit.rephrase_prompts == ("What university did Watts Humphrey take part in?",)
    assert edit.locality_prompts == ("nq question: who played desmond doss father in hacksaw ridge",)
    assert edit.locality_answers == ("Hugo Weaving",) and edit.locality_kinds == ("nq",)
    assert edit.subject == "Watts Humphrey" and edit.ground_truth == "Illinois Institute of Technology"


def test_counterfact_loader_accepts_string_or_list_fields(tmp_path):
    edits, dropped = load_counterfact(write_json(tmp_path / "cf.json", COUNTERFACT))
    assert not any(dropped.values()) and [e.id for e in edits] == ["cf-0", "cf-7"]
    assert edits[0].rephrase_prompts == ("Where Danielle Darrieux is from, people speak the language of",)
    assert edits[1].rephrase_prompts == ("Toko Yasuda is incredible at", "Toko Yasuda plays the")
    assert edits[1].locality_answers == ("guitar",) and edits[1].ground_truth == "guitar"


def test_loaders_name_the_broken_record(tmp_path):
    broken = [dict(COUNTERFACT[0]), {k: v for k, v in COUNTERFACT[1].items() if k != "locality_prompt"}]
    with pytest.raises(DataError, match=r"cf.json:\d+: missing field\(s\) \['locality_prompt'\]"):
        load_counterfact(write_json(tmp_path / "cf.json", broken))
    with pytest.raises(DataError, match=r"line 2|:2:"):
        load_zsre(write_json(tmp_path / "z.jsonl", [ZSRE[0], {"src": "x"}], lines=True))
    mismatched = [dict(COUNTERFACT[0], locality_prompt=["a", "b"], locality_ground_truth="c")]
    with pytest.raises(DataError, match="2 locality prompt"):
        load_counterfact(write_json(tmp_path / "m.json", mismatched))
    with pytest.raises(DataError, match="data file not found"):
        load_zsre(tmp_path / "missing.json")


def test_task_renders_edits_as_knowledge_with_the_documented_contract(tmp_path):
    path = write_json(tmp_path / "cf.json", COUNTERFACT)
    task = EditingTask(source="counterfact", path=str(path), n_edits=2, n_train=0)
    knowledge = task.knowledge(task.edits[0])
    assert knowledge.context == "The mother tongue of Danielle Darrieux is English"
    assert knowledge.train_sentences == ("The mother tongue of Danielle Darrieux is English\n",)
    assert knowledge.edit.prompt == "The mother tongue of Danielle Darrieux is"
    assert knowledge.edit.target == " English" and knowledge.edit.target_new == "English"
    assert knowledge.edit.separator == " " and knowledge.edit.subject == "Danielle Darrieux"
    assert knowledge.edit.locality_prompts == ("Michel Rocard is a native speaker of",)
    assert knowledge.edit.locality_answers == ("French",) and knowledge.edit.ground_truth == "French"
    assert task.training_knowledge() == []


def test_training_split_drops_edits_that_share_a_prompt_with_evaluated_ones(tmp_path):
    path = write_json(tmp_path / "cf.json", COUNTERFACT)
    train = write_json(tmp_path / "train.json", [dict(COUNTERFACT[0], case_id=99), dict(COUNTERFACT[1], case_id=5,
                                                                                       prompt="Toko Yasuda plays")])
    task = EditingTask(source="counterfact", path=str(path), train_path=str(train), n_edits=1, n_train=10)
    assert [k.id for k in task.training_knowledge()] == ["cf-5"]
    assert task.describe()["dropped"]["train_overlapping_eval"] == 1


def test_synthetic_edits_are_seeded_and_their_locality_asks_the_same_relation_of_another_entity():
    general = [["What is the capital of France?", "Paris"]]
    first = generate_synthetic_edits(7, seed=3, question_template="Q: {question}\nA:", general_questions=general)
    assert first == generate_synthetic_edits(7, seed=3, question_template="Q: {question}\nA:", general_questions=general)
    for edit in first:
        assert edit.prompt.startswith("Q: ") and edit.subject in edit.prompt
        assert len(edit.rephrase_prompts) == 3 and all(edit.subject in r for r in edit.rephrase_prompts)
        assert edit.locality_kinds == ("same_relation", "general")
        neighbour = edit.locality_prompts[0]
        assert edit.subject not in neighbour
        assert edit.locality_prompts[1] == "Q: What is the capital of France?\nA:"
    task = EditingTask(n_edits=10, n_train=20, general_questions=general)
    eval_subjects = {e.subject for e in task.edits}
    assert len(task.train_edits) == 20 and not eval_subjects & {e.subject for e in task.train_edits}


# ---------------------------------------------------------------------- metrics, hand-computed
def test_metric_definitions_on_hand_computed_cases():
    assert locality_agreement([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match="different target lengths"):
        locality_agreement([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="predicted_ids"):
        locality_agreement([], [1])
    assert generated_scores("Paris.", "Paris") == {"em": 1.0, "f1": 1.0}
    # "the city of Paris" -> "city of paris": precision 1/3, recall 1 -> F1 0.5
    assert generated_scores("the city of Paris", "Paris") == {"em": 0.0, "f1": 0.5}
    # every edit weighs the same: (mean(1, 0) + 1) / 2, not the micro mean 2/3
    assert macro_average({"a": [1.0, 0.0], "b": [1.0]}) == 0.75


def _fake_outputs(probe_set, ids_by_probe, accuracy=0.5):
    if probe_set.output_type == "generate":
        return [Answer(p.answers[0]) for p in probe_set.probes]
    return [TargetScore(-1.0, 3, accuracy, ids_by_probe(p)) for p in probe_set.probes]


def test_locality_compares_post_edit_with_pre_edit_argmax_tokens(tmp_path):
    task = EditingTask(source="counterfact", path=str(write_json(tmp_path / "cf.json", COUNTERFACT)), n_edits=2, n_train=0)
    steps = task.steps()
    final = {s.name: s for s in steps[-1].probe_sets}
    with pytest.raises(KBenchError, match="pre-edit step must run first"):
        task.process_results(final["after_all/locality"], _fake_outputs(final["after_all/locality"], lambda p: (5, 6, 7)))
    pre = steps[0].probe_sets[0]
    assert pre.name == PRE_EDIT and all(p.query.context == "" for p in pre.probes)
    pre_results = score_probe_set(task, 0, pre, _fake_outputs(pre, lambda p: (5, 6, 7), accuracy=1 / 3))
    assert [r.metrics for r in pre_results] == [{"pre_edit/locality_answer_tf": 1 / 3}] * 2
    post = _fake_outputs(final["after_all/locality"], lambda p: (5, 0, 7) if p.knowledge_id == "cf-0" else (5, 6, 7))
    # no state: the reference is read from the earlier results passed in, every time
    for _ in range(2):
        assert [s["after_all/locality"] for s in task.process_results(final["after_all/locality"], post, pre_results)] == [2 / 3, 1.0]
    with pytest.raises(KBenchError, match="pre-edit step must run first"):
        task.process_results(final["after_all/locality"], post)
    with pytest.raises(KBenchError, match="returned no predicted_ids"):
        task.process_results(final["after_all/locality"], [TargetScore(-1.0, 3, 1.0)] * 2, pre_results)
    with pytest.raises(KBenchError, match="returned no predicted_ids"):
        task.process_results(pre, [TargetScore(-1.0, 3, 1.0)] * 2)
    scored = task.process_results(final["after_all/reliability_gen"], [Answer("English"), Answer("the piano player")])
    # "the piano player" -> "piano player": precision 1/2, recall 1 -> F1 2/3
    assert scored == [{"after_all/reliability_em": 1.0, "after_all/reliability_f1": 1.0},
                      {"after_all/reliability_em": 0.0, "after_all/reliability_f1": pytest.approx(2 / 3)}]


def test_generated_locality_compares_post_edit_with_pre_edit_generations(tmp_path):
    task = EditingTask(source="counterfact", path=str(write_json(tmp_path / "cf.json", COUNTERFACT)), n_edits=2, n_train=0)
    steps = task.steps()
    pre = {s.name: s for s in steps[0].probe_sets}[PRE_EDIT_GEN]
    post = {s.name: s for s in steps[-1].probe_sets}["after_all/locality_gen"]
    assert [p.answers[0] for p in pre.probes] == ["French", "guitar"]  # raw answers: generations have no separator
    assert all(p.query.context == "" for p in pre.probes) and [p.query.id for p in pre.probes] == [p.query.id for p in post.probes]
    pre_results = score_probe_set(task, 0, pre, [Answer("French."), Answer("the bass")])
    assert [r.metrics for r in pre_results] == [{"pre_edit/locality_answer_em": 1.0}, {"pre_edit/locality_answer_em": 0.0}]
    with pytest.raises(KBenchError, match="pre-edit step must run first"):
        task.process_results(post, [Answer("French"), Answer("the bass")])
    # edit cf-0's locality answer unchanged (SQuAD-normalised), cf-7's changed although it is now right
    scored = task.process_results(post, [Answer("french"), Answer("guitar")], pre_results)
    assert scored == [{"after_all/locality_gen": 1.0}, {"after_all/locality_gen": 0.0}]
    assert "after_all/locality_gen" in task.metric_protocols() and "pre_edit/locality_answer_em" in task.metric_protocols()
    assert not any(s.name.endswith("locality_gen") for s in EditingTask(n_edits=1, n_train=0, generate=False).steps()[-1].probe_sets)


def test_sequential_protocol_scores_everything_after_the_last_edit_and_single_resets():
    sequential = EditingTask(n_edits=3, n_train=0, general_questions=[["Q?", "A"]]).steps()
    assert [s.label for s in sequential] == ["pre-edit", *[f"syn-edit0-{i}" for i in range(3)], "after all 3 edits"]
    assert all(not s.probe_sets and len(s.knowledge) == 1 and not s.reset_before for s in sequential[1:4])
    final = {s.name: len(s.probes) for s in sequential[-1].probe_sets}
    assert final == {"after_all/reliability_tf": 3, "after_all/generality_tf": 9, "after_all/locality": 6,
                     "after_all/reliability_gen": 3, "after_all/generality_gen": 9, "after_all/locality_gen": 6}
    assert [s.name for s in sequential[0].probe_sets] == [PRE_EDIT, PRE_EDIT_GEN]
    single = EditingTask(n_edits=3, n_train=0, protocol="single", generate=False, general_questions=[]).steps()
    assert len(single) == 4 and all(s.reset_before and len(s.knowledge) == 1 for s in single[1:])
    assert {s.name for s in single[2].probe_sets} == {"single/reliability_tf", "single/generality_tf", "single/locality"}
    assert all(p.knowledge_id == "syn-edit0-1" for s in single[2].probe_sets for p in s.probes)


def test_summary_is_a_macro_average_and_every_metric_has_a_protocol(tmp_path):
    task = EditingTask(n_edits=2, n_train=0, general_questions=[["Q?", "A"]])
    results = []
    final = task.steps()[-1]
    for probe_set in final.probe_sets:
        if probe_set.name.endswith("generality_tf"):  # edit 0: all right; edit 1: first rephrase right only
            hits = {p.query.id: float(p.knowledge_id.endswith("-0") or p.query.id.endswith("rephrase0"))
                    for p in probe_set.probes}
            results += [ProbeResult(final.index, probe_set.name, p, TargetScore(-1, 2, hits[p.query.id]),
                                    {probe_set.name: hits[p.query.id]}) for p in probe_set.probes]
    summary = task.summarize(results)
    assert summary["after_all/generality_tf"] == pytest.approx((1.0 + 1 / 3) / 2)
    assert set(task.metric_protocols()) >= {"after_all/reliability_tf", "after_all/locality_general",
                                           "after_all/generality_em", "pre_edit/locality_answer_tf"}
    report = task.report(results, tmp_path)
    assert report["n_edits"] == 2 and (tmp_path / "edits.csv").is_file()


def test_bad_config_values_are_refused():
    with pytest.raises(ValueError, match="task.source"):
        EditingTask(source="mquake")
    with pytest.raises(ValueError, match="needs task.path"):
        EditingTask(source="zsre")
    with pytest.raises(ValueError, match="train_seed must differ"):
        EditingTask(train_seed=0)
    with pytest.raises(ValueError, match="protocol"):
        EditingTask(protocol="batch")


# ---------------------------------------------------------------------- end to end on the tiny model
def test_base_method_keeps_locality_at_one_and_writes_the_record(tmp_path):
    cfg = compose_config("model=tiny", "logger=none", "method=base", "task=editing", "task.n_edits=3",
                         "task.max_new_tokens=4")
    Experiment(cfg, tmp_path, names={"method": "base", "task": "editing", "model": "tiny"}).run()
    record = read_record(tmp_path)
    assert record["status"] == "done"
    assert record["metrics"]["after_all/locality"] == 1.0  # an untouched model agrees with itself
    assert record["metrics"]["after_all/locality_gen"] == 1.0  # and greedy decoding repeats itself
    assert set(record["metric_protocols"]) == set(record["metrics"])
    assert len(record["steps"]) == 5 and record["task_report"]["n_edits"] == 3
    assert record["method_info"]["task"]["n_train_edits"] == 100


def test_the_real_counterfact_files_load_and_the_training_split_is_disjoint(shared_dir):
    folder = shared_dir / "data/counterfact"
    task = EditingTask(source="counterfact", path=str(folder / "counterfact-edit.json"),
                       train_path=str(folder / "counterfact-train.json"), n_edits=50, n_train=200)
    assert len(task.edits) == 50 and task.edits[0].target_new == "English"
    assert all(e.rephrase_prompts and e.locality_prompts for e in task.edits)
    train = task.training_knowledge()
    assert len(train) == 200 and not {k.edit.prompt for k in train} & {e.prompt for e in task.edits}


@pytest.mark.slow
def test_score_every_one_on_three_edits_gives_a_3x3_matrix_whose_last_row_is_the_after_all_scores(tmp_path, caplog):
    overrides = ("model=tiny", "logger=none", "method=ft_context", "method.epochs=1", "task=editing", "task.n_edits=3",
                 "task.max_new_tokens=4", "task.n_train=0")
    names = {"method": "ft_context", "task": "editing", "model": "tiny"}
    Experiment(compose_config(*overrides, "task.score_every=1"), tmp_path / "stream", names=names).run()
    with caplog.at_level(logging.INFO, logger="runners.experiment"):
        Experiment(compose_config(*overrides), tmp_path / "end", names=names).run()
    # the edits before the last are not scored: their log line says so instead of ending in ": "
    assert any(r.getMessage().startswith("step 1 (") and r.getMessage().endswith("not scored at this step")
               for r in caplog.records)
    stream, end = read_record(tmp_path / "stream"), read_record(tmp_path / "end")
    assert stream["status"] == end["status"] == "done"
    report = stream["task_report"]["stream"]
    assert report["edits_injected"] == [1, 2, 3] and report["batches"] == [[1, 1], [2, 2], [3, 3]]
    matrix = report["matrices"]["reliability_tf"]
    assert len(matrix) == 3 and all(len(row) == 3 for row in matrix)
    assert matrix[0][1:] == [None, None] and matrix[1][2] is None and None not in matrix[2]  # not yet injected
    # the last row: each edit's own after-all score, as the predictions hold them
    final = [json.loads(line) for line in (tmp_path / "stream" / "predictions.jsonl").read_text().splitlines()]
    after_all = {r["knowledge_id"]: r["metrics"]["after_all/reliability_tf"] for r in final
                 if r["probe_set"] == "after_all/reliability_tf"}
    assert matrix[2] == pytest.approx([after_all[f"syn-edit0-{i}"] for i in range(3)])
    for family in ("reliability_tf", "generality_tf", "locality"):
        last = report["matrices"][family][2]
        assert sum(last) / 3 == pytest.approx(stream["metrics"][f"after_all/{family}"])  # batches of one edit
        assert report["curves"][family][2] == pytest.approx(stream["metrics"][f"after_all/{family}"])
    # scoring along the stream neither adds final metrics nor changes the after-all ones; the protocol says so
    assert stream["metrics"] == pytest.approx(end["metrics"])
    assert "after every 1 edits" in stream["metric_protocols"]["after_all/reliability_tf"]
    assert "stream/reliability_tf" in stream["steps"][1]["metrics"] and (tmp_path / "stream" / "stream.png").is_file()
    assert "stream" not in end["task_report"]


def test_score_every_needs_the_sequential_protocol():
    with pytest.raises(ValueError, match="score_every"):
        EditingTask(protocol="single", score_every=2)
    assert EditingTask(n_edits=5, n_train=0, score_every=2).checkpoints() == [2, 4, 5]
