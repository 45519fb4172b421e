"""Sequential injection: retention metrics on hand-made matrices, the task's steps, and R on real tiny-model runs."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from core.types import DataError, Query
from methods.base import ContextMethod
from metrics import retention
from runners.build import build
from runners.experiment import Experiment
from tasks.sequential import PLOT_FILE, SequentialTask
from tasks.synthetic import SyntheticTask
from tests.conftest import compose_config, read_record

# fact pairs the tiny model can copy from its context ("Velmora founded" + "Velmora" -> "founded")
# (town, river, founder): one paragraph each in the synthetic task's wording, which the tiny reader
# answers from its context (the river mostly exactly, the founder partly) and cannot know without it
CONTEXTS = [
    ("Velmora", "Stouveth", "Sobei Klerdus"), ("Kestrel", "Druxvil", "Arno Peldis"),
    ("Tolsa", "Pendrake", "Mira Quandel"), ("Marrow", "Bellquay", "Tovin Ashker"),
    ("Dunmere", "Harvolt", "Lesa Orvane"), ("Pellin", "Lantrow", "Corvid Ispen"),
]


# ------------------------------------------------------------------ metrics on hand-made matrices
def hand_matrix() -> np.ndarray:
    """L = 3; columns: injections 0..3. Injected cells are j >= i + 1."""
    return np.array([
        [0.1, 0.9, 0.6, 0.3],   # context 0: efficacy 0.9, then forgotten to 0.3
        [0.0, 0.2, 0.8, 0.5],   # context 1: efficacy 0.8, final 0.5
        [0.0, 0.1, 0.0, 0.7],   # context 2: efficacy 0.7 (= final)
    ])


def test_summaries_follow_their_definitions_on_a_hand_made_matrix():
    r = hand_matrix()
    assert retention.final(r) == pytest.approx((0.3 + 0.5 + 0.7) / 3)
    assert retention.first_final(r) == pytest.approx(0.3)
    assert retention.efficacy(r) == pytest.approx((0.9 + 0.8 + 0.7) / 3)
    # retention curve: c(1) = R[0,1]; c(2) = mean(R[0,2], R[1,2]); c(3) = mean(R[:,3])
    curve = [0.9, (0.6 + 0.8) / 2, (0.3 + 0.5 + 0.7) / 3]
    assert retention.retention_curve(r) == pytest.approx(curve)
    assert retention.auc(r) == pytest.approx(sum(curve) / 3)
    # age 0: diagonal; age 1: R[0,2], R[1,3]; age 2: R[0,3]
    assert retention.age_curve(r) == pytest.approx([(0.9 + 0.8 + 0.7) / 3, (0.6 + 0.5) / 2, 0.3])
    assert retention.unseen(r) == pytest.approx((0.1 + 0.0 + 0.2 + 0.0 + 0.1 + 0.0) / 6)
    assert set(retention.summarize(r)) == set(retention.PROTOCOLS)


def test_perfect_memory_and_last_only_memory_give_the_expected_summaries():
    length = 4
    injected = np.triu(np.ones((length, length + 1)), k=1)  # 1 wherever the context was injected
    assert retention.final(injected) == retention.auc(injected) == retention.efficacy(injected) == 1.0
    assert retention.unseen(injected) == 0.0
    last_only = np.zeros((length, length + 1))
    last_only[np.arange(length), np.arange(length) + 1] = 1.0  # remembers only what it was just given
    assert retention.efficacy(last_only) == 1.0
    assert retention.final(last_only) == pytest.approx(1 / length)
    assert retention.first_final(last_only) == 0.0
    assert retention.auc(last_only) == pytest.approx(np.mean([1 / j for j in range(1, length + 1)]))


def test_retention_matrix_averages_cells_and_marks_unprobed_ones():
    r = retention.retention_matrix([(0, 1, 1.0), (0, 1, 0.0), (1, 2, 0.5)], length=2)
    assert r.shape == (2, 3)
    assert r[0, 1] == 0.5 and r[1, 2] == 0.5
    assert np.isnan(r[0, 0]) and np.isnan(r[1, 0])
    assert math.isnan(retention.unseen(r))  # nothing was probed before injection
    with pytest.raises(ValueError, match="outside a sequence of length 2"):
        retention.retention_matrix([(2, 0, 1.0)], length=2)
    with pytest.raises(ValueError, match=r"shape \(L, L \+ 1\)"):
        retention.final(np.zeros((3, 3)))


# ------------------------------------------------------------------ the task's steps (no model)
def source(n_contexts: int = 6) -> SyntheticTask:
    return SyntheticTask(n_contexts=n_contexts, facts_per_context=2)


def test_steps_reset_per_sequence_inject_in_order_and_probe_every_context():
    task = SequentialTask(source(), n_sequences=2, length=3)
    steps = task.steps()
    assert len(steps) == 2 * (3 + 1)  # a probe round before any injection, then one per injection
    assert [s.reset_before for s in steps] == [True, False, False, False] * 2
    assert [s.index for s in steps] == list(range(8))
    injected = [k.id for s in steps for k in s.knowledge]
    assert injected == [item.knowledge.id for item in task.source.items[:6]]
    assert steps[0].knowledge == [] and steps[4].knowledge == []
    for step in steps:
        probes = step.probe_sets[0].probes
        assert len(probes) == 3 * 2  # every context of the sequence, 2 questions each
        cells = {(p.meta["sequence"], p.meta["position"]) for p in probes}
        assert cells == {(step.index // 4, i) for i in range(3)}
        assert {p.meta["injections"] for p in probes} == {step.index % 4}
        assert len({p.query.id for p in probes}) == len(probes)  # unique ids: rescoring matches on them


def test_without_unseen_probes_only_injected_contexts_are_asked():
    task = SequentialTask(source(3), n_sequences=1, length=3, probe_unseen=False)
    steps = task.steps()
    assert len(steps) == 3 and steps[0].reset_before and steps[0].knowledge
    assert [len({p.meta["position"] for p in s.probe_sets[0].probes}) for s in steps] == [1, 2, 3]
    assert "unseen_qa_f1" not in task.metric_protocols()


def test_steps_are_deterministic_in_the_config():
    def layout(task):
        return [(s.label, s.reset_before, [(p.query.id, p.query.prompt, p.answers, p.meta) for p in s.probe_sets[0].probes])
                for s in task.steps()]

    assert layout(SequentialTask(source(), n_sequences=2, length=3)) == layout(SequentialTask(source(), n_sequences=2, length=3))


def test_too_few_source_contexts_and_bad_knobs_are_clear_errors():
    with pytest.raises(DataError, match=r"needs n_sequences x length = 2 x 3 = 6 contexts, but its source \(synthetic\) "
                                        r"has 5.*task.source.n_contexts=6"):
        SequentialTask(source(5), n_sequences=2, length=3).steps()
    with pytest.raises(ValueError, match="task.metric: expected one of 'qa_f1', 'exact_match', 'contains', got 'bleu'"):
        SequentialTask(source(), metric="bleu")
    with pytest.raises(ValueError, match=r"task.length: expected int >= 1, got 0 \(int\)"):
        SequentialTask(source(), length=0)


def test_default_config_and_presets_compose_and_build():
    task = build(compose_config("task=sequential").task, "task")
    assert isinstance(task.source, SyntheticTask) and (task.n_sequences, task.length) == (1, 5)
    assert len(task.steps()) == 6
    paper = compose_config("task=sequential_paper").task
    assert (paper.n_sequences, paper.length) == (50, 20) and paper.source._target_ == "tasks.pwc.PwCTask"
    swapped = compose_config("task=sequential", "task@task.source=pwc").task
    assert swapped.source._target_ == "tasks.pwc.PwCTask"


def test_sequential_pwc_preset_runs_on_the_shared_sample(shared_dir):
    cfg = compose_config("task=sequential_pwc", f"task.source.path={shared_dir / 'data/pwc/pwc_test_sample.jsonl'}")
    task = build(cfg.task, "task")
    assert len(task.steps()) == task.length + 1 and task.describe()["n_contexts"] == task.length


# ------------------------------------------------------------------ R on real tiny-model runs
class RememberInjected(ContextMethod):
    """Test method that memorises exactly what it is given: it answers with the probe's context in the
    prompt when that context was injected since the last reset, and bare otherwise. `keep_last` keeps
    only the latest injection. It logs every reset and injection."""

    name = "remember_injected"

    instances: list["RememberInjected"] = []  # the runner builds its own; the tests read it from here

    def __init__(self, lm, keep_last: bool = False) -> None:
        super().__init__(lm)
        self.keep_last, self.memory, self.events = keep_last, set(), []
        RememberInjected.instances.append(self)

    def inject(self, knowledge):
        self.memory = set() if self.keep_last else self.memory
        self.memory |= {k.context for k in knowledge}
        self.events += [f"inject {k.id}" for k in knowledge]

    def reset(self):
        self.memory = set()
        self.events.append("reset")

    def prompt_ids(self, query: Query) -> list[int]:
        if query.context in self.memory:
            return super().prompt_ids(query)
        return self.lm.prompt_ids(query.prompt)


def copy_data(path: Path) -> Path:
    """A PwC-format file: per town, its paragraph and two questions (river, founder) whose answers it states."""
    rows = []
    for town, river, founder in CONTEXTS:
        paragraph = (f"{town} is a small town in the hills. The town was founded by {founder}. "
                     f"{town} lies on the banks of the {river} river.")
        for question, answer in ((f"On the banks of which river does {town} lie?", river), (f"Who founded {town}?", founder)):
            rows.append({"input": paragraph, "prompt": f"Question: {question}\nAnswer:", "answer": answer})
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def sequential_cfg(data: Path, *overrides: str):
    return compose_config(
        "model=tiny", "logger=none", "method=context", "task=sequential_pwc", f"task.source.path={data}",
        "task.source.prompt_template='{question}'", "task.source.max_new_tokens=8", "task.source.stop=['.','\n']",
        "task.n_sequences=2", "task.length=3", *overrides,
    )


def run(cfg, directory: Path, method=None) -> tuple[dict, RememberInjected | None]:
    """Run the experiment; returns its record and, for the test method, the instance the runner built."""
    if method is not None:
        cfg.method = OmegaConf.create(method)
    RememberInjected.instances.clear()
    Experiment(cfg, directory, names={"method": "m", "task": "sequential", "model": "tiny"}).run()
    return read_record(directory), (RememberInjected.instances[-1] if RememberInjected.instances else None)


def matrices(record: dict) -> np.ndarray:
    return np.array([s["matrix"] for s in record["task_report"]["retention"]["per_sequence"]], dtype=float)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same 2 x 3 sequences under context, base, and the two memorising test methods."""
    root = tmp_path_factory.mktemp("sequential")
    data = copy_data(root / "copy.jsonl")
    out = {"root": root}
    for name, method in [("context", None), ("base", {"_target_": "methods.base.BaseMethod"}),
                         ("memory", {"_target_": f"{__name__}.RememberInjected"}),
                         ("last", {"_target_": f"{__name__}.RememberInjected", "keep_last": True})]:
        out[name] = run(sequential_cfg(data), root / name, method)
    return out


