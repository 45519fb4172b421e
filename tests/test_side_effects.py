"""Side-effect probes: leak / conflict / drift metrics on hand-made values, the near-miss and update
generators, the probe switch on task=synthetic and task=sequential, drift ratios of real tiny-model runs
(exactly 1.0 when the weights are untouched), rescoring, and the report's column groups."""
import json
import math
from pathlib import Path

import pytest

from core.records import RunRecord
from core.types import Answer, DataError, Knowledge, Query
from methods.base import BaseMethod
from methods.rag import RagBm25
from metrics import qa
from metrics import side_effects as se
from runners import report
from runners.experiment import Experiment
from runners.rescore import rescore
from runners.results import score_probe_set
from tasks.context_qa import ContextQATask
from tasks.side_effects.drift_data import load_general_questions, load_generic_text
from tasks.sequential import SequentialTask
from tasks.synthetic import SyntheticTask
from tasks.world.generate import generate_items
from core.world.relations import KINDS, NEAR_RELATIONS
from tasks.world.variants import near_miss_probes, taken_names, update_item
from tests.conftest import compose_config, read_record

TINY = ["model=tiny", "logger=none", "task=synthetic", "task.n_contexts=2", "task.max_new_tokens=4",
        "task.n_train_contexts=0", "task.probes=[qa,near_miss,drift]"]


# ------------------------------------------------------------------ metrics on hand-made values
def test_mentions_matches_normalised_whole_tokens():
    assert se.mentions("It was founded in 1742.", "1742")
    assert se.mentions("the Pacific Ocean!", "Pacific Ocean") and se.mentions("Pacific ocean", "the Pacific Ocean")
    assert se.mentions("Brathel Quonn, a glassblower", "brathel quonn")
    assert not se.mentions("42000 people", "4200")  # a substring, not a token: qa.contains would say yes
    assert not se.mentions("copperplate", "copper") and not se.mentions("Quonn", "Brathel Quonn")
    assert not se.mentions("anything", "") and not se.mentions("", "1742")


def test_leak_rate_on_hand_made_predictions():
    predictions = ["1742", "It was founded in 1742 by monks.", "1743", "Velmora", "Dara Quell and 1742"]
    injected = [["1742"], ["1742"], ["1742"], ["Orvane"], ["Dara Quell"]]
    assert [se.leak(p, i) for p, i in zip(predictions, injected)] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert se.leak_rate(predictions, injected) == pytest.approx(3 / 5)
    assert se.leak("Kestrin or Orvane", ["Velmora", "Orvane"]) == 1.0  # any paired answer counts
    with pytest.raises(ValueError, match="one injected-answer list per prediction"):
        se.leak_rate(predictions, injected[:2])
    with pytest.raises(ValueError, match="at least one injected answer"):
        se.leak("x", [])


def test_conflict_outcomes_and_rates_on_hand_made_predictions():
    old, new = "38", "42"
    predictions = ["42", "42 percent", "38", "It was 38%.", "40", "38, later 42", "", "42"]
    outcomes = [se.conflict_outcome(p, old, new) for p in predictions]
    assert outcomes == ["update", "update", "stale", "stale", "mixed", "mixed", "mixed", "update"]
    rows = [se.conflict_scores(p, old, new) for p in predictions]
    rates = {key: sum(r[key] for r in rows) / len(rows) for key in rows[0]}
    assert rates == {"conflict/update_acc": 3 / 8, "conflict/stale_rate": 2 / 8, "conflict/mixed_rate": 3 / 8}
    assert all(sum(r.values()) == 1.0 for r in rows)
    with pytest.raises(ValueError, match="two different values"):
        se.conflict_outcome("x", "The Lake", "lake")


def test_perplexity_next_token_accuracy_and_ratio_by_hand():
    # two sentences: lp = -6 over 3 tokens (acc 2/3), lp = -2 over 1 token (acc 0)
    scores = se.text_scores([(-6.0, 3, 2 / 3), (-2.0, 1, 0.0)])
    assert scores["ppl"] == pytest.approx(math.exp(8 / 4)) and scores["next_token_acc"] == pytest.approx(2 / 4)
    assert se.ratio(scores["ppl"], scores["ppl"]) == 1.0  # exactly
    assert se.ratio(2.0, 4.0) == 0.5 and se.ratio(0.0, 0.0) == 1.0 and se.ratio(1.0, 0.0) == math.inf
    with pytest.raises(ValueError, match="no predicted tokens"):
        se.text_scores([])
    assert se.answer_agreement("The Pacific Ocean.", "pacific ocean") == 1.0 and se.answer_agreement("Paris", "Rome") == 0.0


