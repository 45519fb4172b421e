"""tasks/crs.py and runners/rescore_crs.py: loaders, the disjoint knowledge split, scoring, bad input,
the run end to end on the tiny model, and conformance with the He et al. reference pipeline."""
import json
import re
from pathlib import Path

import pandas as pd
import pytest
from omegaconf import OmegaConf

from core.types import Answer, DataError, Probe, ProbeSet, Query
from metrics import ranking
from runners import rescore_crs
from runners.build import build
from tasks.base import ProbeResult
from tasks.crs import CRSTask
from tasks.crs_catalogue import entity_title, load_catalogue
from tasks.crs_turns import load_crs_turns
from tasks.redial_conversations import load_redial_conversations
from tests.conftest import compose_config
from tests.test_run import run_in_process

REFERENCE_MODELS = ["mistral", "mistral-finetuned", "mistral_context_instruct", "mistral_qa_instruct"]
URI = "<http://dbpedia.org/resource/{}>"


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def turn(dialog: str, index: int, rec: list[int], prev: list[int], lines: list[str], resp: str, **extra) -> dict:
    speakers = ["User", "System"]
    rendered = "".join(f"\n{speakers[i % 2]}: {line}" for i, line in enumerate(lines)) + "\nSystem: "
    return {"context": [""] + lines, "resp": resp, "rec": rec, "entity": rec, "prev_entity": prev,
            "dialog_id": dialog, "turn_id": f"{dialog}_t{index}", "is_user": 0, "input": rendered} | extra


@pytest.fixture()
def mini_dataset(tmp_path) -> Path:
    """A tiny dataset in the real format: six entities (one not recommendable), four dialogues."""
    folder = tmp_path / "mini"
    folder.mkdir()
    names = ["Heat_(1995_film)", "Alien_(film)", "The_Matrix", "Up_(2009_film)", "Drama", "Spider-Man"]
    (folder / "entity2id.json").write_text(json.dumps({URI.format(n): i for i, n in enumerate(names)}))
    (folder / "item_ids.json").write_text(json.dumps([0, 1, 2, 3, 5]))
    write_jsonl(folder / "test.jsonl", [
        turn("d1", 1, [1], [4], ["I like drama", "Any thrillers?"], "Try Alien!"),
        turn("d1", 2, [0, 2], [4, 1], ["I like drama", "Any thrillers?", "Try Alien!", "Seen it. More?"],
             "Heat or The Matrix."),
        turn("d2", 1, [3], [], ["Something for kids?"], "Up is lovely."),
        turn("d3", 1, [5], [5], ["I loved Spider-Man"], "Spider-Man again?"),
        turn("d4", 1, [2], [], ["Sci-fi please"], "The Matrix."),
        turn("d4", 2, [], [], ["Sci-fi please", "The Matrix.", "Thanks"], "Bye"),      # no gold: not evaluated
        turn("d4", 3, [0], [], ["Sci-fi please"], "Heat", is_user=1),                 # a user turn: not evaluated
    ])
    return folder


# the reference prompt as task=inspired / redial give it (its only copy is the YAML)
PROMPT = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf/task/inspired.yaml").prompt_template


def mini_task(folder: Path, **knobs) -> CRSTask:
    return CRSTask(dataset_dir=str(folder), **({"prompt_template": PROMPT, "limit": 0, "n_knowledge": 0} | knobs))


# ---------------------------------------------------------------- data
def test_entity_titles_follow_the_reference():
    assert entity_title("<http://dbpedia.org/resource/Hoffa_(film)>") == "Hoffa"
    assert entity_title("<http://dbpedia.org/resource/Spider-Man:_Far_From_Home>") == "Spider Man: Far From Home"
    assert entity_title("<http://dbpedia.org/resource/Up_(2009_film)>") == "Up"


def test_mini_dataset_loads_only_recommender_turns_with_gold(mini_dataset):
    catalogue = load_catalogue(mini_dataset)
    assert catalogue.titles("entities") == sorted(["Heat", "Alien", "The Matrix", "Up", "Drama", "Spider Man"])
    assert "Drama" not in catalogue.titles("items")
    turns = load_crs_turns(mini_dataset / "test.jsonl", catalogue)
    assert [t.id for t in turns] == ["d1/d1_t1", "d1/d1_t2", "d2/d2_t1", "d3/d3_t1", "d4/d4_t1"]
    assert turns[1].gold == ("Heat", "The Matrix") and turns[1].seen == ("Drama", "Alien")
    assert turns[1].request == "Seen it. More?"


