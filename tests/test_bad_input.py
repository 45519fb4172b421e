"""Ordinary bad input is refused with a message naming the key or file:line, or dropped and counted;
it never becomes a silent wrong answer (issue 12).

`CASES` is a table of bad inputs a new user produces (mistyped nested keys, out-of-range knobs, null /
empty / repeated / undecodable records in every loader) with the outcome each must have. The test runs
them all and renders `docs/bad_input.md` from what actually happened, so the document cannot drift from
the code: if the rendered table differs from the file, the test fails (regenerate it with
`KBENCH_WRITE_DOCS=1 python -m pytest tests/test_bad_input.py -k docs`). The end-to-end tests below
run the cases of the issue on the tiny model built from config.
"""
from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.types import KBenchError
from runners.build import build, check_run
from runners.experiment import Experiment
from tests.conftest import ROOT, compose_config, read_record

DOC = ROOT / "docs" / "bad_input.md"
PWC_OK = {"input": "Mara Venn founded Rell in 1911.", "prompt": "Who founded Rell?", "answer": "Mara Venn"}
CF = {"case_id": 0, "prompt": "The mother tongue of Danielle Darrieux is", "target_new": "English",
      "subject": "Danielle Darrieux", "ground_truth": "French",
      "rephrase_prompt": "Where Danielle Darrieux is from, people speak the language of",
      "locality_prompt": "Michel Rocard is a native speaker of", "locality_ground_truth": "French"}
ZSRE = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?", "alt": "University of Michigan",
        "rephrase": "What university did Watts Humphrey take part in?", "answers": ["Trinity College"],
        "loc": "nq question: who played desmond doss father in hacksaw ridge", "loc_ans": "Hugo Weaving"}
URI = "<http://dbpedia.org/resource/{}>"


# ------------------------------------------------------------------------------------ helpers
def jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def config(*overrides: str) -> Callable[[Path], str]:
    """A config case: compose like run.py, then check every group as the experiment does first."""
    def run(_: Path) -> str:
        check_run(compose_config(*overrides))
        return "accepted"
    return run


def task_steps(*overrides: str, describe: str | None = None) -> Callable[[Path], str]:
    """A data case: build the task from config and ask for its steps (which loads the data). Accepted
    input reports the counts it dropped (`describe`: the key of task.describe() that holds them)."""
    def run(_: Path) -> str:
        task = build(compose_config(*overrides).task, "task")
        task.steps()
        info = task.describe()
        dropped = info.get(describe or "dropped") or {}
        if "source_data" in info:
            dropped = info["source_data"].get("dropped") or {}
        counts = ", ".join(f"{k}={v}" for k, v in dropped.items() if v)
        return f"dropped and counted in the record: {counts}" if counts else "accepted, nothing dropped"
    return run


@dataclass(frozen=True)
class Case:
    kind: str  # the kinds: nested keys, bounds, types, empty golds, duplicates, decoding
    what: str  # the bad input, as a user would describe it
    setup: Callable[[Path], Callable[[Path], str]]  # writes its files into the folder, returns the runner
    expect: str  # a regex the outcome must match


def _crs_folder(folder: Path, rows) -> Path:
    data = folder / "crs"
    data.mkdir(exist_ok=True)
    names = ["Heat_(1995_film)", "Alien_(film)", "The_Matrix", "_(film)"]  # the last one's title is empty
    (data / "entity2id.json").write_text(json.dumps({URI.format(n): i for i, n in enumerate(names)}))
    (data / "item_ids.json").write_text(json.dumps([0, 1, 2, 3]))
    jsonl(data / "test.jsonl", rows)
    return data


def crs_turn(dialog: str, index: int, **extra) -> dict:
    return {"context": ["", "Any thrillers?"], "resp": "Try Alien!", "rec": [1], "entity": [1], "prev_entity": [],
            "dialog_id": dialog, "turn_id": f"{dialog}_t{index}", "is_user": 0,
            "input": "\nUser: Any thrillers?\nSystem: "} | extra


