"""`python -m runners.report`: tables (md / LaTeX / CSV) and plots from records on disk.

The records here are written with the real `RunRecord` (same schema as a run writes), with metrics
chosen so that every expected number is computed by hand in the test.
"""
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pandas as pd
import pytest

from core.records import RunRecord
from runners import report

ROOT = Path(__file__).resolve().parent.parent


def write_run(directory: Path, method: str, seed: int, metrics: dict, *, task: str = "synthetic", status: str = "done",
              error: str | None = None, inject: float = 1.0, storage: int = 0, steps: list | None = None,
              knobs: dict | None = None, started: str = "2026-01-01T00:00:00+00:00") -> Path:
    config = {"seed": seed, "method": {"name": method, "seed": seed, **(knobs or {})}, "task": {"name": task},
              "model": {"name": "tiny"}, "logger": {"mode": "offline"}}
    record = RunRecord(run_id=f"{method}-{task}-{seed}-{json.dumps(knobs, sort_keys=True)}", config=config,
                       method=method, task=task, model="tiny", seed=seed, status=status, error=error,
                       metrics=metrics if status == "done" else {}, timings={"inject": inject},
                       extra_storage_bytes=storage, steps=steps or [], started_at=started,
                       finished_at=None if status == "running" else started)
    record.write(directory)
    return directory


def steps_of(*values: float) -> list[dict]:
    return [{"index": i, "label": f"c{i}", "metrics": {"qa_f1": v}} for i, v in enumerate(values)]


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    """2 methods x 2 seeds done, plus one failed and one killed run of a third setting."""
    root = tmp_path / "multirun"
    write_run(root / "0", "base", 0, {"qa_f1": 0.0, "exact_match": 0.0}, steps=steps_of(0.0, 0.0, 0.0))
    write_run(root / "1", "base", 1, {"qa_f1": 0.2, "exact_match": 0.0}, steps=steps_of(0.1, 0.2, 0.3))
    write_run(root / "2", "ft_sentences", 0, {"qa_f1": 0.5, "exact_match": 0.25}, inject=10.0, storage=2_500_000,
              steps=steps_of(0.9, 0.6, 0.5))
    write_run(root / "3", "ft_sentences", 1, {"qa_f1": 0.7, "exact_match": 0.75}, inject=14.0, storage=2_500_000,
              steps=steps_of(0.8, 0.7, 0.7))
    write_run(root / "4", "selfparam", 0, {}, status="failed", error="NonFiniteLossError: loss became nan\nmore")
    write_run(root / "5", "selfparam", 1, {}, status="running")
    return root


def test_markdown_aggregates_seeds_into_rows_and_lists_failures(sweep):
    text = report.render([sweep])
    table = [line for line in text.splitlines() if line.startswith("|")]
    assert len(table) == 2 + 2  # header, separator, one row per method
    base = next(line for line in table if "| base " in line)
    ft = next(line for line in table if "| ft_sentences " in line)
    # base: F1 0.0 and 0.2 -> mean 0.100, sample std 0.141; ft: 0.5, 0.7 -> 0.600 ± 0.141; EM 0.25, 0.75 -> 0.500 ± 0.354
    assert "0.100 ± 0.141" in base and "| 2 " in base
    assert "0.600 ± 0.141" in ft and "0.500 ± 0.354" in ft
    assert "12.0" in ft and "2.5 MB" in ft  # inject seconds (mean of 10 and 14), storage
    assert "selfparam" not in "\n".join(table)
    assert "Failed or unfinished runs (2):" in text
    assert "selfparam / synthetic / tiny / seed 0: failed: NonFiniteLossError: loss became nan" in text
    assert "more" not in text  # only the first line of the reason
    assert "seed 1: running: unfinished" in text


