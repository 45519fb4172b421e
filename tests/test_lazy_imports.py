"""Optional dependencies are imported only by the method / logger / task that needs them.

A GPU machine with torch, transformers, peft, hydra and omegaconf (and no faiss, wandb, rank-bm25,
bm25s, rapidfuzz, gguf, submitit, sentence-transformers, matplotlib, openai) must import every module
except the few listed in NEEDS below, and run a method end to end. The blocked packages are made
unimportable in a subprocess (a meta-path finder that raises ImportError), whether or not they are
installed here.
"""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, run_cli

# joblib is not blocked: transformers 5.17 (the GPU machine's) cannot import AutoModel without it, and every
# machine with sentence-transformers has it (scikit-learn depends on it)
BLOCKED = ["faiss", "wandb", "rank_bm25", "bm25s", "rapidfuzz", "gguf", "submitit", "sentence_transformers",
           "matplotlib", "openai"]

# the only modules allowed to need a blocked package at import time, and which one
NEEDS = {"metrics.ranking": "rapidfuzz", "tasks.crs": "rapidfuzz", "tasks.crs_catalogue": "rapidfuzz",
         "tasks.crs_turns": "rapidfuzz", "tasks.redial_conversations": "rapidfuzz", "runners.rescore_crs": "rapidfuzz"}

BLOCKER = textwrap.dedent(
    """
    import os, sys

    BLOCKED = set(os.environ["KBENCH_BLOCK_IMPORTS"].split(","))

    class _Hide:
        \"\"\"Wraps a meta-path finder: blocked packages look not installed (find_spec None, import fails).\"\"\"

        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            find = getattr(self.inner, "find_spec", None)
            return find(name, path, target) if find else None

        def __getattr__(self, attr):
            return getattr(self.inner, attr)

    sys.meta_path[:] = [_Hide(finder) for finder in sys.meta_path]
    """
)


def _modules() -> list[str]:
    names = ["run"]
    for package in ("core", "methods", "tasks", "metrics", "runners"):  # subpackages too (methods/retrieval/)
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if parts[-1] != "__main__" and parts != (package,):
                names.append(".".join(parts))
    return names


@pytest.fixture()
def blocker_env(tmp_path: Path) -> dict:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    return {"PYTHONPATH": f"{tmp_path}:{ROOT}", "KBENCH_BLOCK_IMPORTS": ",".join(BLOCKED)}


def test_every_module_imports_without_the_optional_packages(blocker_env):
    script = textwrap.dedent(
        f"""
        import importlib, json, sys
        for blocked in {BLOCKED!r}:  # the blocker works: none of them can be imported
            try:
                importlib.import_module(blocked)
            except ImportError:
                pass
            else:
                raise SystemExit(f"{{blocked}} was not blocked")
        failures = {{}}
        for name in {_modules()!r}:
            try:
                importlib.import_module(name)
            except ImportError as err:
                failures[name] = str(err)
        print(json.dumps(failures))
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(blocker_env), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    failures = json.loads(done.stdout.strip().splitlines()[-1])
    unexpected = {name: err for name, err in failures.items() if NEEDS.get(name) is None or NEEDS[name] not in err}
    assert not unexpected, f"modules that import an optional package at import time: {unexpected}"


def test_a_run_needs_none_of_them(blocker_env):
    """The whole runner path (config, model, method, task, records) with logger=none and a training method."""
    done = run_cli("model=tiny", "method=ft_sentences", "method.lr=1e-2", "method.epochs=4", "task.n_contexts=1",
                   "logger=none", env=blocker_env)
    assert done.returncode == 0, done.stderr[-3000:]


def test_the_blocked_package_is_reported_when_its_method_is_used(blocker_env):
    """rag_dense asks for faiss (through the sentence encoder first): the error names a blocked package."""
    done = run_cli("model=tiny", "method=rag_dense", "task.n_contexts=1", "logger=none", env=blocker_env)
    assert done.returncode != 0
    assert "sentence_transformers" in done.stderr or "faiss" in done.stderr, done.stderr[-3000:]


def _env(extra: dict) -> dict:
    import os

    return os.environ | {"TQDM_DISABLE": "1"} | extra


def test_dense_flat_search_works_without_faiss(monkeypatch, tmp_path):
    """rag_dense's exact `flat` index falls back to NumPy when faiss is missing (the GPU machine has
    none): same neighbours and scores, saved and loaded as index.npy; graph / cluster indexes need faiss."""
    import numpy as np

    from core.types import KBenchError
    from methods.retrieval.dense import DenseIndex

    rng = np.random.default_rng(0)
    stored, queries = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(70, 8)).astype(np.float32)
    with_faiss = DenseIndex(8)
    with_faiss.add(stored)
    batches = (queries[:1], queries[:5], queries)  # the one-query, small-batch and large-batch paths
    wanted = [with_faiss.search(batch, 3) for batch in batches]
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    without = DenseIndex(8)
    without.add(stored[:20])
    without.add(stored[20:])
    assert len(without) == 50 and without.nbytes() == stored.nbytes
    for batch, (want_ids, want_scores) in zip(batches, wanted):
        ids, scores = without.search(batch, 3)
        assert (ids == want_ids).all() and np.allclose(scores, want_scores, atol=1e-5)
    without.save(tmp_path)
    loaded = DenseIndex(8)
    loaded.load(tmp_path)
    assert (loaded.search(queries, 3)[0] == want_ids).all()
    with pytest.raises(KBenchError, match="faiss"):
        DenseIndex(8, kind="hnsw")
