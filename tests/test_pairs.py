"""SELF-PARAM at the paper's data scale (issue 16): unique QA pairs, general regularisation text, the
reference preset. The tiny real model; WikiText from ../shared where a test says so."""
import logging

import pytest
import torch

from core import general_text
from core.training import reduce_loss, shuffled_batches
from core.types import Knowledge
from methods.selfparam import SelfParam
from methods.sentences import LocalGenerator, TaskSentences
from runners.build import build
from tasks.synthetic import SyntheticTask
from tasks.world.generate import generate_items
from tests.conftest import compose_config

TEMPLATE = "Question: {question}\nAnswer: {answer}\n"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.mark.parametrize("n", [100, 500])
def test_synthetic_pairs_are_unique_and_never_contain_a_test_question(n):
    items = generate_items(6, 4, 3, seed=0, sentence_template=TEMPLATE, pairs_per_context=n)
    plain = generate_items(6, 4, 3, seed=0, sentence_template=TEMPLATE)
    for item, before in zip(items, plain):
        sentences = item.knowledge.train_sentences
        assert len(sentences) == n and len(set(map(_norm, sentences))) == n
        # the contexts and held-out questions are those of the same seed without pairs
        assert item.knowledge.context == before.knowledge.context and item.questions == before.questions
        tests = [_norm(q) for it in items for q, _ in it.questions]  # no context's test phrasing, anywhere
        assert not any(t in _norm(s) for s in sentences for t in tests)
        # every fact is asked, in short and in sentence form, alone and combined with another
        facts = item.knowledge.meta["facts"]
        answers = [s.split("\nAnswer: ")[1].strip() for s in sentences]
        assert all(f["value"] in answers for f in facts)
        assert any(a.endswith(".") for a in answers) and any(";" in a for a in answers)


def test_pairs_are_deterministic_and_too_many_is_refused():
    first = generate_items(2, 4, 3, seed=3, sentence_template=TEMPLATE, pairs_per_context=50)
    again = generate_items(2, 4, 3, seed=3, sentence_template=TEMPLATE, pairs_per_context=50)
    assert [i.knowledge.train_sentences for i in first] == [i.knowledge.train_sentences for i in again]
    with pytest.raises(ValueError, match="unique pairs exist"):
        generate_items(1, 1, 3, seed=0, sentence_template=TEMPLATE, pairs_per_context=500)


def test_ft_sentences_and_selfparam_train_on_the_same_pairs_as_the_task_gives(tiny_lm):
    cfg = compose_config("model=tiny", "task=synthetic", "method=selfparam", "+pairs_per_context=40", "task.limit=2")
    task = build(cfg.task, "task")
    assert all(len(item.knowledge.train_sentences) == 40 for item in task.items)
    sequential = compose_config("model=tiny", "task=sequential", "+pairs_per_context=40")
    assert sequential.task.source.train_pairs_per_context == 40
    # the default task keeps its 12 phrasings (editing methods edit each); the methods' source renders 100 pairs
    plain = build(compose_config("model=tiny", "task=synthetic").task, "task").items[0].knowledge
    assert len(plain.train_sentences) == 12
    for method in ("selfparam", "ft_sentences"):
        source = build(compose_config("model=tiny", f"method={method}").method.sentences, "method.sentences")
        pairs = source(plain, tiny_lm)
        assert len(pairs) == 100 and set(plain.train_sentences) - set(pairs)  # not the phrasings
        with_task_pairs = build(cfg.method.sentences, "method.sentences")
        assert with_task_pairs(task.items[0].knowledge, tiny_lm) == list(task.items[0].knowledge.train_sentences)
    assert TaskSentences()(plain, tiny_lm) == list(plain.train_sentences)


