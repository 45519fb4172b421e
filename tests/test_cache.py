"""core.cache.disk_cached: the one disk cache of generated texts, trained modules and key statistics."""
import json

import torch

from core.cache import cache_entry, disk_cached, text_list
from core.io import clear_inputs, noted_inputs


def test_an_entry_is_built_once_then_read_and_noted_as_an_input(tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    calls = []

    def build():
        calls.append(1)
        return ["a", "b"]

    clear_inputs()
    assert disk_cached("ns", "key", build, what="texts") == ["a", "b"]
    path = cache_entry("ns", "key")
    assert path == tmp_path / "ns" / "key.json" and json.loads(path.read_text()) == ["a", "b"]
    assert str(path.resolve()) in noted_inputs()  # a later run reads it: part of this run's inputs
    assert disk_cached("ns", "key", build, what="texts") == ["a", "b"] and len(calls) == 1
    assert not list((tmp_path / "ns").glob(".*"))  # no staging file left behind


def test_an_invalid_entry_is_built_again_and_a_disabled_cache_neither_reads_nor_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    path = cache_entry("ns", "key")
    path.write_text(json.dumps(["", None]))  # edited by hand
    check = lambda v: text_list(v, non_empty=True)  # noqa: E731
    assert disk_cached("ns", "key", lambda: ["fresh"], what="texts", valid=check) == ["fresh"]
    assert json.loads(path.read_text()) == ["fresh"]
    assert disk_cached("ns", "key", lambda: ["other"], what="texts", enabled=False) == ["other"]
    assert json.loads(path.read_text()) == ["fresh"]
    assert text_list([]) and not text_list([], non_empty=True) and not text_list(["a", 1])


def test_safetensors_entries_keep_tensors_and_metadata(tmp_path, monkeypatch):
    monkeypatch.setenv("KBENCH_CACHE", str(tmp_path))
    value = ({"w": torch.arange(6.0).view(2, 3)}, {"format": "x"})
    disk_cached("ns", "t", lambda: value, what="tensors", format="safetensors")
    tensors, metadata = disk_cached("ns", "t", lambda: 1 / 0, what="tensors", format="safetensors")
    assert torch.equal(tensors["w"], value[0]["w"]) and metadata == {"format": "x"}
    assert cache_entry("ns", "t", "safetensors").name == "t.safetensors"
