"""Is this the tested environment? Installed versions against requirements.lock + requirements-torch.txt.

A drifted install (a newer transformers, an older peft) can change numbers or break a method deep
inside; this says so in one line, up front: in the test run's header and summary, and in every run's
log and record (`version_drift`). Set KBENCH_ALLOW_DRIFT=1 to silence the warning when running other
versions on purpose (the record still lists them).
"""
from __future__ import annotations

import importlib.metadata
import os
import re
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
LOCK_FILES = ("requirements.lock", "requirements-torch.txt")
ALLOW_DRIFT_VARIABLE = "KBENCH_ALLOW_DRIFT"

# The packages whose version changes what kbench computes or how it calls them; the rest of the lock is
# plumbing whose drift `pip check` would catch as an inconsistency, not as a different number.
CHECKED = (
    "torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "sentence-transformers",
    "huggingface-hub", "numpy", "scipy", "hydra-core", "omegaconf", "pydantic", "faiss-cpu", "bm25s", "rank-bm25",
)

_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")


def _public(version: str) -> str:
    """`2.13.0+cpu` -> `2.13.0`: a local build label (CPU / CUDA wheel) is not a different release."""
    return Version(version).public


def locked_versions(root: Path = ROOT) -> dict[str, str]:
    """`{normalised name: version}` pinned by the lock files under `root`; empty when there are none
    (kbench installed from a wheel, without its repository)."""
    pins: dict[str, str] = {}
    for name in LOCK_FILES:
        path = root / name
        if not path.is_file():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            match = _PIN.match(line.strip())
            if match:
                pins[canonicalize_name(match.group(1))] = match.group(2)
    return pins


def version_drift(root: Path = ROOT, packages: tuple[str, ...] = CHECKED) -> list[str]:
    """`["transformers 5.17.0 (lock: 5.24.0)", …]` for each checked package whose installed release differs
    from the lock (`not installed` when missing); empty when they agree or there is no lock."""
    locked = locked_versions(root)
    drift = []
    for package in packages:
        want = locked.get(canonicalize_name(package))
        if want is None:
            continue
        try:
            have = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            have = "not installed"
        if have == "not installed" or _public(have) != _public(want):
            drift.append(f"{package} {have} (lock: {want})")
    return drift


def drift_message(drift: list[str]) -> str | None:
    """The one-line warning for a non-empty drift, or None when the warning is off or nothing drifted."""
    if not drift or os.environ.get(ALLOW_DRIFT_VARIABLE, "") not in ("", "0"):
        return None
    return (
        f"kbench: installed versions differ from requirements.lock: {'; '.join(drift)}. Results may differ "
        f"from the tested set; `rm .venv/.installed; make install` restores it, {ALLOW_DRIFT_VARIABLE}=1 silences this."
    )