def test_attempts_of_one_run_count_once_and_links_are_followed(sweep, tmp_path):
    # an earlier failed attempt of base seed 0, and a later sweep folder linking to the done record
    write_run(tmp_path / "old", "base", 0, {}, status="failed", error="RuntimeError: killed", started="2025-01-01")
    later = tmp_path / "later" / "0"
    later.mkdir(parents=True)
    os.symlink(os.path.relpath(sweep / "0" / "record.json", later), later / "record.json")
    runs = report.load_runs([sweep, tmp_path / "old", tmp_path / "later"])
    assert len(runs.records) == 6 and runs.superseded == 1
    only_later = report.render([tmp_path / "later"])
    assert "| base " in only_later and "| 1 " in only_later  # the link alone makes a row


def test_unreadable_and_broken_records_are_reported_not_fatal(sweep):
    (sweep / "6").mkdir()
    (sweep / "6" / "record.json").write_text('{"run_id": "x", "status": "do')
    (sweep / "7").mkdir()
    os.symlink("../nowhere/record.json", sweep / "7" / "record.json")
    text = report.render([sweep])
    assert "unreadable record" in text and "JSONDecodeError" in text and "broken link" in text
    assert "| ft_sentences " in text


def test_settings_that_differ_in_a_knob_are_separate_rows(tmp_path):
    for seed, f1 in ((0, 0.4), (1, 0.6)):
        write_run(tmp_path / f"a{seed}", "ft_sentences", seed, {"qa_f1": f1}, knobs={"lr": 0.001})
        write_run(tmp_path / f"b{seed}", "ft_sentences", seed, {"qa_f1": f1 / 2}, knobs={"lr": 0.0005})
    table = report.summarize(report.runs_frame(report.load_runs([tmp_path]).records))
    assert sorted(table["variant"]) == ["method.lr=0.0005", "method.lr=0.001"]
    assert list(table["n"]) == [2, 2]
    assert table.set_index("variant").loc["method.lr=0.001", "qa_f1_mean"] == pytest.approx(0.5)


def test_a_label_names_a_folder_of_runs_and_refuses_a_folder_of_two_settings(tmp_path, capsys):
    for seed, f1 in ((0, 0.4), (1, 0.6)):
        write_run(tmp_path / "fast" / f"s{seed}", "ft_sentences", seed, {"qa_f1": f1}, knobs={"lr": 0.001, "batch_size": 4})
        write_run(tmp_path / "slow" / f"s{seed}", "ft_sentences", seed, {"qa_f1": f1 / 2}, knobs={"lr": 2e-5, "batch_size": 1})
    table = report.summarize(report.runs_frame(report.load_runs([tmp_path], {tmp_path / "slow": "reference"}).records))
    # the labelled setting shows its name, the other its knobs; seeds still average within each
    assert sorted(table["variant"]) == ["method.batch_size=4, method.lr=0.001", "reference"]
    assert table.set_index("variant").loc["reference", "qa_f1_mean"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="2 settings"):
        report.load_runs([tmp_path], {tmp_path: "both"})
    assert report.main([str(tmp_path), "--label", "nonsense"]) == 2
    assert "DIR=NAME" in capsys.readouterr().err
    assert report.main([str(tmp_path), "--label", f"{tmp_path / 'fast'}=CPU default"]) == 0
    assert "| CPU default " in capsys.readouterr().out


def test_csv_has_numeric_means_and_stds(sweep):
    frame = pd.read_csv(io.StringIO(report.render([sweep], "csv")))
    row = frame.set_index("method").loc["ft_sentences"]
    assert row["n"] == 2 and row["qa_f1_mean"] == pytest.approx(0.6) and row["qa_f1_std"] == pytest.approx(0.1414, abs=1e-4)
    assert row["extra_storage_bytes_mean"] == 2_500_000 and row["inject_s_mean"] == pytest.approx(12.0)
    assert "selfparam" not in set(frame["method"])


def test_metrics_option_selects_columns_and_rejects_unknown(sweep):
    text = report.render([sweep], metrics=["exact_match"])
    assert "exact_match" in text and "qa_f1" not in text
    with pytest.raises(ValueError, match="no finished run has metric"):
        report.render([sweep], metrics=["recall@1"])


