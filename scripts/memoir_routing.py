"""MEMOIR's routing without training: the mask overlaps a run would route on, in minutes instead of hours.

Masks depend only on the prompts, the background mean and the permutation, never on W_mem, so which
probes reach the memory (overlap >= threshold) is known before any edit is trained. This builds
`method=memoir` and `task=editing` from the same config as `run.py`, fits the background (`prepare`),
takes the T edit prompts' masks as the stored ones and writes, like `MemoirMethod.report` after a run,
`memoir_overlap.png` / `.json` and prints each kind's share routed on. Locality prompts routed off score
exactly like the base model; generality needs the rephrasings routed on.

    python scripts/memoir_routing.py OUT_DIR [hydra overrides, e.g. method.threshold=0.5 task.source=...]
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runners.build import build  # noqa: E402


def main(out: Path, overrides: list[str]) -> dict:
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["method=memoir", "task=editing", *overrides])
    started = time.perf_counter()
    task = build(cfg.task, "task")
    lm = build(cfg.model, "model")
    method = build(cfg.method, "method", lm=lm)
    method.prepare(task.training_knowledge())
    knowledge = [task.knowledge(e) for e in task.edits]
    method.masks = method.masks_of([k.edit.prompt for k in knowledge])
    method.edit_ids = [k.id for k in knowledge]
    method.edit_meta = [dict(k.meta) for k in knowledge]
    summary = method.report(out)
    summary |= {"background": method.background_used, "deviations": method.reference_deviations(),
                "overrides": overrides, "seconds": round(time.perf_counter() - started, 1)}
    (out / "memoir_routing.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2:]), indent=2))
