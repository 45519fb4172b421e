"""Does RECIPE's retrieval objective learn at all, given many more steps than the CPU schedule's 13?

Trains only the contrastive terms of `method=recipe` (`epochs=0`, `retrieval_epochs=EPOCHS`) with every
other knob at the default (the reference's: trainable encoder, dot product / √rep_dim, sentinel tokens
through the encoder, in-batch candidates) on the editing task's 100 held-out synthetic edits, and writes
the training curves (`curves.json`, `curves.png`: per-step losses, per-epoch probe of retrieval above the
sentinel and of sentinel rejection). The retrieval terms never read the LM (only the edit losses do), so
the tiny LM stands in for Gemma and the curves are those a Gemma run would draw for the same terms.

    python scripts/recipe_retrieval_curves.py OUT_DIR [--lr 1e-4] [--epochs 40]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.models import tiny_lm  # noqa: E402
from methods.recipe import Recipe  # noqa: E402
from methods.recipe.curves import save_curves  # noqa: E402
from tasks.editing import EditingTask  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--lr", type=float, default=1e-4, help="the CPU default (reference: 1e-5)")
    parser.add_argument("--epochs", type=int, default=40, help="retrieval-only epochs of 13 steps each")
    args = parser.parse_args()
    task = EditingTask(n_edits=50, n_train=100)
    method = Recipe(tiny_lm(), cache=False, epochs=0, retrieval_epochs=args.epochs, lr=args.lr)
    started = time.perf_counter()
    method.prepare(task.training_knowledge())
    args.out.mkdir(parents=True, exist_ok=True)
    png = save_curves(method.curves, args.out / "curves")
    for epoch in method.curves["epochs"]:
        print(json.dumps(epoch))
    print(f"{time.perf_counter() - started:.0f} s; curves: {png}")


if __name__ == "__main__":
    main()