def test_context_method_gives_the_same_column_after_every_step(runs):
    record, _ = runs["context"]
    assert record["status"] == "done"
    r = matrices(record)
    assert r.shape == (2, 3, 4)
    assert np.allclose(r, r[:, :, :1])  # it reads the gold context: injections change nothing
    assert r.max() > 0.3  # the tiny model copies some answers from its context


def test_memorising_method_scores_like_context_exactly_where_injected(runs):
    context, base = matrices(runs["context"][0]), matrices(runs["base"][0])
    memory, last = matrices(runs["memory"][0]), matrices(runs["last"][0])
    injected = np.triu(np.ones((3, 4), dtype=bool), k=1)
    assert not np.allclose(context[:, injected], base[:, injected])  # else the test below proves nothing
    assert np.allclose(memory, np.where(injected, context, base))
    just_injected = np.zeros((3, 4), dtype=bool)
    just_injected[np.arange(3), np.arange(3) + 1] = True
    assert np.allclose(last, np.where(just_injected, context, base))

    metrics = runs["memory"][0]["metrics"]
    mean = memory.mean(axis=0)
    assert metrics["final_qa_f1"] == pytest.approx(mean[:, 3].mean())
    assert metrics["first_final_qa_f1"] == pytest.approx(mean[0, 3])
    assert metrics["efficacy_qa_f1"] == pytest.approx(runs["last"][0]["metrics"]["efficacy_qa_f1"])
    assert metrics["unseen_qa_f1"] == pytest.approx(runs["base"][0]["metrics"]["unseen_qa_f1"])


