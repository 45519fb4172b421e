"""Teacher-forced accuracy by target-token position, from `task=editing` runs' predictions.jsonl.

An editor that writes one vector at the last prompt token (GRACE at the top layer) can set the first
target token and no later one; reliability_tf averages over all target tokens and hides where the hits
are. This reads each run's after-all reliability / generality rows, tokenizes their gold targets with the
run's tokenizer (no model is loaded) and prints the share of edits whose target token k was the argmax,
for k = 1, 2, 3 and 4+; rows whose re-tokenized target length differs from the scored one are skipped
and counted.

    python scripts/edit_token_positions.py outputs/readme/editing/{base,grace,memit} [--sets reliability_tf]
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.io import read_jsonl  # noqa: E402
from core.models import load_tokenizer  # noqa: E402


def positions(run: Path, sets: list[str]) -> dict[str, dict]:
    """Per probe set: {"k": [hits, total] by position bucket, "skipped": n}."""
    record = json.loads((run / "record.json").read_text())
    model = record["config"]["model"]
    tokenizer = load_tokenizer(model["name_or_path"], model.get("trust_remote_code", False))
    out: dict[str, dict] = {}
    for row in read_jsonl(run / "predictions.jsonl"):
        name = row["probe_set"].split("/", 1)[-1]
        if not row["probe_set"].startswith(("after_all/", "single/")) or name not in sets:
            continue
        stats = out.setdefault(name, {"k": defaultdict(lambda: [0, 0]), "skipped": 0})
        gold = tokenizer(row["gold"][0], add_special_tokens=False)["input_ids"]
        predicted = row["target_predicted_ids"]
        if len(gold) != len(predicted):
            stats["skipped"] += 1
            continue
        for k, (g, p) in enumerate(zip(gold, predicted), 1):
            bucket = str(k) if k < 4 else "4+"
            stats["k"][bucket][0] += int(g == p)
            stats["k"][bucket][1] += 1
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--sets", default="reliability_tf,generality_tf", help="probe sets (after the protocol prefix)")
    args = parser.parse_args(argv)
    sets = args.sets.split(",")
    print("| run | probe set | token 1 | token 2 | token 3 | token 4+ | skipped |")
    print("|---|---|---|---|---|---|---|")
    for run in args.runs:
        for name, stats in positions(run, sets).items():
            cells = [f"{h / t:.3f} ({t})" if t else "–" for h, t in (stats["k"].get(b, [0, 0]) for b in ("1", "2", "3", "4+"))]
            print(f"| {run.name} | {name} | {' | '.join(cells)} | {stats['skipped']} |")


if __name__ == "__main__":
    main()