def test_latex_is_a_plain_tabular(sweep):
    latex = report.render([sweep], "latex")
    body = latex.split("\\end{tabular}")[0]
    assert latex.startswith("% synthetic\n\\begin{tabular}{llllllll}")  # task method model n qa_f1 exact_match inject storage
    assert "toprule" not in latex and body.count("\\hline") == 3
    assert "ft\\_sentences" in latex and "qa\\_f1" in latex  # escaped
    assert "0.600 $\\pm$ 0.141" in latex
    assert all(line.startswith("%") for line in latex.split("\\end{tabular}")[1].strip().splitlines())


@pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex is not installed (apt-get install texlive-latex-base)")
def test_latex_compiles_with_pdflatex(sweep, tmp_path):
    (tmp_path / "table.tex").write_text(report.render([sweep], "latex"))
    (tmp_path / "doc.tex").write_text("\\documentclass{article}\n\\begin{document}\n\\input{table.tex}\n\\end{document}\n")
    result = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000


def test_plots_a_retention_curve_only_for_cumulative_tasks_and_one_panel_chart_per_task(sweep, tmp_path):
    write_run(sweep / "8", "base", 0, {"recall@1": 0.1}, task="inspired")  # single step: no retention plot
    cumulative = [{"index": i, "label": "", "metrics": {"injections": float(i + 1), "qa_f1_injected": 1.0 - i / 4}}
                  for i in range(3)]
    write_run(sweep / "9", "base", 0, {"qa_f1": 0.5}, task="sequential", steps=cumulative)
    files = report.plot([sweep], tmp_path / "plots")
    # synthetic has several steps, but each starts from a reset: a line across them would mean nothing
    assert sorted(f.name for f in files) == ["metrics_inspired.png", "metrics_sequential.png", "metrics_synthetic.png",
                                             "retention_sequential.png"]
    for file in files:
        image = matplotlib.image.imread(file)
        assert file.stat().st_size > 0 and 100 < image.shape[0] and 100 < image.shape[1] < 2000


def test_sequential_curves_use_injections_and_the_injected_mean():
    """Sequential tasks log `injections` and `qa_f1_injected` per step; two sequences share the x axis."""
    steps = [{"index": i, "label": "", "metrics": {"injections": float(j), **({"qa_f1_injected": v} if j else {})}}
             for i, (j, v) in enumerate([(0, None), (1, 0.8), (2, 0.6), (0, None), (1, 0.4), (2, 0.2)])]
    record = {"method": "ft_sentences", "model": "tiny", "task": "sequential", "config": {}, "run_id": "r", "steps": steps}
    curves = report.plots._step_curves([record], "qa_f1")
    assert curves.groupby("x")["value"].mean().to_dict() == pytest.approx({1.0: 0.6, 2.0: 0.4})
    assert set(curves["x_name"]) == {"contexts injected"}