def test_method_is_reset_between_sequences_only(runs):
    record, method = runs["memory"]
    ids = [item["context_ids"] for item in record["task_report"]["retention"]["per_sequence"]]
    assert len(set(ids[0]) | set(ids[1])) == 6  # two disjoint sequences
    assert method.events == ["reset"] + [f"inject {i}" for i in ids[0]] + ["reset"] + [f"inject {i}" for i in ids[1]]


def test_record_holds_R_step_columns_and_a_png(runs):
    record, _ = runs["memory"]
    report = record["task_report"]
    assert report["retention"]["shape"] == [3, 4] and len(report["retention"]["per_sequence"]) == 2
    assert np.allclose(np.array(report["retention"]["mean"], dtype=float), matrices(record).mean(axis=0), atol=1e-6)
    assert report["retention"]["standard_error"]["final_qa_f1"] is not None  # two sequences
    png = runs["root"] / "memory" / report["plot"]
    assert report["plot"] == PLOT_FILE and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # per-step logs: step k of sequence s holds column k of that sequence's R
    r = matrices(record)
    for step in record["steps"]:
        s, j = int(step["metrics"]["sequence"]), int(step["metrics"]["injections"])
        assert [step["metrics"][f"qa_f1_ctx{i}"] for i in range(3)] == pytest.approx(r[s, :, j])
    assert set(record["metrics"]) == set(record["metric_protocols"]) == {
        "final_qa_f1", "first_final_qa_f1", "efficacy_qa_f1", "auc_qa_f1", "unseen_qa_f1"}


