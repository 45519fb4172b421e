"""pyproject.toml lists kbench's packages explicitly (an explicit list takes no others): a subpackage left
out installs fine in editable mode and is missing from a wheel. Every folder of .py files must be listed."""
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_python_folder_is_a_listed_package():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("core", "methods", "tasks", "metrics", "runners")
        for p in (ROOT / top).rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert folders - listed == set(), f"add to [tool.setuptools] packages in pyproject.toml: {sorted(folders - listed)}"
    assert listed - folders == set(), f"listed but not found: {sorted(listed - folders)}"