# ------------------------------------------------------------------ generators
def test_near_miss_answers_never_equal_the_injected_answer_and_subjects_are_never_injected():
    checked = 0
    for seed in range(12):
        items = generate_items(10, 5, 3, seed, "{question} {answer}")
        taken = taken_names(items)
        injected_subjects = {f["subject"] for item in items for f in item.knowledge.meta["facts"]}
        for item in items:
            facts = item.knowledge.meta["facts"]
            probes = near_miss_probes(item, "Q: {question}\nA:", seed, set(taken))
            assert len(probes) == 2 * len(facts)
            for probe in probes:
                (gold,), (injected,) = probe.answers, probe.meta["injected"]
                assert qa.normalize_answer(gold) != qa.normalize_answer(injected)
                assert not se.mentions(gold, injected) and not se.mentions(injected, gold)
                if probe.meta["near_miss"] == "other_relation":  # never one of the context's own values
                    assert not any(se.mentions(gold, f["value"]) for f in facts)
                    assert facts[0]["subject"] in probe.query.prompt
                else:
                    assert not any(s in probe.query.prompt for s in injected_subjects)
                checked += 1
    assert checked > 800


def test_near_miss_relations_cover_every_relation_and_are_never_stated():
    stated = {q for _, relations in KINDS.values() for r in relations for q in (*r.train_questions, *r.test_questions)}
    assert set(NEAR_RELATIONS) == {(kind, r.name) for kind, (_, relations) in KINDS.items() for r in relations}
    assert not {near.question for near in NEAR_RELATIONS.values()} & stated


def test_near_miss_probes_are_deterministic():
    def layout(task):
        return [(p.query.id, p.query.prompt, p.answers, p.meta) for s in task.steps() for ps in s.probe_sets
                if ps.name == "near_miss" for p in ps.probes]

    def make():
        return SyntheticTask(n_contexts=4, probes=["qa", "near_miss"])

    assert layout(make()) == layout(make()) and len(layout(make())) == 4 * 4 * 2


def test_update_restates_every_fact_with_a_new_value():
    original = generate_items(3, 4, 2, 0, "Q: {question}\nA: {answer}\n")[1]
    update = update_item(original, 0, "Q: {question}\nA: {answer}\n", 2)
    old, new = original.knowledge.meta["facts"], update.knowledge.meta["facts"]
    assert [f["relation"] for f in new] == [f["relation"] for f in old]
    assert all(not se.mentions(n["value"], o["value"]) for n, o in zip(new, old))
    assert [q for q, _ in update.questions] == [q for q, _ in original.questions]  # same questions, new gold
    assert [a for _, (a,) in update.questions] == [f["value"] for f in new]
    assert update.knowledge.meta["previous_answers"] == [f["value"] for f in old]
    assert all(f["value"] in update.knowledge.context for f in new) and "corrects" in update.knowledge.context
    assert len(update.knowledge.train_sentences) == 2 * len(new)


def test_packaged_drift_data_and_clear_errors_on_bad_files(tmp_path):
    assert 40 <= len(load_generic_text()) <= 60 and len(load_general_questions()) == 20
    bad = tmp_path / "q.tsv"
    bad.write_text("What is the capital of France? Paris\n")
    with pytest.raises(DataError, match=r"q.tsv:1: 'What is the capital of France\? Paris' is not a question and a non-empty answer"):
        load_general_questions(bad)
    with pytest.raises(DataError, match=r"data file not found: .*missing.txt .*Expected one sentence per line"):
        SyntheticTask(probes=["qa", "drift"], drift_text=str(tmp_path / "missing.txt"))


# ------------------------------------------------------------------ the switch on the tasks (no model)
def test_default_probes_leave_the_steps_unchanged():
    task = SyntheticTask(n_contexts=3)
    plain = ContextQATask.steps(task)
    assert [(s.index, s.label, s.reset_before, [(ps.name, ps.probes) for ps in s.probe_sets]) for s in task.steps()] == \
           [(s.index, s.label, s.reset_before, [(ps.name, ps.probes) for ps in s.probe_sets]) for s in plain]
    assert "side_effects" not in task.describe() and set(task.metric_protocols()) == {"qa_f1", "exact_match", "contains"}