def test_split_keeps_injected_and_evaluated_dialogues_disjoint(mini_dataset):
    task = mini_task(mini_dataset, knowledge_fraction=0.5, data_seed=3)
    [step] = task.steps()
    injected = {k.id.removeprefix("dialog-") for k in step.knowledge}
    evaluated = {p.meta["dialog_id"] for p in step.probe_sets[0].probes}
    assert len(injected) == 2 and len(evaluated) == 2 and not injected & evaluated
    assert step.reset_before and step.probe_sets[0].scorer == "ranking"
    describe = task.describe()
    assert describe["n_knowledge_dialogues"] == 2 and describe["n_dialogues_evaluated"] == 2
    assert describe["n_turns"] == len(step.probe_sets[0].probes)
    # the same seed gives the same split; another seed may not
    assert {k.id for k in mini_task(mini_dataset, knowledge_fraction=0.5, data_seed=3).steps()[0].knowledge} == {
        k.id for k in step.knowledge}


def test_injected_dialogue_has_the_whole_text_and_one_sentence_per_recommendation(mini_dataset):
    task = mini_task(mini_dataset, knowledge_source="crs_jsonl", knowledge_path=str(mini_dataset / "test.jsonl"))
    knowledge = {k.id: k for k in task.steps()[0].knowledge}
    d1 = knowledge["dialog-d1"]
    assert d1.context.startswith("User: I like drama") and d1.context.endswith("System: Heat or The Matrix.")
    assert len(d1.train_sentences) == 2
    assert d1.train_sentences[1] == ('Question: Seen it. More?\nAnswer: Heat, The Matrix\n')
    assert task.describe()["n_turns"] == 5  # another source: every turn is evaluated


def test_limit_and_n_knowledge_cut_the_sets(mini_dataset):
    task = mini_task(mini_dataset, limit=1, n_knowledge=1)
    [step] = task.steps()
    assert len(step.knowledge) == 1 and len(step.probe_sets[0].probes) == 1
    none = mini_task(mini_dataset, knowledge_source="none")
    assert none.steps()[0].knowledge == [] and none.describe()["n_turns"] == 5


def test_real_inspired_and_redial_files_load(shared_dir):
    inspired = load_crs_turns(shared_dir / "data/inspired/test.jsonl", load_catalogue(shared_dir / "data/inspired"))
    assert len(inspired) == 228 and sum(len(t.gold) for t in inspired) == 253
    assert inspired[0].gold == ("Hustlers",) and "Hustlers" in inspired[0].seen
    task = CRSTask(dataset_dir=str(shared_dir / "data/redial"), prompt_template=PROMPT)
    [step] = task.steps()
    assert len(step.probe_sets[0].probes) == 16 and len(step.knowledge) == 8
    assert all(k.train_sentences for k in step.knowledge)


def test_redial_conversations_json_array_and_jsonl(tmp_path):
    conversation = {
        "conversationId": "391", "initiatorWorkerId": 7, "respondentWorkerId": 9,
        "movieMentions": {"111": "Heat (1995)", "222": "Alien (1979)"},
        "messages": [
            {"text": "Hi! I loved @111", "senderWorkerId": 7},
            {"text": "Then watch @222", "senderWorkerId": 9},
            {"text": "it is scary.", "senderWorkerId": 9},
            {"text": "Thanks", "senderWorkerId": 7},
        ],
    }
    array = tmp_path / "conversations.json"
    array.write_text(json.dumps([conversation]))
    lines = write_jsonl(tmp_path / "train_data.jsonl", [conversation, conversation | {"conversationId": "392"}])
    [dialogue] = load_redial_conversations(array)
    assert dialogue.id == "redial-391"
    assert dialogue.text == "User: Hi! I loved Heat (1995)\nSystem: Then watch Alien (1979) it is scary.\nUser: Thanks"
    assert dialogue.recommendations == (("Hi! I loved Heat (1995)", ("Alien",), "Then watch Alien (1979) it is scary."),)
    assert [d.id for d in load_redial_conversations(lines)] == ["redial-391", "redial-392"]


