"""`method=alphaedit`: AlphaEdit, null-space constrained knowledge editing (Fang et al., ICLR 2025).

MEMIT's machinery (methods/mass_editing.py: value optimisation, keys, spread over layers), with one
layer's update projected onto the null space of the preserved keys K₀ (the general-text keys whose
second moment is C = E[k₀ k₀ᵀ]):

    P = Û Ûᵀ,  Û = eigenvectors of C with eigenvalue < nullspace_threshold
    ΔWᵀ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ,   α = L2

(the paper's eq. 9 / `AlphaEdit_main.py`). ΔWᵀ = P X, so ΔW k₀ = Xᵀ P k₀ ≈ 0 for every preserved key:
the update cannot disturb what the model does on general text, and no preservation term is needed in
the objective. K_p K_pᵀ accumulates the keys of the edits already made (recomputed after each batch),
so a later batch also keeps earlier edits; `reset` clears it.

Reference: jianghoucheng/AlphaEdit `hparams/AlphaEdit/Llama3-8B.json` (layers 4–8 of 32, 25 value steps at
lr 0.1, weight decay 0.5, clamp 0.75, KL 0.0625, nullspace_threshold 2e-2, L2 10, 100,000 Wikipedia
samples; sequential batches of 100 edits). The null-space threshold is an absolute eigenvalue; how many
directions it keeps on a model is in `info()["nullspace_dims"]`.
Storage: the edited weights are served in place; `extra_storage_bytes` counts what a sequential editor
keeps to make further edits: P and K_p K_pᵀ, two D_in² fp32 matrices per edited layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field

from core.lm import LM
from core.options import checked
from core.types import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, UnitFloat
from methods.mass_editing import DEFAULT_STATS_PATHS, EditRequest, MassEditor, alphaedit_update, nullspace_projector
from methods.memit import MASS_EDITING_REFERENCE


class AlphaEditMethod(MassEditor):
    """AlphaEdit: MEMIT's update projected onto the preserved keys' null space, earlier edits kept."""

    name = "alphaedit"
    reference: ClassVar[dict] = MASS_EDITING_REFERENCE | {"nullspace_threshold": 2e-2, "l2": 10.0}

    @checked("method")
    def __init__(
        self,
        lm: LM,
        layers: list[int] | None = None,
        layer_span: Annotated[list[UnitFloat], Field(min_length=2, max_length=2)] = (0.125, 0.25),
        batch_size: PositiveInt = 1,
        v_num_grad_steps: PositiveInt = 25,
        v_lr: PositiveFloat = 0.1,
        v_weight_decay: NonNegativeFloat = 0.5,
        clamp_norm_factor: PositiveFloat = 0.75,
        kl_factor: NonNegativeFloat = 0.0625,
        nullspace_threshold: PositiveFloat = 2e-2,
        l2: NonNegativeFloat = 10.0,
        n_context_templates: NonNegativeInt = 5,
        context_template_tokens: PositiveInt = 10,
        target_suffix: str = "\n",
        answer_marker: str = "\nAnswer:",
        stats_paths: list[str] | None = None,
        stats_tokens: PositiveInt = 20_000,
        stats_chunk_tokens: Annotated[int, Field(ge=8)] = 256,
        stats_batch_size: PositiveInt = 8,
        seed: int = 0,
    ) -> None:
        self.nullspace_threshold, self.l2 = nullspace_threshold, l2
        super().__init__(
            lm, layers=layers, layer_span=list(layer_span), batch_size=batch_size, v_num_grad_steps=v_num_grad_steps,
            v_lr=v_lr, v_weight_decay=v_weight_decay, clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor,
            n_context_templates=n_context_templates, context_template_tokens=context_template_tokens,
            target_suffix=target_suffix, answer_marker=answer_marker,
            stats_paths=stats_paths if stats_paths is not None else DEFAULT_STATS_PATHS, stats_tokens=stats_tokens,
            stats_chunk_tokens=stats_chunk_tokens, stats_batch_size=stats_batch_size, seed=seed,
        )
        self.projectors: dict[int, torch.Tensor] = {}
        self.nullspace_dims: dict[int, int] = {}
        self.previous = {l: torch.zeros(m.in_features, m.in_features) for l, m in self.modules.items()}  # K_p K_pᵀ

    def ensure_stats(self) -> None:
        super().ensure_stats()
        for layer in self.layer_ids:
            if layer not in self.projectors:
                projector, dims = nullspace_projector(self.cov[layer], self.nullspace_threshold)
                self.projectors[layer], self.nullspace_dims[layer] = projector.float(), dims

    def layer_update(self, position: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        device = keys.device
        return alphaedit_update(keys, resid, self.projectors[layer].to(device), self.previous[layer].to(device), self.l2).float()

    def after_batch(self, requests: Sequence[EditRequest]) -> None:
        for layer in self.layer_ids:  # the batch's keys as the updated model computes them (the reference's order)
            keys = self.keys(requests, layer).cpu()
            self.previous[layer] += keys @ keys.T

    def reset(self) -> None:
        super().reset()
        for matrix in self.previous.values():
            matrix.zero_()

    def editor_state(self) -> dict[str, torch.Tensor]:
        return ({f"projector.{l}": p for l, p in self.projectors.items()}
                | {f"previous.{l}": c for l, c in self.previous.items()})

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {f"previous.{l}": c for l, c in self.previous.items()}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for layer in self.layer_ids:
            self.previous[layer] = tensors[f"previous.{layer}"].float()

    def info(self) -> dict[str, Any]:
        return super().info() | {
            "nullspace_dims": {str(l): f"{d} of {self.modules[l].in_features}" for l, d in self.nullspace_dims.items()},
        }