def test_probes_add_a_reference_step_and_sets_after_each_injection():
    task = SyntheticTask(n_contexts=3, probes=["qa", "near_miss", "drift"])
    steps = task.steps()
    assert [s.index for s in steps] == [0, 1, 2, 3] and steps[0].knowledge == [] and steps[0].reset_before
    assert [ps.output_type for ps in steps[0].probe_sets] == ["loglikelihood_bare", "loglikelihood", "generate"]
    for step in steps[1:]:
        names = [ps.name for ps in step.probe_sets]
        assert names == ["qa", "near_miss", "drift/generic_text", "drift/general_tf", "drift/general_gen"]
        general = step.probe_sets[3].probes
        assert {p.query.context for p in general} == {step.knowledge[0].context}  # what method=context shows
        assert {p.meta["drift_step"] for p in step.probe_sets[2].probes} == {step.index}
    assert all(p.query.context == "" for p in steps[0].probe_sets[1].probes)


def test_bad_probe_switches_are_clear_errors():
    with pytest.raises(ValueError, match=r"task.probes\[1\]: expected one of 'qa', 'near_miss', 'conflict', 'drift', got 'leak'"):
        SyntheticTask(probes=["qa", "leak"])
    with pytest.raises(ValueError, match="must include qa"):
        SyntheticTask(probes=["drift"])
    with pytest.raises(ValueError, match="use task=sequential"):
        SyntheticTask(probes=["qa", "conflict"])
    with pytest.raises(ValueError, match="conflict_updates must be in"):
        SequentialTask(SyntheticTask(n_contexts=6), length=4, probes=["qa", "conflict"], conflict_updates=3)


def test_conflict_and_near_miss_need_generated_facts(tmp_path):
    data = tmp_path / "pwc.jsonl"
    data.write_text("".join(json.dumps({"input": f"Context {i} says x.", "prompt": "What?", "answer": "x"}) + "\n"
                            for i in range(4)))
    from tasks.pwc import PwCTask

    with pytest.raises(DataError, match="conflict probes need generated facts"):
        SequentialTask(PwCTask(path=str(data)), length=2, probes=["qa", "conflict"], conflict_updates=1).steps()
    with pytest.raises(DataError, match="near_miss probes need generated facts"):
        SequentialTask(PwCTask(path=str(data)), length=2, probes=["qa", "near_miss"]).steps()


def _answers(probe_set, text_of):
    return [Answer(text_of(p)) for p in probe_set.probes]


def test_conflict_metrics_through_the_sequential_task_on_hand_made_predictions():
    """L = 4, 2 updates: the originals at positions 0, 1 are updated at positions 2, 3."""
    task = SequentialTask(SyntheticTask(n_contexts=2, facts_per_context=2), length=4, probes=["qa", "conflict"],
                          conflict_updates=2)
    steps = task.steps()
    assert len(steps) == 5 and [k.id for s in steps for k in s.knowledge] == ["syn0-0", "syn0-1", "syn0-0-update", "syn0-1-update"]
    pairs = task.side_effects.conflicts
    assert len(pairs) == 4

    def text_of(probe):  # update 0 fully taken; update 1: first fact stale, second both values
        if probe.query.id not in pairs:
            return "whatever"
        old, new = pairs[probe.query.id]
        if probe.query.id.startswith("syn0-0-update"):
            return new
        return old if probe.query.id.endswith("q0") else f"{old} or {new}"

    results = []
    for step in steps:
        (probe_set,) = step.probe_sets
        results += score_probe_set(task, step.index, probe_set, _answers(probe_set, text_of))
    scored = [r for r in results if "conflict/update_acc" in r.metrics]
    # update at position 2 is asked after injections 3 and 4, the one at position 3 after injection 4
    assert sorted((r.probe.query.id, r.probe.meta["injections"]) for r in scored) == sorted(
        [(f"syn0-0-update/q{q}", j) for q in (0, 1) for j in (3, 4)] + [(f"syn0-1-update/q{q}", 4) for q in (0, 1)])
    summary = task.summarize(results)
    # 6 (probe, step) answers: 4 updated, 1 stale, 1 mixed
    assert summary["conflict/update_acc"] == pytest.approx(4 / 6)
    assert summary["conflict/stale_rate"] == pytest.approx(1 / 6)
    assert summary["conflict/mixed_rate"] == pytest.approx(1 / 6)
    last = task.step_metrics([r for r in results if r.step == steps[-1].index])
    assert last["conflict/update_acc"] == pytest.approx(2 / 4) and last["conflict/stale_rate"] == pytest.approx(1 / 4)
    assert set(task.metric_protocols()) >= {"conflict/update_acc", "conflict/stale_rate", "conflict/mixed_rate"}