def test_detokenise_and_unk_sentences(tmp_path):
    assert general_text.detokenise(" 0 @.@ 7 kg ( 1 @,@ 500 lb ) , a well @-@ known film ; it 's done . ") == \
        "0.7 kg (1,500 lb), a well-known film; it's done."
    wiki = tmp_path / "wiki.txt"
    wiki.write_text(
        " \n = Homarus = \n \n The lobster is a large <unk> animal of the eastern Atlantic Ocean . "
        "It may grow to a length of 60 cm ( 24 in ) and a mass of 6 @.@ 5 kilograms . Too short here . \n"
        " = = Description = = \n The claws are used for crushing prey and for cutting the food of the lobster . \n"
        " = Second Article = \n It is a well @-@ known species found along the coast of Norway and Morocco . \n"
    )
    articles = general_text.read_texts(wiki)
    assert articles == [
        ["It may grow to a length of 60 cm (24 in) and a mass of 6.5 kilograms.",
         "The claws are used for crushing prey and for cutting the food of the lobster."],
        ["It is a well-known species found along the coast of Norway and Morocco."],
    ]


def test_wikitext_from_the_shared_folder_reads_clean(shared_dir):
    articles = general_text.read_sentences(shared_dir / "data/wikitext2/valid.txt")
    sentences = [s for article in articles for s in article]
    assert len(articles) > 50 and len(sentences) > 2000
    assert not any("<unk>" in s or " @" in s or " ," in s or " ." in s or s.startswith("=") for s in sentences)


def test_chunks_pack_sentences_up_to_the_token_budget(tiny_lm):
    documents = [["One short sentence here.", "Another one follows it.", "A third sentence ends the text."], ["Alone."]]
    packed = general_text.chunks(documents, tiny_lm.encode, max_tokens=12)
    assert all(0 < len(c) <= 12 for c in packed) and len(packed) >= 3
    assert tiny_lm.decode(packed[-1]).strip() == "Alone."  # a document never continues into the next


def _selfparam(lm, **knobs):
    settings = dict(sentences=TaskSentences(), update={"mode": "lora", "lora": {"r": 4, "alpha": 8,
                    "target_modules": ["q_proj", "v_proj"]}}, lr=1e-3, epochs=1, batch_size=1, seed=0,
                    teacher_top_k=8, continuation_per_sentence=1.0, regularisation_per_sentence=1.0) | knobs
    return SelfParam(lm, **settings)


FACT = Knowledge(id="k", context="Velmora is a town on the Orvane river, founded in 1742.",
                 train_sentences=tuple(f"Question: Q{i}?\nAnswer: A{i}\n" for i in range(6)))