def test_redial_conversations_bad_input_names_the_place(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [], "initiatorWorkerId": 1}, "{oops"])
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_redial_conversations(bad)
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps([{"messages": []}]))
    with pytest.raises(DataError, match=r"missing.json:1: missing field\(s\) \['initiatorWorkerId'\]"):
        load_redial_conversations(missing)


def test_malformed_crs_test_lines_name_file_and_line(mini_dataset):
    path = mini_dataset / "test.jsonl"
    rows = path.read_text().splitlines()
    write_jsonl(path, [rows[0], json.dumps({"input": "x", "rec": [1]})])
    with pytest.raises(DataError, match=r"test.jsonl:2: missing field\(s\) \['prev_entity', 'dialog_id', 'turn_id'\]"):
        mini_task(mini_dataset).steps()
    write_jsonl(path, [rows[0], "not json"])
    with pytest.raises(DataError, match=r"test.jsonl:2: not valid JSON"):
        mini_task(mini_dataset).steps()
    write_jsonl(path, [turn("d9", 1, [99], [], ["hi"], "x")])
    with pytest.raises(DataError, match=r"test.jsonl:1 \(turn d9/d9_t1\): entity id 99 is not in entity2id.json"):
        mini_task(mini_dataset).steps()


@pytest.mark.parametrize("knobs, message", [
    ({"parser": "fancy"}, "task.parser"),
    ({"knowledge_source": "crs_jsonl"}, "needs task.knowledge_path"),
    ({"knowledge_fraction": 1.0}, "knowledge_fraction"),
    ({"prompt_template": "no slot"}, "{dialogue}"),
    ({"sentence_template": "{movie}"}, "sentence_template"),
])
def test_bad_knobs_are_clear_errors(mini_dataset, knobs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        mini_task(mini_dataset, **knobs)


# ---------------------------------------------------------------- scoring
def results_for(task: CRSTask, texts: dict[str, str]) -> list[ProbeResult]:
    probe_set = task.steps()[0].probe_sets[0]
    outputs = [Answer(texts.get(p.query.id, "")) for p in probe_set.probes]
    scores = task.process_results(probe_set, outputs)
    return [ProbeResult(0, probe_set.name, p, o, s) for p, o, s in zip(probe_set.probes, outputs, scores)]


def test_scoring_parses_prefix_plus_generation_and_averages_per_gold_item(mini_dataset, tmp_path):
    task = mini_task(mini_dataset, knowledge_source="none", answer_prefix="\n1.", ks=[1, 5])
    results = results_for(task, {
        "d1/d1_t1": " Alien\n2. Heat",                # gold Alien (not seen): rank 1
        "d1/d1_t2": " Aliens\n2. The Matrix\n3. Heat",  # golds Heat (rank 3) and The Matrix (rank 2)
        "d3/d3_t1": " Spiderman",                     # gold Spider Man, mentioned before: discussion, rank 1
    })
    by_id = {r.probe.query.id: r.metrics for r in results}
    assert by_id["d1/d1_t1"]["recall@1"] == 1 and by_id["d1/d1_t1"]["list_items"] == 2
    assert by_id["d1/d1_t2"]["recall@1"] == 0 and by_id["d1/d1_t2"]["recall@5"] == 1
    assert by_id["d1/d1_t2"]["mrr@5"] == pytest.approx((1 / 3 + 1 / 2) / 2) and by_id["d1/d1_t2"]["n_gold"] == 2
    # the reference's quirk: an empty generation is one empty item, and "" is nearest to the shortest
    # title (here the gold "Up", 2 edits); the robust parser finds no item at all
    assert by_id["d2/d2_t1"]["recall@1"] == 1 and by_id["d2/d2_t1"]["list_items"] == 1
    robust = mini_task(mini_dataset, knowledge_source="none", answer_prefix="\n1.", parser="robust")
    assert {r.probe.query.id: r.metrics["list_items"] for r in results_for(robust, {})}["d2/d2_t1"] == 0
    metrics = task.summarize(results)
    # 6 gold items: hits@5 for Alien, Heat, The Matrix, Spider Man, Up -> 5/6; hits@1: Alien, Spider Man, Up -> 3/6
    assert metrics["recall@5"] == pytest.approx(5 / 6) and metrics["recall@1"] == pytest.approx(3 / 6)
    report = task.report(results, tmp_path)
    assert report["conditions"]["discussion"]["recall@1"] == {"mean": 1.0, "se": None, "n": 1}
    assert report["conditions"]["all"]["recall@5"]["n"] == 6
    assert set(report["settings"]) == {f"filtered_{f}_exclude_seen_{e}" for f in (False, True) for e in (False, True)}
    # excluding seen titles removes the only (seen) gold hit of d3
    assert report["settings"]["filtered_False_exclude_seen_True"]["discussion"]["recall@1"]["mean"] == 0.0
    ranked = [json.loads(line) for line in (tmp_path / "crs_ranked.jsonl").read_text().splitlines()]
    assert ranked[1]["items"][0] == {"item": "Aliens", "title": "Alien", "distance": 1}
    protocols = task.metric_protocols()
    assert set(metrics) == set(protocols)
    assert "oov-filter=off" in protocols["recall@1"] and "exclude-seen=no" in protocols["recall@1"]
    assert "parser=he2023" in protocols["recall@1"]


def test_crs_intervals_resample_whole_dialogues(mini_dataset):
    from metrics.uncertainty import bootstrap_mean
    from runners.results import metric_uncertainty

    task = mini_task(mini_dataset, knowledge_source="none", answer_prefix="\n1.", ks=[1, 5])
    results = results_for(task, {"d1/d1_t1": " Alien\n2. Heat", "d1/d1_t2": " Aliens\n2. The Matrix\n3. Heat",
                                 "d3/d3_t1": " Spiderman"})
    metrics = task.summarize(results)
    stored = metric_uncertainty(task, results, metrics)
    # recall@1 per gold item: d1 (3 golds) 1, 0, 0; d2 (Up) 1; d3 (Spider Man) 1; d4 (The Matrix) 0 -> 4 dialogues
    assert stored["recall@1"]["unit"] == "dialogue" and stored["recall@1"]["n_units"] == 4
    expected = bootstrap_mean([1, 0, 0, 1, 1, 0], ["d1", "d1", "d1", "d2", "d3", "d4"])
    assert stored["recall@1"]["se"] == pytest.approx(expected.se) and expected.mean == metrics["recall@1"] == 0.5
    assert stored["list_items"]["n_units"] == 4


def test_filter_and_exclusion_knobs_change_the_flat_metrics_and_their_protocol(mini_dataset):
    task = mini_task(mini_dataset, knowledge_source="none", answer_prefix="\n1.", ks=[1],
                     filter_oov=True, oov_threshold=0, exclude_seen=True)
    results = results_for(task, {"d1/d1_t2": " Aliens\n2. Heat", "d3/d3_t1": " Spider Man"})
    # "Aliens" is 1 edit away: filtered out, so Heat moves to rank 1; Spider Man was seen: excluded
    by_id = {r.probe.query.id: r.metrics for r in results}
    assert by_id["d1/d1_t2"]["recall@1"] == 0.5 and by_id["d3/d3_t1"]["recall@1"] == 0
    assert "oov-filter=<=0 edits" in task.metric_protocols()["recall@1"]
    assert "exclude-seen=yes" in task.metric_protocols()["recall@1"]


def test_scores_survive_a_round_trip_through_predictions_rows(mini_dataset):
    """A rescorer rebuilding probes from predictions.jsonl (gold, prompt, probe_meta) gets the same metrics."""
    task = mini_task(mini_dataset, knowledge_source="none", answer_prefix="\n1.")
    results = results_for(task, {"d1/d1_t2": " The Matrix\n2. Heat", "d2/d2_t1": " Up"})
    rows = [json.loads(json.dumps(r.to_row())) for r in results]
    fresh = mini_task(mini_dataset, knowledge_source="none", answer_prefix="ignored: the probe carries it")
    rebuilt = [Probe(Query(row["probe_id"], row["prompt"]), tuple(row["gold"]), meta=row["probe_meta"]) for row in rows]
    scores = fresh.process_results(ProbeSet("crs", rebuilt, scorer="ranking"), [Answer(row["prediction"]) for row in rows])
    assert scores == [r.metrics for r in results]


# ---------------------------------------------------------------- the run end to end (tiny model)
def test_inspired_runs_end_to_end_on_the_tiny_model(tmp_path, shared_dir):
    record = run_in_process(tmp_path, "model=tiny", "method=ft_sentences", "method.epochs=1", "task=inspired",
                            f"task.dataset_dir={shared_dir / 'data/inspired'}", "task.limit=3", "task.n_knowledge=2",
                            "task.max_new_tokens=8", "logger=none")
    assert record["status"] == "done", record["error"]
    assert {f"recall@{k}" for k in (1, 5, 10, 20)} <= set(record["metrics"])
    assert all(0 <= record["metrics"][f"{m}@{k}"] <= 1 for m in ("recall", "ndcg", "mrr") for k in (1, 5, 10, 20))
    assert set(record["metric_protocols"]) == set(record["metrics"])
    report = record["task_report"]
    assert set(report["conditions"]) == {"recommendation", "discussion", "all"}
    n_gold = record["method_info"]["task"]["n_gold"]
    assert report["conditions"]["all"]["recall@1"]["n"] == n_gold >= 3
    assert record["method_info"]["task"]["n_knowledge_dialogues"] == 2 and record["timings"]["inject"] > 0
    predictions = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 3 and all(p["probe_meta"]["answer_prefix"] for p in predictions)
    assert (tmp_path / "crs_ranked.jsonl").is_file()


def test_task_configs_compose_and_build(shared_dir):
    for name, n_turns in [("inspired", 16), ("redial", 16), ("inspired_full", 228), ("redial_full", 1769)]:
        cfg = compose_config(f"task={name}", f"task.dataset_dir={shared_dir / 'data' / name.split('_')[0]}",
                             *([f"task.knowledge_path={shared_dir / 'data/redial/test.jsonl'}"] if "full" in name else []))
        task = build(cfg.task, "task")
        assert task.describe()["n_turns"] == n_turns


# ---------------------------------------------------------------- rescore_crs: bad input
def test_rescore_crs_malformed_lines_name_file_and_line(tmp_path, mini_dataset, capsys):
    good = {"generation": "1. Heat", "gold": ["Heat"], "seen": []}
    cases = [
        ("{not json", r"gens.jsonl:2: not valid JSON"),
        (json.dumps({"generation": "1. Heat"}), r"gens.jsonl:2: missing field\(s\) \['gold'\]"),
        (json.dumps({"generation": "x", "gold": "Heat"}), r"gens.jsonl:2: 'gold' must be a list of title strings"),
        (json.dumps({"generation": "x", "gold": ["Heat"], "seen": [1]}), r"gens.jsonl:2: 'seen' must be a list"),
        (json.dumps({"generation": 3, "gold": ["Heat"]}), r"gens.jsonl:2: 'generation' must be a string"),
        (json.dumps(["generation"]), r"gens.jsonl:2: expected a JSON object"),
    ]
    for line, message in cases:
        path = write_jsonl(tmp_path / "gens.jsonl", [good, line])
        with pytest.raises(DataError, match=message):
            rescore_crs.read_generations(path)
    with pytest.raises(SystemExit) as exit_info:  # the CLI: exit code 2 and the message on stderr
        rescore_crs.main(["--generations", str(path), "--dataset-dir", str(mini_dataset)])
    assert exit_info.value.code == 2 and "gens.jsonl:2: expected a JSON object" in capsys.readouterr().err


def test_rescore_crs_scores_a_small_file_and_writes_json(tmp_path, mini_dataset, capsys):
    path = write_jsonl(tmp_path / "gens.jsonl", [
        {"generation": "Sure!\n1. Heat (1995)\n2. Alien", "gold": ["Alien"], "seen": []},
        {"generation": "1. Aliens\n2. Heat", "gold": ["Heat", "Alien"], "seen": ["Alien"]},
        {"generation": "no gold here", "gold": [], "seen": []},
    ])
    out = tmp_path / "table.json"
    table = rescore_crs.main(["--generations", str(path), "--dataset-dir", str(mini_dataset), "--out", str(out)])
    assert json.loads(out.read_text()) == table
    assert set(table) == {"recommendation", "discussion", "all"}
    assert table["all"]["recall@1"]["mean"] == pytest.approx(1 / 3) and table["all"]["recall@1"]["n"] == 3
    assert table["all"]["recall@5"]["mean"] == 1.0 and table["discussion"]["mrr@5"]["mean"] == 1.0
    assert "recall@1" in capsys.readouterr().out
    excluded = rescore_crs.main(["--generations", str(path), "--dataset-dir", str(mini_dataset), "--exclude-seen"])
    assert excluded["discussion"]["recall@20"]["mean"] == 0.0  # the seen gold can no longer be hit
    filtered = rescore_crs.main(["--generations", str(path), "--dataset-dir", str(mini_dataset), "--oov-threshold", "0"])
    assert filtered["discussion"]["recall@1"]["mean"] == 0.0  # "Aliens" is dropped, not mapped to Alien


# ---------------------------------------------------------------- conformance with the reference pipeline
def reference_settings(folder: Path) -> list[tuple[bool, bool, Path]]:
    found = []
    for csv in sorted(folder.glob("inspired_filtered_*_exclude_seen_*_summary.csv")):
        filtered, exclude = re.fullmatch(r"inspired_filtered_(True|False)_exclude_seen_(True|False)_summary.csv", csv.name).groups()
        found.append((filtered == "True", exclude == "True", csv))
    return found


@pytest.mark.parametrize("model", REFERENCE_MODELS)
def test_rescoring_reproduces_the_reference_summaries(model, shared_dir, tmp_path, capsys):
    """He et al.'s own generations, rescored by `runners.rescore_crs`, give the reference's summaries
    within one hit (1/n) for every metric, k, condition and setting given. (Measured: 3 tie flips in
    all, see docs/crs.md; everything else is identical.)"""
    folder = shared_dir / "reference/crs_he2023" / model
    generations = tmp_path / "generations.jsonl"
    with generations.open("w") as handle:
        for line in (folder / "inspired_extracted.jsonl").read_text().splitlines():
            row = json.loads(line)
            handle.write(json.dumps({"generation": row["resp"]["choices"][0]["message"]["content"],
                                     "gold": row["gt_list"], "seen": row["prev_list"]}) + "\n")
    settings = reference_settings(folder)
    assert len(settings) >= 2, f"expected reference summaries in {folder}"
    for filtered, exclude_seen, csv in settings:
        argv = ["--generations", str(generations), "--dataset-dir", str(shared_dir / "data/inspired"),
                "--out", str(tmp_path / "out.json")]
        argv += ["--oov-threshold", "2"] * filtered + ["--exclude-seen"] * exclude_seen
        rescore_crs.main(argv)
        ours = json.loads((tmp_path / "out.json").read_text())
        reference = pd.read_csv(csv).set_index("condition")
        for condition in ranking.CONDITIONS:
            n = ours[condition]["recall@1"]["n"]
            assert n == {"recommendation": 211, "discussion": 42, "all": 253}[condition]
            for name, entry in ours[condition].items():
                expected = reference.loc[condition, f"{name}_mean"]
                assert abs(entry["mean"] - expected) <= 1 / n + 1e-12, (model, csv.name, condition, name)
                assert entry["se"] == pytest.approx(reference.loc[condition, f"{name}_se"], abs=2 / n)
    capsys.readouterr()


def test_a_run_rescores_through_the_generic_rescorer(tmp_path, shared_dir):
    """`python -m runners.rescore RUN task.KEY=VALUE` rebuilds the task and rescores its predictions:
    unchanged settings give the same numbers; scoring knobs give new ones with their own protocol."""
    from runners.rescore import rescore

    run_dir = tmp_path / "run"
    record = run_in_process(run_dir, "model=tiny", "method=base", "task=inspired", "task.limit=4",
                            f"task.dataset_dir={shared_dir / 'data/inspired'}", "task.max_new_tokens=6", "logger=none")
    assert record["status"] == "done", record["error"]
    same, _ = rescore(run_dir, out=tmp_path / "same")
    assert same["metrics"] == pytest.approx(record["metrics"]) and same["task_report"] == record["task_report"]
    changed, out = rescore(run_dir, ["task.parser=robust", "task.filter_oov=true", "task.exclude_seen=true"],
                           out=tmp_path / "robust")
    protocol = changed["metric_protocols"]["recall@5"]
    assert "parser=robust" in protocol and "oov-filter=<=2 edits" in protocol and "exclude-seen=yes" in protocol
    assert changed["task_report"]["protocol"]["parser"] == "robust" and (out / "crs_ranked.jsonl").is_file()
    # the four reference settings do not depend on the configured one
    assert changed["task_report"]["settings"].keys() == record["task_report"]["settings"].keys()
