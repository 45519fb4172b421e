"""Methods and tasks as plugins from outside the repository: the guides' own commands, run for real.

The example folders are copied out of the repository first, so nothing here can work by accident
through kbench's own packages. The commands are the ones printed in docs/adding_a_method.md and
docs/adding_a_task.md (the tests assert that), with the folder replaced by the copy and tiny-model
overrides appended.
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.types import DataError, GenerationSpec, Knowledge, Query
from runners import report
from tests.conftest import ROOT

METHOD_GUIDE = ROOT / "docs" / "adding_a_method.md"
TASK_GUIDE = ROOT / "docs" / "adding_a_task.md"
METHOD_RUN = ("PYTHONPATH=examples/plugin_method python run.py -m method=context,recent_context "
              "'hydra.searchpath=[file://examples/plugin_method/conf]'")
TASK_RUN = ("PYTHONPATH=examples/plugin_task python run.py -m task=csv_qa method=base,context "
            "'hydra.searchpath=[file://examples/plugin_task/conf]'")
REPORT_RUN = "python -m runners.report outputs/multirun"
TINY = "model=tiny logger=none resume.search_dir=null"


def copy_outside(example: str, tmp_path: Path) -> Path:
    target = tmp_path / "my_plugins" / example
    shutil.copytree(ROOT / "examples" / example, target, ignore=shutil.ignore_patterns("__pycache__"))
    assert ROOT not in target.parents
    return target


def run_guide(command: str, example: str, plugin: Path, outputs: Path, extra: str = "") -> subprocess.CompletedProcess:
    """A guide's shell command with the plugin folder moved, `python` = this interpreter, outputs in tmp."""
    command = command.replace(f"examples/{example}", str(plugin)).replace("outputs/multirun", str(outputs))
    command = command.replace("python ", f"{sys.executable} ", 1)
    return subprocess.run(["bash", "-c", f"{command} {extra}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"TQDM_DISABLE": "1"})


def test_the_guides_print_the_commands_these_tests_run():
    method_guide, task_guide = METHOD_GUIDE.read_text(), TASK_GUIDE.read_text()
    assert METHOD_RUN in method_guide and REPORT_RUN in method_guide
    assert TASK_RUN in task_guide and REPORT_RUN in task_guide


def test_method_plugin_from_outside_the_repo_runs_in_a_sweep_and_reaches_the_report(tmp_path):
    plugin = copy_outside("plugin_method", tmp_path)
    outputs = tmp_path / "outputs"
    result = run_guide(METHOD_RUN, "plugin_method", plugin, outputs,
                       f"{TINY} task.limit=2 hydra.sweep.dir={outputs}/sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    records = report.load_runs([outputs]).records
    assert sorted(r["method"] for r in records) == ["context", "recent_context"]
    assert all(r["status"] == "done" for r in records)
    plugin_run = next(r for r in records if r["method"] == "recent_context")
    assert plugin_run["config"]["method"]["_target_"] == "recent_context.RecentContextMethod"
    assert plugin_run["extra_storage_bytes"] > 0  # the kept context text

    shown = run_guide(REPORT_RUN, "plugin_method", plugin, outputs)
    assert shown.returncode == 0, shown.stderr
    assert "| recent_context " in shown.stdout and "| context " in shown.stdout


def test_task_plugin_from_outside_the_repo_runs_in_a_sweep_and_reaches_the_report(tmp_path):
    plugin = copy_outside("plugin_task", tmp_path)
    outputs = tmp_path / "outputs"
    result = run_guide(TASK_RUN, "plugin_task", plugin, outputs, f"{TINY} hydra.sweep.dir={outputs}/sweep")
    assert result.returncode == 0, result.stderr[-3000:]
    records = report.load_runs([outputs]).records
    assert sorted((r["task"], r["method"], r["status"]) for r in records) == [("csv_qa", "base", "done"),
                                                                                ("csv_qa", "context", "done")]
    assert records[0]["method_info"]["task"]["n_contexts"] == 3 and records[0]["method_info"]["task"]["n_questions"] == 6
    shown = run_guide(REPORT_RUN, "plugin_task", plugin, outputs)
    assert "| csv_qa " in shown.stdout


@pytest.fixture()
def plugin_modules(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "plugin_method"))
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "plugin_task"))
    from csv_qa import CSVQATask
    from recent_context import RecentContextMethod

    return RecentContextMethod, CSVQATask


def test_recent_context_keeps_a_window_and_answers_from_it(plugin_modules, tiny_lm, tmp_path):
    RecentContextMethod, _ = plugin_modules
    method = RecentContextMethod(tiny_lm, window=1)
    method.inject([Knowledge("a", " Brask bells")])
    method.inject([Knowledge("b", " Velmora founded")])
    assert method.contexts == [" Velmora founded"] and method.extra_storage_bytes() == len(" Velmora founded")
    answer = method.answer([Query("q", " Velmora")], GenerationSpec(max_new_tokens=2, stop=()))[0].text
    assert answer.startswith("founded")  # the tiny model copies from the kept context
    wider = RecentContextMethod(tiny_lm, window=2)
    for item in ("a", "b", "c"):
        wider.inject([Knowledge(item, f"context {item}")])
    assert wider.contexts == ["context b", "context c"]
    assert method.save_state(tmp_path) is True
    restored = RecentContextMethod(tiny_lm, window=2)
    restored.load_state(tmp_path)
    assert restored.contexts == method.contexts
    method.reset()
    assert method.contexts == [] and method.extra_storage_bytes() == 0
    with pytest.raises(ValueError, match=r"method.window: expected int >= 1, got 0 \(int\)"):
        RecentContextMethod(tiny_lm, window=0)


def test_csv_task_groups_rows_by_context_and_names_bad_lines(plugin_modules, tmp_path):
    _, CSVQATask = plugin_modules
    steps = CSVQATask().steps()
    assert len(steps) == 3 and all(step.reset_before for step in steps)
    first = steps[0].probe_sets[0].probes
    assert len(first) == 3 and first[1].answers == ("Ansel Quirk", "Quirk")
    bad = tmp_path / "bad.csv"
    bad.write_text("context,question,answer\nSome text.,Who?,Ann\nMore text.,,Bo\n")
    with pytest.raises(DataError, match=r"bad.csv:3: empty \['question'\]"):
        CSVQATask(path=str(bad)).steps()
    bad.write_text("context,answer\nx,y\n")
    with pytest.raises(DataError, match=r"missing column\(s\) \['question'\]"):
        CSVQATask(path=str(bad)).steps()