def test_leak_rate_through_the_synthetic_task_on_hand_made_predictions():
    task = SyntheticTask(n_contexts=1, facts_per_context=2, probes=["qa", "near_miss"])
    (step,) = task.steps()
    near = step.probe_sets[1]
    kinds = [p.meta["near_miss"] for p in near.probes]
    assert kinds == ["other_subject", "other_relation"] * 2
    # leak on the first fact's two probes and on nothing else
    texts = [near.probes[0].meta["injected"][0], f"maybe {near.probes[1].meta['injected'][0]}", "no idea", "1234567"]
    results = score_probe_set(task, 0, step.probe_sets[0], [Answer("x")] * len(step.probe_sets[0].probes))
    results += score_probe_set(task, 0, near, [Answer(t) for t in texts])
    summary = task.summarize(results)
    assert summary["near_miss/leak_rate"] == 0.5
    assert summary["near_miss/leak_rate_other_subject"] == 0.5 and summary["near_miss/leak_rate_other_relation"] == 0.5
    assert summary["qa_f1"] == 0.0 and task.step_metrics(results)["near_miss/leak_rate"] == 0.5


# ------------------------------------------------------------------ drift on the tiny model
def _run(tmp_path: Path, method: str, *overrides: str) -> dict:
    cfg = compose_config(*TINY, f"method={method}", *overrides)
    Experiment(cfg, tmp_path / method, names={"method": method, "task": "synthetic", "model": "tiny"}).run()
    return read_record(tmp_path / method)


@pytest.fixture(scope="module")
def drift_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("drift")
    runs = {m: _run(root, m) for m in ("base", "context", "rag_bm25")}
    runs["ft_sentences"] = _run(root, "ft_sentences", "method.epochs=2")
    runs["root"] = root
    return runs


def _step_ratios(record: dict) -> list[float]:
    return [s["metrics"]["drift/ppl_ratio"] for s in record["steps"] if "drift/ppl_ratio" in s["metrics"]]


@pytest.mark.parametrize("method", ["base", "context", "rag_bm25"])
def test_drift_ratio_is_exactly_one_when_the_weights_are_untouched(drift_runs, method):
    record = drift_runs[method]
    assert record["status"] == "done", record["error"]
    assert record["metrics"]["drift/ppl_ratio"] == 1.0 and record["metrics"]["drift/next_token_acc_ratio"] == 1.0
    assert _step_ratios(record) == [1.0, 1.0]  # exactly, after each of the 2 injections
    assert record["metrics"]["drift/ppl_before"] == drift_runs["base"]["metrics"]["drift/ppl_before"]
    assert {"near_miss/leak_rate", "drift/general_agreement_tf", "drift/general_agreement_gen"} <= set(record["metrics"])
    assert set(record["metrics"]) == set(record["metric_protocols"])


def test_drift_ratio_moves_after_fine_tuning_and_base_agrees_with_itself(drift_runs):
    ft, base = drift_runs["ft_sentences"], drift_runs["base"]
    assert ft["status"] == "done", ft["error"]
    assert all(r != 1.0 for r in _step_ratios(ft)) and ft["metrics"]["drift/ppl_ratio"] != 1.0
    assert ft["metrics"]["drift/general_agreement_tf"] < 1.0
    assert base["metrics"]["drift/general_agreement_tf"] == 1.0 and base["metrics"]["drift/general_agreement_gen"] == 1.0
    # the RAG store changed the prompts of the unrelated questions (retrieved passages), not the weights
    rag = drift_runs["rag_bm25"]["metrics"]
    assert rag["drift/general_agreement_tf"] < 1.0 and rag["drift/ppl_ratio"] == 1.0


