"""RECIPE's retrieval and knowledge sentinel alone, under a few design choices (no LM forward: minutes on CPU).

Trains only the contrastive part of `method=recipe` (`epochs=0`) on the editing task's held-out
synthetic edits, injects the evaluated edits, and prints for each setting:
  edit / rephrase  share of edit prompts / rephrased prompts that retrieve their own edit (above the sentinel)
  same_rel / general  share of the task's locality prompts the sentinel rejects (same-relation questions
                     about never-edited entities; general questions, which the training split also uses)
  unseen_general   share of general questions that occur nowhere in the task, rejected
Encoder features are computed once and shared by all settings.

    python benchmarks/recipe_retrieval.py                 # T = 50 evaluated edits, 100 training edits
    python benchmarks/recipe_retrieval.py --n-train 400
"""
from __future__ import annotations

import argparse
import os
import time

import torch
from omegaconf import OmegaConf

os.environ.setdefault("TQDM_DISABLE", "1")

from core.models import tiny_lm  # noqa: E402
from core.types import Query  # noqa: E402
from methods.recipe import Recipe  # noqa: E402
from tasks.editing import EditingTask  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNSEEN_GENERAL = [
    "How many days are there in a week?", "What colour is the sky on a clear day?", "Who wrote Hamlet?",
    "What is the capital of Spain?", "What is the largest desert in the world?", "How many continents are there?",
    "What is the main language spoken in Mexico?", "Which metal is liquid at room temperature?",
    "What do bees make?", "What is the square root of 81?",
]
# the earlier CPU variant's knobs (docs/recipe.md): frozen encoder, so features are computed once
PREVIOUS = dict(train_encoder=False, rep_dim=256, sentinel="feature_vector", head_init="shared_projection",
                standardise=True, lr=1e-3, max_grad_norm=1.0, similarity="cosine", temperature=20.0,
                contrastive_negatives=64, retrieval_query="prompt")
SETTINGS = {
    "untrained (identical-start heads)": PREVIOUS | dict(retrieval_epochs=1, lr=1e-12),
    "dot, random-start heads": PREVIOUS | dict(similarity="dot", temperature=1.0, head_init="random"),
    "dot, identical-start heads": PREVIOUS | dict(similarity="dot", temperature=1.0),
    "cosine (previous default)": PREVIOUS,
    # the reference's retrieval part (trainable encoder, random heads, dot, in-batch negatives), CPU lr
    "reference, trainable encoder": dict(lr=1e-4),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-edits", type=int, default=50)
    parser.add_argument("--n-train", type=int, default=100)
    parser.add_argument("--retrieval-epochs", type=int, default=20)
    args = parser.parse_args()
    general = OmegaConf.to_container(OmegaConf.load(os.path.join(ROOT, "conf/task/editing.yaml")))["general_questions"]
    task = EditingTask(n_edits=args.n_edits, n_train=args.n_train, generate=False, general_questions=general)
    lm = tiny_lm()  # retrieval never runs the LM; the tiny one only sets the prompt size
    memo: dict[str, torch.Tensor] = {}
    edits = task.edits
    probes = {
        "edit": [(e.prompt, e.id) for e in edits],
        "rephrase": [(r, e.id) for e in edits for r in e.rephrase_prompts],
        "same_rel": [(p, None) for e in edits for p, k in zip(e.locality_prompts, e.locality_kinds) if k == "same_relation"],
        "general": [(p, None) for e in edits for p, k in zip(e.locality_prompts, e.locality_kinds) if k == "general"],
        "unseen_general": [(task.synthetic_template.format(question=q), None) for q in UNSEEN_GENERAL],
    }
    print(f"{len(edits)} evaluated edits, {len(task.training_knowledge())} training edits, "
          f"retrieval_epochs={args.retrieval_epochs}")
    print(f"{'setting':36s} " + " ".join(f"{name:>14s}" for name in probes) + "   train_s")
    for label, knobs in SETTINGS.items():
        method = Recipe(lm, epochs=0, cache=False, **({"retrieval_epochs": args.retrieval_epochs} | knobs))
        if not method.knobs["train_encoder"]:  # a frozen encoder's features are shared by the settings
            encode = method.features

            def cached(texts, grad=False, encode=encode):
                missing = [t for t in dict.fromkeys(texts) if t not in memo]
                if missing:
                    memo.update(zip(missing, encode(missing)))
                return torch.stack([memo[t] for t in texts])

            method.features = cached
        started = time.perf_counter()
        method.prepare(task.training_knowledge())
        seconds = time.perf_counter() - started
        method.inject([task.knowledge(e) for e in edits])
        rates = []
        for pairs in probes.values():
            decisions = method.retrieve([Query(id=str(i), prompt=p) for i, (p, _) in enumerate(pairs)])
            got = [None if d["index"] is None else method.ids[d["index"]] for d in decisions]
            rates.append(sum(g == want for g, (_, want) in zip(got, pairs)) / len(pairs))
        print(f"{label:36s} " + " ".join(f"{r:14.2f}" for r in rates) + f"   {seconds:7.1f}")


if __name__ == "__main__":
    main()