def test_cli_writes_the_table_and_plots_and_fails_clearly_on_an_empty_folder(sweep, tmp_path):
    run = lambda *a: subprocess.run([sys.executable, "-m", "runners.report", *map(str, a)], cwd=ROOT,  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    result = run(sweep, "--out", tmp_path / "out" / "table.md", "--plot")
    assert result.returncode == 0, result.stderr
    assert "0.600 ± 0.141" in (tmp_path / "out" / "table.md").read_text()
    assert [p.name for p in (tmp_path / "out").glob("*.png")] == ["metrics_synthetic.png"]
    (tmp_path / "empty").mkdir()
    result = run(tmp_path / "empty")
    assert result.returncode == 2 and "no record.json found" in result.stderr


def test_real_runs_average_over_seeds_and_a_rescoring_is_a_setting_of_its_own(tmp_path):
    """Two seeds of a real (tiny) run share a row, whatever the seed reached through interpolation
    (method.seed: ${seed}); rescoring both with the same override makes a second row, not a third seed."""
    from runners.experiment import Experiment
    from runners.rescore import rescore
    from tests.conftest import compose_config

    overrides = ["model=tiny", "logger=none", "task=sequential", "task.n_sequences=1", "task.length=2",
                 "task.source.n_contexts=2", "method=ft_context", "method.epochs=1"]
    for seed in (0, 1):
        Experiment(compose_config(*overrides, f"seed={seed}"), tmp_path / f"s{seed}",
                   names={"method": "ft_context", "task": "sequential", "model": "tiny"}).run()
        rescore(tmp_path / f"s{seed}", ["task.metric=exact_match"])
    table = report.summarize(report.runs_frame(report.load_runs([tmp_path]).records))
    assert list(table["n"]) == [2, 2]
    assert sorted(table["variant"]) == ["task.metric=exact_match", "task.metric=qa_f1"]


# ------------------------------------------------------------------ a mixed folder, as a new user's sweep leaves it
HYDRA_ERROR = ("InstantiationException: Error in call to target 'methods.memoir.MemoirMethod':\n"
               "ValueError('method.layer=-3 is out of range: the model has 2 layers')\nfull_key: method")
CHAINED_TRACE = """Traceback (most recent call last):
  File "/x/hydra/_internal/instantiate/_instantiate2.py", line 92, in _call_target
    return _target_(*args, **kwargs)
           ^^^^^^^^^^^^^^^^^^^^^^^^^
ValueError: method.layer=-3 is out of range: the model has 2 layers

The above exception was the direct cause of the following exception:

Traceback (most recent call last):
  File "/x/runners/experiment.py", line 95, in run
    self._run()
hydra.errors.InstantiationException: Error in call to target 'methods.memoir.MemoirMethod':
ValueError('method.layer=-3 is out of range: the model has 2 layers')
"""
SIDE = {"near_miss/leak_rate": 0.5, "near_miss/n_probes": 12.0, "drift/ppl_ratio": 1.25, "drift/next_token_acc_ratio": 0.9,
        "drift/general_agreement_tf": 0.75, "drift/general_agreement_gen": 0.5, "drift/general_qa_f1": 0.25,
        "drift/general_exact_match": 0.125}


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    root = tmp_path / "mixed"
    methods = ["base", "context", "rag_bm25", "rag_dense", "ft_context", "ft_sentences", "selfparam", "recipe"]
    for i, method in enumerate(methods):
        if method != "ft_sentences":
            write_run(root / f"syn{i}", method, 0, {"qa_f1": 0.5, "exact_match": 0.25, "contains": 0.5, **SIDE})
        write_run(root / f"edit{i}", method, 0, {"reliability": 0.5, "generality": 0.25, "locality": 1.0,
                                                 "portability": 0.0}, task="editing")
        write_run(root / f"crs{i}", method, 0, {"recall@1": 0.1, "recall@10": 0.3, "recall@50": 0.5,
                                                "mean_items_listed": 7.5}, task="inspired")
        write_run(root / f"seq{i}", method, 0, {"qa_f1": 0.4, "retention": 0.3, "forgetting": 0.2, "efficacy": 0.9},
                  task="sequential", steps=[{"index": j, "label": "", "metrics": {"injections": float(j + 1),
                                                                                  "qa_f1_injected": 0.5}}
                                            for j in range(3)])
    for lr in (0.001, 0.0005):  # two settings of one method: a variant column
        write_run(root / f"lr{lr}", "ft_sentences", 0, {"qa_f1": 0.5, **SIDE}, knobs={"lr": lr})
    write_run(root / "bad", "memoir", 0, {}, status="failed", error=HYDRA_ERROR)
    return root


def test_a_mixed_folder_gives_one_readable_table_per_task_with_its_own_metrics(mixed):
    text = report.render([mixed])
    assert max(map(len, text.splitlines())) < 200, max(text.splitlines(), key=len)
    sections = {block.split("\n", 1)[0]: block for block in text.split("### ")[1:]}
    assert set(sections) >= {"editing", "inspired", "sequential", "synthetic"}
    assert "reliability" in sections["editing"] and "qa_f1" not in sections["editing"]
    assert "recall@10" in sections["inspired"] and "reliability" not in sections["inspired"]
    assert "retention" in sections["sequential"] and "near_miss" not in sections["sequential"]
    # synthetic's 11 metrics do not fit one 200-character row: the side-effect groups continue below it
    continued = [title for title in sections if title.startswith("synthetic (continued")]
    assert continued and all("–" not in sections[t] for t in continued)
    shown = " ".join(sections[t] for t in ["synthetic", *continued])
    assert all(name in shown for name in ["qa_f1", "contains", *SIDE])
    assert "| ft_sentences | tiny    | method.lr=0.001  |" in sections["synthetic"]


def test_failure_reasons_show_the_root_cause_not_the_wrapper(mixed):
    text = report.render([mixed])
    assert "memoir / synthetic / tiny / seed 0: failed: ValueError: method.layer=-3 is out of range: the model has 2 layers" in text
    assert "Error in call to target" not in text
    assert report.root_cause("InstantiationException: wrapped", CHAINED_TRACE) == (
        "ValueError: method.layer=-3 is out of range: the model has 2 layers")
    assert report.root_cause("NonFiniteLossError: loss became nan\nmore") == "NonFiniteLossError: loss became nan"
    assert report.root_cause(None) == "no error recorded"


def test_mixed_plots_stay_under_2000_px_and_keep_counts_off_the_rate_axes(mixed, tmp_path):
    files = report.plot([mixed], tmp_path / "plots")
    assert sorted(f.name for f in files) == ["metrics_editing.png", "metrics_inspired.png", "metrics_sequential.png",
                                             "metrics_synthetic.png", "retention_sequential.png"]
    for file in files:
        height, width = matplotlib.image.imread(file).shape[:2]
        assert 100 < width < 2000 and 100 < height < 2000, (file.name, width, height)


# ---------------------------------------------------------------------- uncertainty, baseline marks, --compare
def write_scored_run(directory: Path, method: str, seed: int, hits: list[float], se: float, ci: list[float]) -> Path:
    """A run whose record holds `metric_uncertainty` and whose predictions.jsonl has one qa_f1 per probe."""
    write_run(directory, method, seed, {"qa_f1": sum(hits) / len(hits)})
    record = json.loads((directory / "record.json").read_text())
    record["metric_uncertainty"] = {"qa_f1": {"se": se, "ci95": ci, "n_units": len(hits), "unit": "question"}}
    (directory / "record.json").write_text(json.dumps(record))
    (directory / "predictions.jsonl").write_text("".join(
        json.dumps({"step": 0, "probe_set": "qa", "probe_id": f"q{i}", "knowledge_id": f"c{i}", "prompt": f"Q{i}?",
                    "metrics": {"qa_f1": h}}) + "\n" for i, h in enumerate(hits)))
    return directory


def test_cells_show_mean_and_standard_error_with_seeds_combined(tmp_path):
    write_scored_run(tmp_path / "a0", "ft_sentences", 0, [1.0, 0.0, 1.0, 0.0, 0.0], 0.1, [0.2, 0.6])  # 0.4
    write_scored_run(tmp_path / "a1", "ft_sentences", 1, [1.0, 1.0, 1.0, 0.0, 0.0], 0.1, [0.4, 0.8])  # 0.6
    write_scored_run(tmp_path / "b0", "base", 0, [1.0, 1.0, 0.0, 0.0, 0.0], 0.05, [0.3, 0.5])  # 0.4
    # two seeds: sqrt(mean(0.1^2, 0.1^2) + var(0.4, 0.6) / 2) = sqrt(0.01 + 0.02 / 2) = 0.1414
    assert report.combined_se([0.4, 0.6], [0.1, 0.1]) == pytest.approx(0.02 ** 0.5)
    text = report.render([tmp_path])
    assert "0.500 ± 0.141" in text and "0.400 ± 0.050" in text and "bootstrap standard error" in text
    intervals = report.render([tmp_path], interval=True)
    # one run: its stored interval; two: mean ± 1.96 se = 0.5 ± 0.277
    assert "0.400 [0.300, 0.500]" in intervals and "0.500 [0.223, 0.777]" in intervals
    frame = pd.read_csv(io.StringIO(report.render([tmp_path], "csv"))).set_index("method")
    assert frame.loc["base", "qa_f1_se"] == pytest.approx(0.05)


def test_baseline_marks_cells_that_differ_in_a_paired_test_and_compare_delegates(tmp_path, capsys):
    zeros, same = [0.0] * 10, [0.0] * 9 + [1.0]
    write_scored_run(tmp_path / "base", "base", 0, zeros, 0.0, [0.0, 0.0])
    write_scored_run(tmp_path / "good", "ft_sentences", 0, [1.0] * 8 + [0.0] * 2, 0.13, [0.5, 1.0])  # +0.8
    write_scored_run(tmp_path / "near", "context", 0, same, 0.09, [0.0, 0.3])  # +0.1: one probe, p = 1
    table = report.render([tmp_path], baseline="base")
    rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| synthetic")}
    assert "0.800 ± 0.130*" in rows["ft_sentences"]
    assert "*" not in rows["context"] and "*" not in rows["base"]
    assert "differs from base" in table
    assert report.main([str(tmp_path), "--compare", "base,ft_sentences"]) == 0
    out = capsys.readouterr().out
    assert "ft_sentences − base" in out and "0.8000" in out and "| qa_f1 " in out
    assert report.main([str(tmp_path), "--compare", f"{tmp_path / 'base'},{tmp_path / 'near'}"]) == 0
    assert "0.1000" in capsys.readouterr().out
    assert report.main([str(tmp_path), "--compare", "base,rag_bm25"]) == 2
    assert "no finished run of method 'rag_bm25'" in capsys.readouterr().err
    write_scored_run(tmp_path / "good2", "ft_sentences", 0, [1.0] * 10, 0.0, [1.0, 1.0])
    record = json.loads((tmp_path / "good2" / "record.json").read_text())
    (tmp_path / "good2" / "record.json").write_text(json.dumps(record | {"run_id": "other", "group_id": "other"}))
    assert report.main([str(tmp_path), "--compare", "base,ft_sentences"]) == 2
    assert "several runs" in capsys.readouterr().err


def test_cost_table_shows_per_item_and_per_query_costs_and_overhead_over_base(tmp_path):
    def with_cost(directory: Path, method: str, seed: int, **cost) -> None:
        write_run(directory, method, seed, {"qa_f1": 0.5})
        record = json.loads((directory / "record.json").read_text())
        record["cost"] = {"inject_seconds_per_item": 0.0, "peak_rss_bytes": 1_000_000_000, "extra_storage_bytes": 0,
                          "parallel_jobs": 1, "max_load_average": 0.5} | cost
        (directory / "record.json").write_text(json.dumps(record))

    with_cost(tmp_path / "b", "base", 0, answer_seconds_per_query=0.010)
    with_cost(tmp_path / "f0", "ft_sentences", 0, answer_seconds_per_query=0.012, inject_seconds_per_item=3.0)
    with_cost(tmp_path / "f1", "ft_sentences", 1, answer_seconds_per_query=0.014, inject_seconds_per_item=5.0,
              peak_rss_bytes=3_000_000_000, extra_storage_bytes=2_000_000)
    with_cost(tmp_path / "r0", "rag_bm25", 0, answer_seconds_per_query=0.030, parallel_jobs=2)
    table = report.cost_table(report.runs_frame(report.load_runs([tmp_path]).records), "synthetic").set_index("method")
    ft = table.loc["ft_sentences"]
    # means over the two seeds: 4 s per item, 13 ms per query = +3 ms over base's 10 ms, 2 GB peak, 1 MB stored
    assert (ft["inject s/item"], ft["answer ms/query"], ft["vs base ms/query"]) == ("4.00", "13.0", "+3.0")
    assert (ft["peak RSS"], ft["extra storage"], ft["machine"]) == ("2.0 GB", "1.0 MB", "alone")
    rag = table.loc["rag_bm25"]  # it shared the machine with another job: no overhead against a run that did not
    assert rag["machine"] == "shared (n_jobs 2)" and rag["vs base ms/query"] == "– (machine differs)"
    assert "peak GPU" not in table.columns  # no CUDA run
    assert "### synthetic: cost" in report.render([tmp_path], cost=True)
    # a record with no load sample cannot show that it had the machine alone
    with_cost(tmp_path / "c0", "context", 0, answer_seconds_per_query=0.020, max_load_average=None)
    table = report.cost_table(report.runs_frame(report.load_runs([tmp_path]).records), "synthetic").set_index("method")
    assert table.loc["context", "machine"] == "unknown (no load sampled)"
    # a run on 1 of 2 torch threads (OMP_NUM_THREADS=1) is timed on another machine than one on both
    with_cost(tmp_path / "t0", "rag_dense", 0, answer_seconds_per_query=0.020, cpu_count=2, torch_threads=1)
    with_cost(tmp_path / "t1", "rag_dense", 1, answer_seconds_per_query=0.020, cpu_count=2, torch_threads=2)
    table = report.cost_table(report.runs_frame(report.load_runs([tmp_path]).records), "synthetic").set_index("method")
    assert table.loc["rag_dense", "machine"] == "alone, 1 of 2 torch threads"
    assert table.loc["rag_dense", "vs base ms/query"] == "– (machine differs)"


def test_plot_draws_editing_scores_along_the_stream(tmp_path):
    for seed, last in ((0, 0.5), (1, 0.7)):
        write_run(tmp_path / f"m{seed}", "memoir", seed, {"after_all/reliability_tf": last}, task="editing")
        record = json.loads((tmp_path / f"m{seed}" / "record.json").read_text())
        record["task_report"] = {"stream": {"edits_injected": [1, 2, 3], "curves": {
            "reliability_tf": [1.0, 0.75, last], "generality_tf": [0.5, 0.5, 0.4], "locality": [1.0, 0.9, 0.8]}}}
        (tmp_path / f"m{seed}" / "record.json").write_text(json.dumps(record))
    curves = report.plots._stream_curves(report.load_runs([tmp_path]).records)
    assert len(curves) == 2 * 3 * 3
    last = curves[(curves["family"] == "reliability_tf") & (curves["x"] == 3)]["value"]
    assert last.mean() == pytest.approx(0.6)
    written = report.plot([tmp_path], tmp_path / "plots")
    assert tmp_path / "plots" / "stream_editing.png" in written
    assert matplotlib.image.imread(tmp_path / "plots" / "stream_editing.png").shape[1] < 2000


def test_a_method_off_its_reference_is_named_in_the_protocols_and_under_the_table(tmp_path):
    from methods.base import Method
    from runners.results import final_results

    class Editor(Method):
        reference = {"lr": 1.0, "epochs": 30}

        def __init__(self, lr: float, epochs: int) -> None:
            self.lr, self.epochs = lr, epochs

    assert Editor(1.0, 30).reference_deviations() == {}
    deviations = Editor(0.5, 30).reference_deviations()
    assert deviations == {"lr": "0.5 (reference: 1.0)"}

    class OneMetric:
        def summarize(self, results):
            return {"qa_f1": 0.5}

        def metric_protocols(self, results=()):
            return {"qa_f1": "generate/squad-token-f1"}

        def metric_samples(self, results):
            return {}

        def report(self, results, output_dir):
            return {}

    final = final_results(OneMetric(), [], tmp_path, deviations)
    assert final["metric_protocols"]["qa_f1"] == (
        "generate/squad-token-f1; method deviates from its reference: lr=0.5 (reference: 1.0)")
    assert final_results(OneMetric(), [], tmp_path)["metric_protocols"]["qa_f1"] == "generate/squad-token-f1"

    write_run(tmp_path / "a", "memoir", 0, {"qa_f1": 0.5})
    write_run(tmp_path / "b", "memoir", 0, {"qa_f1": 0.4}, knobs={"lr": 0.5})
    record_path = tmp_path / "b" / "record.json"
    record = json.loads(record_path.read_text())
    record_path.write_text(json.dumps(record | {"method_deviations": deviations}))
    text = report.render([tmp_path])
    assert "memoir method.lr=0.5: deviates from its reference: lr=0.5 (reference: 1.0)" in text
    assert text.count("deviates from its reference") == 1