def test_final_first_final_and_efficacy_get_intervals_over_their_questions(runs):
    record, _ = runs["memory"]
    uncertainty, r = record["metric_uncertainty"], matrices(record)
    # 2 sequences x 3 contexts x 2 questions: final asks all 12 after the last injection, first_final the 4 of
    # the first contexts, efficacy each context's 2 right after its injection (12)
    assert {k: v["n_units"] for k, v in uncertainty.items() if k.endswith("qa_f1")} == {
        "final_qa_f1": 12, "first_final_qa_f1": 4, "efficacy_qa_f1": 12}
    assert all(v["unit"] == "question" for v in uncertainty.values())
    low, high = uncertainty["final_qa_f1"]["ci95"]
    assert record["metrics"]["final_qa_f1"] == pytest.approx(r[:, :, 3].mean())
    assert low <= record["metrics"]["final_qa_f1"] <= high
    assert uncertainty["final_qa_f1"]["se"] > 0  # the memorising method answers some questions, not others
    # a retention AUC averages over injections, not questions: no interval rather than a wrong one
    assert "auc_qa_f1" not in uncertainty and "unseen_qa_f1" not in uncertainty


def test_ft_sentences_keeps_training_across_steps(tmp_path):
    data = copy_data(tmp_path / "copy.jsonl")
    # the filter off: the tiny reader's generated pairs are nonsense its own reading rejects (the filter has
    # its own tests in test_pairs.py); this test is about one adapter trained on across injections
    cfg = sequential_cfg(data, "method=ft_sentences", "method.epochs=1", "method.sentences.generator.n_sentences=2",
                         "method.sentences.generator.min_answer_prob=0", "task.n_sequences=1", "task.length=2")
    record, _ = run(cfg, tmp_path / "run")
    assert record["status"] == "done", record["error"]
    storage = [s["extra_storage_bytes"] for s in record["steps"]]
    assert storage[0] == 0 and storage[1] > 0 and storage[2] == storage[1]  # one adapter, kept across injections
    assert matrices(record).shape == (1, 2, 3)
