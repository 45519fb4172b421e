"""Diagnostic scripts under scripts/ on small hand-made inputs."""
import json

from core.tiny import build_tiny_tokenizer
from scripts.edit_token_positions import positions


def test_edit_token_positions_counts_hits_by_target_position(tmp_path):
    tokenizer = build_tiny_tokenizer(512)
    tokenizer.save_pretrained(tmp_path / "tok")
    run = tmp_path / "run"
    run.mkdir()
    (run / "record.json").write_text(json.dumps({"config": {"model": {"name_or_path": str(tmp_path / "tok")}}}))
    gold = " capital of France"
    ids = tokenizer(gold, add_special_tokens=False)["input_ids"]
    assert len(ids) >= 2
    wrong_second = [ids[0], ids[1] + 1, *ids[2:]]
    rows = [
        {"probe_set": "pre_edit/locality_reference", "gold": [gold], "target_predicted_ids": ids},  # not an after-all set
        {"probe_set": "after_all/reliability_tf", "gold": [gold], "target_predicted_ids": wrong_second},
        {"probe_set": "after_all/reliability_tf", "gold": [gold], "target_predicted_ids": ids},
        {"probe_set": "after_all/reliability_tf", "gold": [gold], "target_predicted_ids": ids[:1]},  # length differs
        {"probe_set": "after_all/locality", "gold": [gold], "target_predicted_ids": ids},  # not asked for
    ]
    (run / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    stats = positions(run, ["reliability_tf"])
    assert set(stats) == {"reliability_tf"} and stats["reliability_tf"]["skipped"] == 1
    assert stats["reliability_tf"]["k"]["1"] == [2, 2] and stats["reliability_tf"]["k"]["2"] == [1, 2]