def test_loglikelihood_unaugmented_skips_the_prompt_augmentation(tiny_lm):
    rag = RagBm25(tiny_lm, top_k=1)
    rag.inject([Knowledge(id="k", context=" Velmora founded")])
    queries, targets = [Query(id="q", prompt=" Velmora"), Query(id="t", prompt="")], [" founded", "The kettle began."]
    bare, base = rag.loglikelihood_unaugmented(queries, targets), BaseMethod(tiny_lm).loglikelihood_unaugmented(queries, targets)
    assert [s.logprob for s in bare] == [s.logprob for s in base]
    assert rag.loglikelihood(queries[:1], targets[:1])[0].logprob != bare[0].logprob  # loglikelihood() does retrieve
    # plain text after the start tokens: every token is predicted (the first only if there is a start token)
    assert base[1].n_tokens == len(tiny_lm.encode(targets[1])) - (0 if tiny_lm.start_ids else 1)


def test_rescoring_reproduces_the_side_effect_metrics_exactly(drift_runs):
    original = drift_runs["ft_sentences"]
    record, _ = rescore(drift_runs["root"] / "ft_sentences")  # the references before injection are rebuilt from step 0
    assert record["metrics"] == original["metrics"]
    assert [s["metrics"] for s in record["steps"]] == [s["metrics"] for s in original["steps"]]


def test_conflict_sequence_runs_with_dense_retrieval(tmp_path):
    cfg = compose_config("model=tiny", "logger=none", "method=rag_dense", "task=sequential", "task.length=2",
                         "task.source.n_train_contexts=0", "task.source.max_new_tokens=4", "task.probe_unseen=false",
                         "task.probes=[qa,conflict]", "task.conflict_updates=1")
    Experiment(cfg, tmp_path, names={"method": "rag_dense", "task": "sequential", "model": "tiny"}).run()
    record = read_record(tmp_path)
    assert record["status"] == "done", record["error"]
    rates = [record["metrics"][f"conflict/{k}"] for k in ("update_acc", "stale_rate", "mixed_rate")]
    assert sum(rates) == pytest.approx(1.0)
    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    asked = [r for r in rows if r["knowledge_id"].endswith("-update") and r["probe_meta"]["injections"] == 2]
    assert asked and all("conflict/update_acc" in r["metrics"] for r in asked)
    # both the original and its update are in the store: the retriever sees the conflict
    assert all(set(r["method_meta"]["retrieved_knowledge_ids"]) == {"syn0-0", "syn0-0-update"} for r in asked)


# ------------------------------------------------------------------ the report's column group
def test_report_groups_side_effect_columns_and_selects_them(tmp_path):
    for method, leak in (("base", 0.1), ("ft_sentences", 0.4)):
        RunRecord(run_id=method, config={"seed": 0, "method": {"name": method}}, method=method, task="synthetic",
                  model="tiny", seed=0, status="done", timings={"inject": 1.0}, started_at="2026-01-01T00:00:00+00:00",
                  metrics={"drift/ppl_ratio": 1.0 + leak, "qa_f1": 0.5, "near_miss/leak_rate": leak, "exact_match": 0.2,
                           "drift/general_agreement_tf": 1 - leak}).write(tmp_path / method)
    header = next(line for line in report.render([tmp_path]).splitlines() if line.startswith("|"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[columns.index("n") + 1:][:5] == ["qa_f1", "exact_match", "drift/ppl_ratio",
                                                     "drift/general_agreement_tf", "near_miss/leak_rate"]
    grouped = report.render([tmp_path], groups=["side_effects"])
    header = next(line for line in grouped.splitlines() if line.startswith("|"))
    assert "qa_f1" not in header and "near_miss/leak_rate" in header and "drift/ppl_ratio" in header
    ft_row = next(line for line in grouped.splitlines() if line.startswith("| synthetic | ft_sentences"))
    assert [c.strip() for c in ft_row.strip("|").split("|")][columns.index("n") + 1:][:3] == ["1.400", "0.600", "0.400"]
    with_qa = report.render([tmp_path], metrics=["qa_f1"], groups=["near_miss"])
    header = next(line for line in with_qa.splitlines() if line.startswith("|"))
    assert [c.strip() for c in header.strip("|").split("|")][-4:] == ["qa_f1", "near_miss/leak_rate", "inject s",
                                                                     "extra storage"]
    with pytest.raises(ValueError, match="no metric in group"):
        report.render([tmp_path], groups=["conflict"])
    assert report.main([str(tmp_path), "--group", "drift"]) == 0