def crs(rows, **knobs) -> Callable[[Path], Callable[[Path], str]]:
    def setup(folder: Path) -> Callable[[Path], str]:
        data = _crs_folder(folder, rows)
        extra = [f"task.{k}={v}" for k, v in knobs.items()]
        return task_steps("task=inspired", f"task.dataset_dir={data}", "task.limit=0", "task.n_knowledge=0",
                          "task.knowledge_source=none", *extra)
    return setup


def crs_catalogue(entities: dict) -> Callable[[Path], Callable[[Path], str]]:
    def setup(folder: Path) -> Callable[[Path], str]:
        data = _crs_folder(folder, [crs_turn("d1", 1)])
        (data / "entity2id.json").write_text(json.dumps(entities))
        return task_steps("task=inspired", f"task.dataset_dir={data}", "task.knowledge_source=none")
    return setup


def redial(conversations) -> Callable[[Path], Callable[[Path], str]]:
    def setup(folder: Path) -> Callable[[Path], str]:
        data = _crs_folder(folder, [crs_turn("d1", 1)])
        path = jsonl(folder / "train_data.jsonl", conversations)
        return task_steps("task=inspired", f"task.dataset_dir={data}", "task.limit=0", "task.n_knowledge=0",
                          "task.knowledge_source=redial_conversations", f"task.knowledge_path={path}")
    return setup


def conversation(cid: str, text="Then watch @1") -> dict:
    return {"conversationId": cid, "initiatorWorkerId": 7, "movieMentions": {"1": "Alien (1979)"},
            "messages": [{"text": "Any thrillers?", "senderWorkerId": 7}, {"text": text, "senderWorkerId": 9}]}


def pwc(rows, *overrides: str, raw: bytes | None = None) -> Callable[[Path], Callable[[Path], str]]:
    def setup(folder: Path) -> Callable[[Path], str]:
        path = folder / "pwc.jsonl"
        if raw is not None:
            path.write_bytes(raw)
        else:
            jsonl(path, rows)
        return task_steps("task=pwc", f"task.path={path}", *overrides)
    return setup


def editing(source: str, rows, as_list: bool = True, raw: bytes | None = None) -> Callable[[Path], Callable[[Path], str]]:
    def setup(folder: Path) -> Callable[[Path], str]:
        path = folder / f"{source}.json"
        if raw is not None:
            path.write_bytes(raw)
        elif as_list:
            path.write_text(json.dumps(rows, indent=1))
        else:
            jsonl(path, rows)
        return task_steps("task=editing", f"task.source={source}", f"task.path={path}", "task.n_train=0")
    return setup


def drift(questions: str | None = None, text: bytes | None = None) -> Callable[[Path], Callable[[Path], str]]:
    def setup(folder: Path) -> Callable[[Path], str]:
        overrides = ["task=synthetic", "task.n_contexts=1", "task.probes=[qa,drift]"]
        if questions is not None:
            (folder / "questions.tsv").write_text(questions)
            overrides.append(f"task.drift_questions={folder / 'questions.tsv'}")
        if text is not None:
            (folder / "generic.txt").write_bytes(text)
            overrides.append(f"task.drift_text={folder / 'generic.txt'}")
        return task_steps(*overrides)
    return setup


def regularisation(lines: list) -> Callable[[Path], Callable[[Path], str]]:
    def setup(folder: Path) -> Callable[[Path], str]:
        path = jsonl(folder / "regularisation.jsonl", lines)

        def run(_: Path) -> str:
            cfg = compose_config("model=tiny", "method=selfparam", "method.regularisation.source=file",
                                 f"method.regularisation.path={path}")
            method = build(cfg.method, "method", lm=None)  # the file is read without a model
            return f"accepted: {len(method._regularisation_texts())} text(s)"
        return run
    return setup


