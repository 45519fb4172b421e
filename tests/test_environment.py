"""The install is the tested one, and the wrapper's shortcuts into a model compute what the model computes."""
from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from core.environment import drift_message, locked_versions, version_drift
from core.lm import LM
from core.types import KBenchError

ROOT = Path(__file__).resolve().parent.parent


def _lock_dir(tmp_path: Path, pins: dict[str, str]) -> Path:
    lines = [f"{name}=={version} \\\n    --hash=sha256:{'0' * 64}\n    # via kbench" for name, version in pins.items()]
    (tmp_path / "requirements.lock").write_text("# header\n" + "\n".join(lines) + "\n")
    (tmp_path / "requirements-torch.txt").write_text("# comment\ntorch==" + _public("torch") + "\n")
    return tmp_path


def _public(package: str) -> str:
    return importlib.metadata.version(package).split("+")[0]


def test_the_repository_lock_pins_every_checked_package_and_torch_separately():
    pins = locked_versions(ROOT)
    assert "torch" in pins and "transformers" in pins and "peft" in pins
    lock = (ROOT / "requirements.lock").read_text()
    assert "\ntorch==" not in lock  # torch is machine-specific: installed first, outside the lock
    pins_in_lock = re.findall(r"^[A-Za-z0-9][\w.-]*==\S+", lock, re.M)
    hashed = re.findall(r"^[A-Za-z0-9][\w.-]*==\S+ \\\n    --hash=sha256:[0-9a-f]{64}", lock, re.M)
    assert len(pins_in_lock) == len(hashed) > 50  # every pin carries a hash: pip installs it with --require-hashes


def test_drift_names_each_package_that_differs_and_ignores_local_build_labels(tmp_path, monkeypatch):
    monkeypatch.delenv("KBENCH_ALLOW_DRIFT", raising=False)
    same = _lock_dir(tmp_path, {"transformers": _public("transformers"), "peft": _public("peft")})
    assert version_drift(same) == []  # torch 2.13.0+cpu installed == 2.13.0 locked
    assert drift_message([]) is None

    other = _lock_dir(tmp_path, {"transformers": "0.0.1", "peft": _public("peft"), "not-a-package": "1.0"})
    drift = version_drift(other, packages=("transformers", "peft", "not-a-package"))
    assert drift == [f"transformers {importlib.metadata.version('transformers')} (lock: 0.0.1)", "not-a-package not installed (lock: 1.0)"]
    message = drift_message(drift)
    assert message.count("\n") == 0 and "transformers" in message and "KBENCH_ALLOW_DRIFT=1" in message

    monkeypatch.setenv("KBENCH_ALLOW_DRIFT", "1")
    assert drift_message(drift) is None


def test_no_lock_no_drift(tmp_path):
    assert locked_versions(tmp_path) == {} and version_drift(tmp_path) == []


def test_lowest_versions_pins_every_lower_bound_and_refuses_a_missing_one(tmp_path):
    script = ROOT / "scripts" / "lowest_versions.py"
    result = subprocess.run([sys.executable, str(script), str(ROOT / "pyproject.toml"), "--extra", "dev"],
                            capture_output=True, text=True, check=True)
    pins = dict(line.split("==") for line in result.stdout.split())
    assert pins["transformers"] == "5.17" and pins["torch"] == "2.11" and "pytest" in pins
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["numpy>=2", "pandas"]\n')
    refused = subprocess.run([sys.executable, str(script), str(tmp_path / "pyproject.toml")], capture_output=True, text=True)
    assert refused.returncode == 2 and "'pandas' has no lower bound" in refused.stderr


# ---------------------------------------------------------------------- the wrapper's shortcuts
def _tiny_config(kind: str):
    import transformers

    common = dict(vocab_size=384, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=2)
    if kind == "gemma2":  # soft-capped final logits: the head shortcut applies the same cap
        return transformers.Gemma2Config(**common, head_dim=16, final_logit_softcapping=5.0), transformers.Gemma2ForCausalLM
    if kind == "cohere":  # logits scaled inside the CausalLM forward: a head the shortcut does not reproduce
        return transformers.CohereConfig(**common, logit_scale=0.25), transformers.CohereForCausalLM
    raise ValueError(kind)


def test_internals_check_accepts_a_soft_capped_head(tiny_lm):
    config, model_class = _tiny_config("gemma2")
    torch.manual_seed(0)
    lm = LM(model_class(config), tiny_lm.tokenizer, name="tiny-gemma2")  # the check runs in __init__
    assert lm.decoder_layers() is lm.causal_lm.model.layers


def test_internals_check_refuses_a_head_it_would_score_wrongly(tiny_lm):
    config, model_class = _tiny_config("cohere")
    torch.manual_seed(0)
    with pytest.raises(KBenchError, match=r"cannot score CohereForCausalLM .* output-head logits differ"):
        LM(model_class(config), tiny_lm.tokenizer, name="tiny-cohere")
