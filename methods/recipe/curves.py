"""RECIPE's training curves: saved as JSON beside the trained module and plotted as PNG."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from core.io import atomic_write_json
from methods.recipe.training import PROBE_EDITS


def save_curves(curves: dict[str, list[dict[str, Any]]], stem: Path) -> Path:
    """The training curves as `<stem>.json` and `<stem>.png` (`plot_curves`); returns the PNG's path."""
    atomic_write_json(stem.with_suffix(".json"), curves)
    return plot_curves(curves, stem.with_suffix(".png"))


def plot_curves(curves: dict[str, list[dict[str, Any]]], png: Path) -> Path:
    """Edit losses, retrieval accuracy and sentinel rejection against training epochs (retrieval-only
    epochs first): per step (in-batch, thin lines) and per epoch (the probe of `Recipe.probe_retrieval`,
    markers). Re-plot a saved `<hash>.json` with `plot_curves(json.load(...), Path("out.png"))`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs, steps = curves["epochs"], curves["steps"]
    offset = {"retrieval": 0, "joint": max((e["epoch"] for e in epochs if e["phase"] == "retrieval"), default=0)}
    per_epoch: dict[tuple[str, int], int] = {}
    for row in steps:
        per_epoch[row["phase"], row["epoch"]] = per_epoch.get((row["phase"], row["epoch"]), 0) + 1
    seen: dict[tuple[str, int], int] = {}
    x_step = []
    for row in steps:  # step i of an epoch of n steps sits at epoch − 1 + i / n
        key = (row["phase"], row["epoch"])
        seen[key] = seen.get(key, 0) + 1
        x_step.append(offset[row["phase"]] + row["epoch"] - 1 + seen[key] / per_epoch[key])
    x_epoch = [offset[e["phase"]] + e["epoch"] for e in epochs]

    def step_line(axis, key: str, label: str, **style) -> None:
        points = [(x, row[key]) for x, row in zip(x_step, steps) if key in row]
        if points:
            axis.plot(*zip(*points), linewidth=1, label=label, **style)

    figure, axes = plt.subplots(1, 3, figsize=(15, 4))
    for key in ("reliability", "generality", "locality_kl", "query_to_knowledge"):
        step_line(axes[0], key, key + " (per step)")
    axes[0].set_title("losses")
    axes[0].set_yscale("symlog", linthresh=0.1)
    for key, label in (("retrieval_prompt", "prompts → own edit (probe)"), ("retrieval_rephrase", "rephrases → own edit (probe)")):
        axes[1].plot(x_epoch, [e.get(key) for e in epochs], marker="o", label=label)
    step_line(axes[1], "batch_retrieval", "in-batch query → own statement (per step)", linestyle=":")
    axes[1].set_title(f"retrieval above the sentinel ({PROBE_EDITS} training edits)")
    axes[2].plot(x_epoch, [e.get("sentinel_rejection") for e in epochs], marker="o", label="locality prompts rejected (probe)")
    step_line(axes[2], "batch_rejection", "in-batch locality → sentinel (per step)", linestyle=":")
    step_line(axes[2], "batch_fallback", "in-batch own-absent query → sentinel (per step)", linestyle="--")
    axes[2].set_title("sentinel rejection")
    for axis in axes:
        axis.set_xlabel("epoch" + (" (retrieval-only epochs first)" if offset["joint"] else ""))
        axis.legend(fontsize=8)
    for axis in axes[1:]:
        axis.set_ylim(-0.02, 1.02)
    figure.tight_layout()
    figure.savefig(png, dpi=90)
    plt.close(figure)
    return png