def csv_plugin(text: str) -> Callable[[Path], Callable[[Path], str]]:
    def setup(folder: Path) -> Callable[[Path], str]:
        import sys

        sys.path.insert(0, str(ROOT / "examples" / "plugin_task"))
        from csv_qa import CSVQATask

        path = folder / "facts.csv"
        path.write_text(text)
        return lambda _: str(len(CSVQATask(path=str(path)).steps()))
    return setup


def of(runner: Callable[[Path], str]) -> Callable[[Path], Callable[[Path], str]]:
    return lambda folder: runner


NESTED, BOUNDS, TYPES, EMPTY, DUPLICATES, DECODING = (
    "nested key", "bound", "field type", "empty after normalisation", "duplicate id", "decoding")
FT = ("model=tiny", "method=ft_sentences")

CASES: list[Case] = [
    # ---- 1. unknown / mistyped keys inside nested options
    Case(NESTED, "`+method.update.lora.rank=2` (peft calls it `r`)", of(config(*FT, "+method.update.lora.rank=2")),
         r"^method\.update\.lora\.rank: unknown option; known options: \['alpha', 'dropout', 'r', 'target_modules'\]$"),
    Case(NESTED, "`+method.update.moed=full` (misspelled `mode`)", of(config(*FT, "+method.update.moed=full")),
         r"^method\.update\.moed: unknown option; known options: \['lora', 'mode'\]$"),
    Case(NESTED, "`method.update.mode=lorra`", of(config(*FT, "method.update.mode=lorra")),
         r"^method\.update\.mode: expected one of 'lora', 'full', got 'lorra' \(str\)$"),
    Case(NESTED, "`+method.regularisation.sorce=file` (SELF-PARAM)",
         of(config("model=tiny", "method=selfparam", "+method.regularisation.sorce=file")),
         r"^method\.regularisation\.sorce: unknown option; known options: \[.*'source'.*\]$"),
    Case(NESTED, "`method.regularisation.source=web`", of(config("model=tiny", "method=selfparam", "method.regularisation.source=web")),
         r"^method\.regularisation\.source: expected one of 'auto', 'file', 'model', got 'web' \(str\)$"),
    Case(NESTED, "`method.regularisation.source=file` without a path",
         of(lambda _: str(build(compose_config("model=tiny", "method=selfparam", "method.regularisation.source=file",
                                               "method.regularisation.path=null").method,
                                "method", lm=None))),
         r"^method\.regularisation\.path: required when method\.regularisation\.source=file"),
    Case(NESTED, "`+method.sentences.generator.temprature=0.5` (sentence source)",
         of(config(*FT, "+method.sentences.generator.temprature=0.5")),
         r"^method\.sentences\.generator\.temprature: unknown option for methods\.sentences\.LocalGenerator; known options: "),
    Case(NESTED, "`+method.sentences.n_sentences=3` with `method/sentences=task` (a generator's option)",
         of(config(*FT, "method/sentences=task", "+method.sentences.n_sentences=3")),
         r"^method\.sentences\.n_sentences: unknown option for methods\.sentences\.TaskSentences; known options: \['n_pairs', 'sentence_template'\]$"),
    Case(NESTED, "`method.sentences.generator.top_p=1.5`", of(config(*FT, "method.sentences.generator.top_p=1.5")),
         r"^method\.sentences\.generator\.top_p: expected float > 0 and <= 1, got 1\.5 \(float\)$"),
    Case(NESTED, "`method.update.lora.target_modules=[]`", of(config(*FT, "method.update.lora.target_modules=[]")),
         r"^method\.update\.lora\.target_modules: expected a list of non-empty str with at least 1 item\(s\) or non-empty "
         r"str, got \[\] \(list\)$"),
    Case(NESTED, "`+method.retriever_k=3` on `method=rag_bm25` (retriever options)",
         of(config("model=tiny", "method=rag_bm25", "+method.retriever_k=3")),
         r"^method\.retriever_k: unknown option for methods\.rag\.RagBm25; known options: \[.*'top_k'.*\]$"),
    Case(NESTED, "`+resume.keep_checkpoint=true` (misspelled `keep_checkpoints`)",
         of(config("model=tiny", "+resume.keep_checkpoint=true")),
         r"^resume\.keep_checkpoint: unknown option; known options: \['checkpoint', 'keep_checkpoints', 'search_dir'\]$"),
    # ---- bounds on every knob
    Case(BOUNDS, "`method.epochs=0` (trained nothing, reported an adapter's storage)", of(config(*FT, "method.epochs=0")),
         r"^method\.epochs: expected int >= 1, got 0 \(int\)$"),
    Case(BOUNDS, "`method.lr=0`", of(config(*FT, "method.lr=0")), r"^method\.lr: expected float > 0, got 0 \(int\)$"),
    Case(BOUNDS, "`method.update.lora.r=0`", of(config(*FT, "method.update.lora.r=0")),
         r"^method\.update\.lora\.r: expected int >= 1, got 0 \(int\)$"),
    Case(BOUNDS, "`method.update.lora.dropout=1.5`", of(config(*FT, "method.update.lora.dropout=1.5")),
         r"^method\.update\.lora\.dropout: expected float >= 0 and < 1, got 1\.5 \(float\)$"),
    Case(BOUNDS, "`model.batch_size=0` (failed inside the LM: `range() arg 3 must not be zero`)",
         of(config("model=tiny", "model.batch_size=0")), r"^model\.batch_size: expected int >= 1, got 0 \(int\)$"),
    Case(BOUNDS, "`task.limit=-1` (silently meant all)", of(config("model=tiny", "task.limit=-1")),
         r"^task\.limit: expected int >= 0, got -1 \(int\)$"),
    Case(BOUNDS, "`task.mode=sideways`", of(config("model=tiny", "task.mode=sideways")),
         r"^task\.mode: expected one of 'single', 'batch', got 'sideways' \(str\)$"),
    Case(BOUNDS, "`method.teacher=student` (SELF-PARAM)", of(config("model=tiny", "method=selfparam", "method.teacher=student")),
         r"^method\.teacher: expected one of 'current', 'base', got 'student' \(str\)$"),
    Case(BOUNDS, "`method.top_k=0` (RAG)", of(config("model=tiny", "method=rag_bm25", "method.top_k=0")),
         r"^method\.top_k: expected int >= 1, got 0 \(int\)$"),
    Case(BOUNDS, "`method.index=annoy` (dense RAG)", of(config("model=tiny", "method=rag_dense", "method.index=annoy")),
         r"^method\.index: expected one of 'flat', 'hnsw', 'ivf', got 'annoy' \(str\)$"),
    Case(BOUNDS, "`method.threshold=1.5` (MEMOIR)", of(config("model=tiny", "method=memoir", "method.threshold=1.5")),
         r"^method\.threshold: expected float >= 0 and <= 1, got 1\.5 \(float\)$"),
    Case(BOUNDS, "`method.similarity=euclid` (RECIPE)", of(config("model=tiny", "method=recipe", "method.similarity=euclid")),
         r"^method\.similarity: expected one of 'cosine', 'dot', got 'euclid' \(str\)$"),
    Case(BOUNDS, "`task=editing task.source=zsr`", of(config("model=tiny", "task=editing", "task.source=zsr")),
         r"^task\.source: expected one of 'synthetic', 'zsre', 'counterfact', got 'zsr' \(str\)$"),
    Case(BOUNDS, "`task=sequential task.metric=bleu`", of(config("model=tiny", "task=sequential", "task.metric=bleu")),
         r"^task\.metric: expected one of 'qa_f1', 'exact_match', 'contains', got 'bleu' \(str\)$"),
    Case(BOUNDS, "`task=inspired task.knowledge_fraction=1.0`",
         of(config("model=tiny", "task=inspired", "task.knowledge_fraction=1.0")),
         r"^task\.knowledge_fraction: expected float > 0 and < 1, got 1\.0 \(float\)$"),
    # ---- field types (null is not the text 'None')
    Case(TYPES, 'PwC `"answer": null`', pwc([PWC_OK | {"answer": None}]),
         r"pwc\.jsonl:1: field 'answer' must be a string, got null\."),
    Case(TYPES, 'PwC `"input": null`', pwc([PWC_OK | {"input": None}]),
         r"pwc\.jsonl:1: field 'input' must be a string, got null\."),
    Case(TYPES, "CounterFact `target_new: 42`", editing("counterfact", [CF | {"target_new": 42}]),
         r"counterfact\.json:2: field 'target_new' must be a string, got a number\."),
    Case(TYPES, "ZsRE `alt: null` (JSON lines)", editing("zsre", [ZSRE | {"alt": None}], as_list=False),
         r"zsre\.json:1: field 'alt' must be a string, got null\."),
    Case(TYPES, "CRS `rec` not a list", crs([crs_turn("d1", 1, rec=1)]),
         r"test\.jsonl:1: field 'rec' must be a list of item ids, got 1\."),
    Case(TYPES, "CRS `input: null`", crs([crs_turn("d1", 1, input=None)]),
         r"test\.jsonl:1: field 'input' must be a string, got null\."),
    Case(TYPES, "ReDial message `text: null`", redial([conversation("1", text=None)]),
         r"train_data\.jsonl:1: field 'text' must be a string, got null\."),
    Case(TYPES, 'SELF-PARAM regularisation file `{"text": null}`', regularisation([{"text": "fine"}, {"text": None}]),
         r"regularisation\.jsonl:2: field 'text' must be a string, got null\."),
    # ---- golds empty after normalisation: dropped and counted, or refused with file:line
    Case(EMPTY, 'PwC answer `"<s>"` beside a good row', pwc([PWC_OK, PWC_OK | {"prompt": "Q2?", "answer": "<s>"}]),
         r"^dropped and counted in the record: empty_answer=1$"),
    Case(EMPTY, 'PwC answer `"  "` and question `"<s>"`',
         pwc([PWC_OK, PWC_OK | {"prompt": "Q2?", "answer": "  "}, PWC_OK | {"prompt": "<s> "}]),
         r"^dropped and counted in the record: empty_question=1, empty_answer=1$"),
    Case(EMPTY, "`task=sequential_pwc`: a source row whose answer is `\"<s>\"`",
         of(lambda folder: task_steps("task=sequential_pwc", f"task.source.path={jsonl(folder / 'pwc.jsonl', [PWC_OK, PWC_OK | {'prompt': 'Q2?', 'answer': '<s>'}])}",
                                      "task.length=1")(folder)),
         r"^dropped and counted in the record: empty_answer=1$"),
    Case(EMPTY, "PwC file whose every answer is empty", pwc([PWC_OK | {"answer": "<s>"}, PWC_OK | {"prompt": "Q2", "answer": ""}]),
         r"^task 'pwc' has no contexts to inject \(check its data and filters\); dropped while loading: \{'empty_answer': 2\}$"),
    Case(EMPTY, "PwC empty context", pwc([PWC_OK | {"input": "<s>"}]),
         r"pwc\.jsonl:1: field 'input' \(the context\) is empty"),
    Case(EMPTY, "editing file whose only edit has an empty `target_new`", editing("counterfact", [CF | {"target_new": " "}]),
         r"found no edits in .*counterfact\.json; dropped: \{'empty_target': 1\}$"),
    Case(EMPTY, "CounterFact empty locality answer beside a good edit",
         editing("counterfact", [CF | {"locality_ground_truth": ""}, CF | {"case_id": 1}]),
         r"^dropped and counted in the record: empty_locality_pair=1$"),
    Case(EMPTY, "ZsRE empty `src` beside a good edit", editing("zsre", [ZSRE | {"src": " "}, ZSRE]),
         r"^dropped and counted in the record: empty_prompt=1$"),
    Case(EMPTY, "CRS gold whose title is empty", crs([crs_turn("d1", 1), crs_turn("d2", 1, rec=[3])]),
         r"^dropped and counted in the record: empty_gold_title=1, no_gold_left=1$"),
    Case(EMPTY, "drift questions file: a question with an empty answer", drift(questions="What is red?\tred\nWhy?\t \n"),
         r"questions\.tsv:2: 'Why\?' is not a question and a non-empty answer"),
    Case(EMPTY, 'CSV plugin answer `"|"` (nothing between separators)', csv_plugin("context,question,answer\nSome text.,Who?,|\n"),
         r"facts\.csv:2: the answer '\|' holds no answer between the '\|' separators"),
    # ---- duplicate ids
    Case(DUPLICATES, "CounterFact `case_id` 0 twice", editing("counterfact", [CF, CF | {"target_new": "German"}]),
         r"counterfact\.json:12: duplicate case_id '0', first at .*counterfact\.json:2; every case_id must be unique"),
    Case(DUPLICATES, "CRS turn (dialog_id, turn_id) twice", crs([crs_turn("d1", 1), crs_turn("d2", 1), crs_turn("d1", 1)]),
         r"test\.jsonl:3: duplicate turn \(dialog_id, turn_id\) 'd1/d1_t1', first at .*test\.jsonl:1"),
    Case(DUPLICATES, "CRS `entity2id.json` giving one id to two entities",
         crs_catalogue({URI.format("Heat"): 0, URI.format("Alien"): 0}),
         r"entity2id\.json: id 0 is given to both '<http://dbpedia\.org/resource/Heat>' and '<http://dbpedia\.org/resource/Alien>'"),
    Case(DUPLICATES, "ReDial `conversationId` twice", redial([conversation("5"), conversation("5")]),
         r"train_data\.jsonl:2: duplicate conversationId '5', first at .*train_data\.jsonl:1"),
    Case(DUPLICATES, "PwC row repeated", pwc([PWC_OK, PWC_OK, PWC_OK | {"prompt": "When?", "answer": "1911"}]),
         r"^dropped and counted in the record: duplicate_question=1$"),
    Case(DUPLICATES, "PwC same question, another answer", pwc([PWC_OK, PWC_OK | {"answer": "Rell"}]),
         r"pwc\.jsonl:2: the same question about the same context as .*pwc\.jsonl:1, with another answer"),
    Case(DUPLICATES, "PwC context reappearing after another context",
         pwc([PWC_OK, PWC_OK | {"input": "Other text.", "prompt": "Q?", "answer": "x"}, PWC_OK | {"prompt": "When?", "answer": "1911"}]),
         r"^dropped and counted in the record: repeated_context_merged=1$"),
    Case(DUPLICATES, "drift questions file: a question twice", drift(questions="What is red?\tred\nWhat is red?\tcrimson\n"),
         r"questions\.tsv:2: duplicate question 'What is red\?', first at .*questions\.tsv:1"),
    Case(DUPLICATES, "CSV plugin: a question twice about one context",
         csv_plugin("context,question,answer\nSome text.,Who?,Ann\nSome text.,Who?,Bo\n"),
         r"facts\.csv:3: duplicate question about this context \('Some text\.', 'Who\?'\), first at .*facts\.csv:2"),
    # ---- decoding: file:line, not a byte position
    Case(DECODING, "PwC file with a Latin-1 byte on line 2",
         pwc(None, raw=(json.dumps(PWC_OK) + "\n" + json.dumps(PWC_OK | {"prompt": "Q2?"})[:-2]).encode() + b'\xe9"}\n'),
         r"pwc\.jsonl:2: not UTF-8 text \(byte b'\\xe9'\)\. Save the file as UTF-8\."),
    Case(DECODING, "CounterFact JSON list with a bad byte on line 3",
         editing("counterfact", None, raw=b'[\n {"case_id": 0,\n  "prompt": "caf\xe9"}\n]\n'),
         r"counterfact\.json:3: not UTF-8 text"),
    Case(DECODING, "drift text file with a bad byte", drift(text=b"A plain sentence.\nAnother \xff one.\n"),
         r"generic\.txt:2: not UTF-8 text"),
    Case(DECODING, "PwC file saved with a byte-order mark (Windows editors)",
         pwc(None, raw="\ufeff".encode() + json.dumps(PWC_OK).encode() + b"\n"),
         r"^accepted, nothing dropped$"),
    Case(DECODING, "PwC line that is not JSON", pwc(None, raw=b'{"input": "x", "prompt": "q", "answer": "a"}\n{oops\n'),
         r"pwc\.jsonl:2: not valid JSON"),
]


