"""Methods and tasks as plugins from outside the repository: the guides' own code and commands, run for real.

Each guide's complete files are fenced code blocks tagged with their path (```python file=examples/...).
The tests write those blocks (not the repository's copies) into a folder outside the repository, so
nothing can work by accident through kbench's own packages or a file the guide does not show, then run
the guide's `bash` blocks on them, the folder replaced by the copy and tiny-model overrides appended.
The blocks must also equal the files under examples/, so the examples and the guides never drift apart.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from core.types import DataError, GenerationSpec, Knowledge, Query
from runners import report
from tests.conftest import ROOT

METHOD_GUIDE = ROOT / "docs" / "adding_a_method.md"
TASK_GUIDE = ROOT / "docs" / "adding_a_task.md"
TINY = "model=tiny logger=none resume.search_dir=null"
FILE_BLOCK = re.compile(r"^```\w+ file=(\S+)\n(.*?)^```$", re.S | re.M)
BASH_BLOCK = re.compile(r"^```bash\n(.*?)^```$", re.S | re.M)


def guide_files(guide: Path) -> dict[str, str]:
    """`{path: text}` of every code block the guide tags as a complete file."""
    return {path: text for path, text in FILE_BLOCK.findall(guide.read_text())}


def guide_commands(guide: Path) -> list[str]:
    """The guide's shell commands (lines of its bash blocks, comments dropped)."""
    lines = [line.split("  #")[0].strip() for block in BASH_BLOCK.findall(guide.read_text()) for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def write_guide_files(guide: Path, example: str, tmp_path: Path) -> Path:
    """The guide's file blocks written under a plugin folder outside the repository; returns that folder."""
    target = tmp_path / "my_plugins" / example
    files = guide_files(guide)
    assert files, f"{guide.name} shows no complete file"
    for path, text in files.items():
        assert path.startswith(f"examples/{example}/"), path
        destination = target / path.removeprefix(f"examples/{example}/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        destination.write_text(text)
    assert ROOT not in target.parents
    return target


def run_guide(command: str, example: str, plugin: Path, outputs: Path, extra: str = "") -> subprocess.CompletedProcess:
    """A guide's shell command with the plugin folder moved, `python` = this interpreter, outputs in tmp."""
    command = command.replace(f"examples/{example}", str(plugin)).replace("outputs/multirun", str(outputs))
    command = re.sub(r"(^|\s)python ", lambda m: f"{m.group(1)}{shlex.quote(sys.executable)} ", command, count=1)
    return subprocess.run(["bash", "-c", f"{command} {extra}"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"TQDM_DISABLE": "1"})


@pytest.mark.parametrize("guide", [METHOD_GUIDE, TASK_GUIDE], ids=["method", "task"])
def test_the_guides_complete_files_are_the_examples(guide):
    for path, text in guide_files(guide).items():
        assert (ROOT / path).read_text() == text, f"{guide.name}: the block for {path} differs from the file"
    code = "\n".join(text for path, text in guide_files(guide).items() if path.endswith(".py"))
    compile(code, guide.name, "exec")  # and complete Python: imports included


def _run_the_guide(guide: Path, example: str, tmp_path: Path) -> tuple[Path, list[subprocess.CompletedProcess]]:
    plugin = write_guide_files(guide, example, tmp_path)
    outputs = tmp_path / "outputs"
    commands = guide_commands(guide)
    runs = [c for c in commands if "run.py" in c and example in c]
    reports = [c for c in commands if "runners.report" in c]
    assert runs and reports, f"{guide.name}: no run or report command found in its bash blocks"
    results = []
    for command in runs:
        result = run_guide(command, example, plugin, outputs, f"{TINY} task.limit=2 hydra.sweep.dir={outputs}/sweep")
        assert result.returncode == 0, result.stderr[-3000:]
    for command in reports:
        results.append(run_guide(command, example, plugin, outputs))
        assert results[-1].returncode == 0, results[-1].stderr
    return outputs, results


def test_method_guide_as_written_runs_in_a_sweep_and_reaches_the_report(tmp_path):
    outputs, shown = _run_the_guide(METHOD_GUIDE, "plugin_method", tmp_path)
    records = report.load_runs([outputs]).records
    assert sorted(r["method"] for r in records) == ["context", "recent_context"]
    assert all(r["status"] == "done" for r in records)
    plugin_run = next(r for r in records if r["method"] == "recent_context")
    assert plugin_run["config"]["method"]["_target_"] == "recent_context.RecentContextMethod"
    assert plugin_run["extra_storage_bytes"] > 0  # the kept context text
    # in single injection the plugin prompts with the context, exactly as `context` does
    context_run = next(r for r in records if r["method"] == "context")
    assert plugin_run["metrics"]["qa_f1"] == pytest.approx(context_run["metrics"]["qa_f1"])
    assert "| recent_context " in shown[0].stdout and "| context " in shown[0].stdout


def test_task_guide_as_written_runs_in_a_sweep_and_reaches_the_report(tmp_path):
    outputs, shown = _run_the_guide(TASK_GUIDE, "plugin_task", tmp_path)
    records = report.load_runs([outputs]).records
    assert sorted((r["task"], r["method"], r["status"]) for r in records) == [("csv_qa", "base", "done"),
                                                                                ("csv_qa", "context", "done")]
    assert records[0]["method_info"]["task"]["n_contexts"] == 2 and records[0]["method_info"]["task"]["n_questions"] == 5
    assert "| csv_qa " in shown[0].stdout


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
    spec = GenerationSpec(max_new_tokens=4, stop=())
    answer = method.answer([Query("q", " Velmora")], spec)[0].text
    with_kept = tiny_lm.generate_until([tiny_lm.prompt_ids(" Velmora", context=" Velmora founded")], spec)[0]
    assert answer == with_kept  # the prompt holds the kept (newest) context
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


def test_a_method_written_to_the_earlier_guide_fails_naming_the_method_to_implement():
    """A stranger's plugin from before the rename (it defines `score` / `score_bare`) would otherwise be
    built and run with its log-likelihood never called: it is refused where the class is defined."""
    from core.types import KBenchError
    from methods.base import Method

    with pytest.raises(KBenchError, match=r"OldGuide defines `score`.*rename it to `loglikelihood`"):
        class OldGuide(Method):  # noqa: F841
            def score(self, queries, targets):
                return []
    with pytest.raises(KBenchError, match="rename it to `loglikelihood_unaugmented`"):
        class OldBare(Method):  # noqa: F841
            def score_bare(self, queries, targets):
                return []

    class NewGuide(Method):
        def loglikelihood(self, queries, targets):
            return []

    assert NewGuide.loglikelihood is not Method.loglikelihood
