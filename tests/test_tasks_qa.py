"""Context-QA tasks: the synthetic generator and the PwC loader (real sample + hand-written files)."""
import json

import pytest

from core.types import DataError
from tasks.pwc import PwCTask, answer_length
from tasks.synthetic import SyntheticTask
from tasks.world.generate import generate_items
from core.world.relations import KINDS
from metrics.qa import normalize_answer


def test_synthetic_is_deterministic_and_self_consistent():
    task = SyntheticTask(n_contexts=10, facts_per_context=4, data_seed=3)
    again = SyntheticTask(n_contexts=10, facts_per_context=4, data_seed=3)
    assert [i.knowledge.context for i in task.items] == [i.knowledge.context for i in again.items]
    other = SyntheticTask(n_contexts=10, facts_per_context=4, data_seed=4)
    assert [i.knowledge.context for i in task.items] != [i.knowledge.context for i in other.items]
    subjects = [i.knowledge.meta["facts"][0]["subject"] for i in task.items]
    assert len(set(subjects)) == len(subjects)
    for item in task.items:
        assert len(item.questions) == 4
        assert len(item.knowledge.train_sentences) == 4 * 3
        for question, (answer,) in item.questions:
            assert answer in item.knowledge.context  # answerable from the context
            # the held-out test phrasing never appears among the training sentences
            assert all(question not in s for s in item.knowledge.train_sentences)


def test_train_and_test_phrasings_are_disjoint():
    for _, relations in KINDS.values():
        for relation in relations:
            assert not set(relation.train_questions) & set(relation.test_questions)


def test_synthetic_steps_single_and_batch():
    single = SyntheticTask(n_contexts=3).steps()
    assert [len(s.knowledge) for s in single] == [1, 1, 1]
    assert all(s.reset_before for s in single)
    assert [len(s.probe_sets[0].probes) for s in single] == [4, 4, 4]
    batch = SyntheticTask(n_contexts=5, mode="batch", batch_size=2).steps()
    assert [len(s.knowledge) for s in batch] == [2, 2, 1]
    assert len(batch[0].probe_sets[0].probes) == 8
    probe = single[0].probe_sets[0].probes[0]
    assert probe.query.prompt.startswith("Question: ") and probe.query.prompt.endswith("\nAnswer:")
    assert probe.query.context == single[0].knowledge[0].context


def test_synthetic_rejects_bad_knobs():
    with pytest.raises(ValueError, match="task.mode: expected one of 'single', 'batch', got 'sideways'"):
        SyntheticTask(mode="sideways")
    with pytest.raises(ValueError, match=r"task.n_contexts: expected int >= 1, got 0 \(int\)"):
        SyntheticTask(n_contexts=0)


def test_pwc_shared_sample(shared_dir):
    task = PwCTask(path=str(shared_dir / "data/pwc/pwc_test_sample.jsonl"), drop_questions_containing=["above text"])
    rows = [json.loads(line) for line in open(shared_dir / "data/pwc/pwc_test_sample.jsonl")]
    kept = [r for r in rows if answer_length(r["answer"]) <= 5 and "above text" not in r["prompt"].lower()]
    assert sum(len(i.questions) for i in task.items) == len(kept) > 0
    assert task.describe()["dropped"]["long_answer"] == sum(answer_length(r["answer"]) > 5 for r in rows)
    assert all(i.knowledge.context for i in task.items)


def _write(tmp_path, rows):
    path = tmp_path / "pwc.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_pwc_groups_consecutive_rows_and_filters(tmp_path):
    path = _write(tmp_path, [
        {"input": "<s>Ctx A", "prompt": "Q1?", "answer": "one"},
        {"input": "Ctx A", "prompt": "Q2?", "answer": "a b c d e f g"},  # 7 pieces > 5: dropped
        {"input": "Ctx B", "prompt": "Summarise the above text", "answer": "x"},
        {"input": "Ctx B", "prompt": "Q3?", "answer": "three"},
    ])
    task = PwCTask(path=str(path), drop_questions_containing=["above text"])
    assert [i.knowledge.context for i in task.items] == ["Ctx A", "Ctx B"]
    assert [[q for q, _ in i.questions] for i in task.items] == [["Q1?"], ["Q3?"]]
    assert {k: v for k, v in task.describe()["dropped"].items() if v} == {"long_answer": 1, "dropped_phrase": 1}
    assert len(PwCTask(path=str(path), max_answer_tokens=0).items[0].questions) == 2


def test_pwc_missing_file_names_path_and_format(tmp_path):
    with pytest.raises(DataError, match=r"not found: .*nope\.jsonl.*Expected JSON lines.*input.*prompt.*answer"):
        PwCTask(path=str(tmp_path / "nope.jsonl")).steps()


def test_pwc_malformed_line_names_file_line_and_field(tmp_path):
    path = _write(tmp_path, [{"input": "c", "prompt": "q", "answer": "a"}, {"input": "c", "answer": "a"}])
    with pytest.raises(DataError, match=r"pwc\.jsonl:2: missing field\(s\) \['prompt'\]"):
        PwCTask(path=str(path)).steps()
    bad_json = _write(tmp_path, [{"input": "c", "prompt": "q", "answer": "a"}, "{not json"])
    with pytest.raises(DataError, match=r"pwc\.jsonl:2: not valid JSON"):
        PwCTask(path=str(bad_json)).steps()


def test_pwc_empty_context_is_an_error(tmp_path):
    path = _write(tmp_path, [{"input": "   ", "prompt": "q", "answer": "a"}])
    with pytest.raises(DataError, match=r"pwc.jsonl:1: field .input. \(the context\) is empty"):
        PwCTask(path=str(path)).steps()


def test_answer_length_counts_word_pieces():
    assert answer_length("North Korea") == 2
    assert answer_length("U.S.") == 4
    assert normalize_answer("North Korea") == "north korea"


def test_generate_items_answers_unique_per_context():
    for item in generate_items(20, 4, 3, seed=1, sentence_template="Q: {question} A: {answer}"):
        assert item.knowledge.train_sentences[0].startswith("Q: ")