def outcome(case: Case, folder: Path) -> str:
    runner = case.setup(folder)
    try:
        return runner(folder)
    except (KBenchError, ValueError) as err:
        return str(err)


def render(rows: list[tuple[Case, str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Bad input → what kbench says",
        "",
        "Generated by `tests/test_bad_input.py` from what the code actually does (the test fails when this",
        "file differs; regenerate with `KBENCH_WRITE_DOCS=1 python -m pytest tests/test_bad_input.py -k docs`).",
        "Config mistakes are refused before any data or model is loaded, naming the key and what it",
        "accepts; data mistakes name file:line; records whose required fields are empty after",
        "normalisation are dropped and counted in the record (`method_info.task.dropped`), never scored.",
        "`<dir>` stands for the folder the test wrote the file into.",
        "",
        "| # | kind | bad input | outcome (exact message) |",
        "|---|---|---|---|",
    ]
    # double backticks: messages quote field names in single backticks
    lines += [f"| {i} | {case.kind} | {cell(case.what)} | `` {cell(message)} `` |" for i, (case, message) in enumerate(rows, 1)]
    return "\n".join(lines) + "\n"


def test_docs_bad_input_table_matches_the_code(tmp_path):
    rows = []
    for index, case in enumerate(CASES):
        folder = tmp_path / f"c{index}"
        folder.mkdir()
        message = outcome(case, folder)
        assert re.search(case.expect, message), f"case {index + 1} ({case.what}): {message!r}"
        rows.append((case, message.replace(str(folder), "<dir>")))
    assert len(rows) >= 30
    text = render(rows)
    if os.environ.get("KBENCH_WRITE_DOCS"):
        DOC.write_text(text)
    assert DOC.is_file() and DOC.read_text() == text, (
        "docs/bad_input.md is out of date: KBENCH_WRITE_DOCS=1 python -m pytest tests/test_bad_input.py -k docs")


# ------------------------------------------------------------------------------------ end to end (tiny model)
def run(tmp_path: Path, *overrides: str) -> dict:
    try:
        Experiment(compose_config("model=tiny", "logger=none", *overrides), tmp_path,
                   names={"method": "m", "task": "t", "model": "tiny"}).run()
    except Exception:
        pass  # the record says what happened
    return read_record(tmp_path)


def test_a_mistyped_nested_key_fails_the_run_before_the_model_loads(tmp_path):
    record = run(tmp_path, "method=ft_sentences", "task.n_contexts=1", "+method.update.lora.rank=2")
    assert record["status"] == "failed"
    assert "ConfigError: method.update.lora.rank: unknown option" in record["error"]
    assert "load_model" not in record["timings"]  # refused before the model was built


@pytest.mark.parametrize("override", ["method.epochs=0", "model.batch_size=0", "task.limit=-1"])
def test_out_of_range_knobs_fail_the_run_naming_the_key(tmp_path, override):
    record = run(tmp_path, "method=ft_context", "task.n_contexts=1", override)
    key = override.split("=")[0]
    assert record["status"] == "failed" and f"ConfigError: {key}: expected int >= " in record["error"]
    assert "load_model" not in record["timings"]


def test_empty_golds_are_dropped_counted_and_never_scored(tmp_path):
    """An empty prediction used to score F1 = EM = 1.0 against a gold that "<s>" or spaces had become."""
    data = jsonl(tmp_path / "pwc.jsonl", [PWC_OK | {"prompt": "Q1?", "answer": "<s>"},
                                          PWC_OK | {"prompt": "Q2?", "answer": "  "},
                                          PWC_OK])
    record = run(tmp_path / "run", "method=base", "task=pwc", f"task.path={data}", "task.max_new_tokens=4")
    assert record["status"] == "done", record["error"]
    task = record["method_info"]["task"]
    assert task["n_questions"] == 1 and task["dropped"]["empty_answer"] == 2
    rows = [json.loads(line) for line in (tmp_path / "run" / "predictions.jsonl").read_text().splitlines()]
    assert [r["gold"] for r in rows] == [["Mara Venn"]]


def test_null_gold_fails_the_run_naming_file_and_line(tmp_path):
    data = jsonl(tmp_path / "pwc.jsonl", [PWC_OK, PWC_OK | {"prompt": "Q2?", "answer": None}])
    record = run(tmp_path / "run", "method=base", "task=pwc", f"task.path={data}")
    assert record["status"] == "failed" and f"{data}:2: field 'answer' must be a string, got null" in record["error"]


def counterfact_edits(n: int) -> list[dict]:
    subjects = ["Danielle Darrieux", "Toko Yasuda", "Edwin of Northumbria"]
    return [CF | {"case_id": i, "subject": subjects[i], "prompt": f"The mother tongue of {subjects[i]} is",
                  "locality_prompt": ["Michel Rocard is a native speaker of", "The capital of France is"][i % 2]}
            for i in range(n)]


def test_base_locality_is_exactly_one_with_unique_ids_and_duplicates_are_refused(tmp_path):
    """Item 5: with `case_id` 0 twice, the second edit overwrote the first's pre-edit reference and the
    untouched base model scored locality 0.75, with 2 rows in edits.csv for 3 edits."""
    unique = tmp_path / "cf.json"
    unique.write_text(json.dumps(counterfact_edits(3), indent=1))
    record = run(tmp_path / "unique", "method=base", "task=editing", "task.source=counterfact", f"task.path={unique}",
                 "task.n_train=0", "task.max_new_tokens=2")
    assert record["status"] == "done", record["error"]
    assert record["metrics"]["after_all/locality"] == 1.0
    assert len((tmp_path / "unique" / "edits.csv").read_text().splitlines()) == 1 + 3

    duplicated = tmp_path / "cf_dup.json"
    edits = counterfact_edits(3)
    edits[2]["case_id"] = 0
    duplicated.write_text(json.dumps(edits, indent=1))
    record = run(tmp_path / "dup", "method=base", "task=editing", "task.source=counterfact", f"task.path={duplicated}",
                 "task.n_train=0")
    assert record["status"] == "failed"
    assert re.search(rf"{duplicated}:\d+: duplicate case_id '0', first at {duplicated}:2", record["error"])


def test_a_broken_sentence_cache_entry_is_generated_again(tiny_lm, tmp_path, monkeypatch):
    """Cached generated sentences are an input too: an entry that is not a list of non-empty strings
    (edited or cut short by hand) is not trained on."""
    from core.io import cache_dir, stable_hash
    from core.types import Knowledge
    from methods.sentences import LocalGenerator

    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path / "cache"))  # after the model is built: only sentences move
    generator = build(compose_config("model=tiny", "method=ft_sentences", "method.sentences.generator.n_sentences=2",
                                     "method.sentences.generator.max_attempts=2",
                                     "method.sentences.generator.min_answer_prob=0").method.sentences.generator,
                      "method.sentences.generator")
    assert isinstance(generator, LocalGenerator)
    item = Knowledge("k", PWC_OK["input"])
    path = cache_dir("sentences") / f"{stable_hash([item.context, generator.identity(tiny_lm)])}.json"
    path.write_text(json.dumps(["", None]))
    sentences = generator(item, tiny_lm)
    assert sentences and all(isinstance(s, str) and s.strip() for s in sentences)
    assert json.loads(path.read_text()) == sentences