def test_regularisation_falls_back_to_model_samples_with_a_warning(tiny_lm, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    method = _selfparam(tiny_lm, regularisation={"path": [str(tmp_path / "missing.txt")], "n_texts": 4, "max_tokens": 8})
    with caplog.at_level(logging.WARNING):
        method.prepare([])
    assert "model" in method.regularisation_source and 0 < len(method.regularisation_pool) <= 4
    assert "missing.txt" in caplog.text
    with pytest.raises(Exception, match="no such file"):
        _selfparam(tiny_lm, regularisation={"source": "file", "path": str(tmp_path / "missing.txt")}).prepare([])


def test_regularisation_chunks_are_wikitext_each_used_once(tiny_lm, shared_dir):
    path = str(shared_dir / "data/wikitext2/valid.txt")
    method = _selfparam(tiny_lm, regularisation={"path": [path], "max_tokens": 24})
    method.prepare([])
    assert method.regularisation_source == path and len(method.regularisation_pool) > 500
    texts = [tiny_lm.decode(c) for c in method.regularisation_pool[:50]]
    assert not any("<unk>" in t or " @-@ " in t for t in texts)
    used = [tuple(s) for *_, s, kind, _ in method._pairs(FACT) + method._pairs(FACT) if kind == "regularisation"]
    assert len(used) == 12 and len(set(used)) == 12  # a fresh chunk per QA sentence, across injections too


def test_interleaved_steps_follow_the_reference_order(tiny_lm):
    method = _selfparam(tiny_lm, interleave=True, regularisation={"source": "model", "n_texts": 4, "max_tokens": 6})
    method.prepare([])
    examples = method.training_examples([FACT])
    groups = method.example_groups(examples)
    order = [e for batch in shuffled_batches(examples, 1, torch.Generator().manual_seed(1), groups) for e in batch]
    kinds = [e.kind for e in order]
    assert kinds == ["qa", "continuation", "regularisation"] * 6
    assert [e.group for e in order[::3]] != sorted(e.group for e in order[::3])  # the triples are shuffled


def test_loss_average_per_sentence_weighs_sentences_equally():
    per_token = torch.tensor([1.0, 1.0, 1.0, 1.0, 5.0])  # a 4-token sentence, then a 1-token one
    total, n = reduce_loss(per_token, [4, 1], "token")
    assert float(total) / n == pytest.approx(9 / 5)
    total, n = reduce_loss(per_token, [4, 1], "sentence")
    assert float(total) / n == pytest.approx((1 + 5) / 2)


def test_the_reference_preset_composes_to_the_reference_values(tiny_lm):
    cfg = compose_config("+experiment=reference_selfparam", "model=tiny", "task=synthetic")
    assert cfg.method._target_ == "methods.selfparam.SelfParam" and cfg.task.train_pairs_per_context == 500
    method = build(cfg.method, "method", lm=tiny_lm)
    for knob, value in SelfParam.reference.items():
        if knob in ("teacher_top_k", "regularisation_text", "pairs_per_context"):
            continue  # the two deviations the preset keeps (below); the pairs are the sentence source's (below)
        head, _, rest = knob.partition(".")
        node = cfg.method[head]
        for part in rest.split(".") if rest else []:
            node = node[part]
        assert (sorted(node) == sorted(value)) if isinstance(value, list) else node == value, knob
    # what the preset keeps off the reference: the top-k teacher cache (full rows: 1 MiB/token at Gemma's
    # vocabulary) and the general text (WikiText-2: no package ships SlimPajama)
    deviations = method.reference_deviations()
    assert set(deviations) == {"teacher_top_k", "regularisation_text"}
    assert "wikitext2/valid.txt" in deviations["regularisation_text"]
    assert method.pairs_per_context == 500
    default = build(compose_config("model=tiny", "method=selfparam").method, "method", lm=tiny_lm)
    assert {"lr", "batch_size", "regularisation.max_tokens"} <= set(default.reference_deviations())
    # the pair count is a deviation too, named per source: world pairs on synthetic contexts, generated elsewhere
    assert default.reference_deviations()["pairs_per_context"] == \
        "'100 (synthetic world), 20 (generated, other tasks)' (reference: 500)"
    scaled = compose_config("+experiment=reference_selfparam", "model=tiny", "task=synthetic", "pairs_per_context=100")
    assert build(scaled.method, "method", lm=tiny_lm).reference_deviations()["pairs_per_context"] == "100 (reference: 500)"


def test_generated_pairs_are_unique_and_filtered_by_the_teacher(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    context = "Dropesdra is a small town in the hills. Dropesdra lies on the banks of the Stouveth river."
    item = Knowledge(id="ctx", context=context)
    prompt = "Text: {context}\nQuestion:"
    open_gen = LocalGenerator(n_sentences=6, prompt=prompt, samples_per_attempt=6, max_attempts=2, max_question_tokens=12,
                              max_answer_tokens=6, min_answer_prob=0.0)
    everything = open_gen(item, tiny_lm)
    questions = [_norm(s.split("\nAnswer:")[0]) for s in everything]
    assert len(questions) == len(set(questions))  # one pair per question
    strict = LocalGenerator(n_sentences=6, prompt=prompt, samples_per_attempt=6, max_attempts=2, max_question_tokens=12,
                            max_answer_tokens=6, min_answer_prob=0.5)
    assert strict.kept == strict.generated == 0 and strict.pairs_per_context == 6  # counters exist before any call
    try:
        kept = strict(item, tiny_lm)
    except Exception as err:  # nothing passes the threshold: said so, never an empty training set
        assert "teacher accepts" in str(err)
        kept = []
    assert strict.kept <= strict.generated
    for sentence in kept:  # every kept pair's answer has >= 0.5 mean token probability with the context
        question, answer = sentence.split("\nAnswer: ")
        score = tiny_lm.loglikelihood([(tiny_lm.prompt_ids(question + "\nAnswer:", context=context),
                                tiny_lm.encode(" " + answer.rstrip("\n")))])[0]
        assert score.logprob / score.n_tokens >= torch.log(torch.tensor(0.5)).item() - 1e-4
