"""`method=memit`: MEMIT, Mass-Editing Memory in a Transformer (Meng et al., ICLR 2023).

Each batch of edits is written into the MLP down-projections W of a few early-middle layers
(methods/mass_editing.py has the whole procedure: value optimisation, keys, spread over layers). One
layer's update is the least-squares solution that maps the new keys K to the residual values R while
keeping the outputs of the preserved keys (second moment C of the layer's input over general text):

    ΔW = argmin ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ) = R Kᵀ (λ C + K Kᵀ)⁻¹,   λ = mom2_update_weight

(the paper's eq. 14, with C scaled by λ as in `memit_main.py`). The edited weights replace the originals
in place; earlier edits are protected only through C, which does not contain them, so long sequences
of small batches drift (what AlphaEdit addresses).

Reference: kmeng01/memit and the MEMIT hparams AlphaEdit ships for Llama-3-8B
(`hparams/MEMIT/Llama3-8B.json`, a Llama-style decoder like Gemma's): layers 4–8 of 32, 25 value steps
at lr 0.1, weight decay 0.5, clamp 0.75, KL 0.0625, λ = 15000, statistics from 100,000 Wikipedia
samples. Layers here: the same depth fractions (`layer_span`). Deviations are knobs, listed in
`reference` and in conf/method/memit.yaml.
Storage: the edited weights are served in place; `extra_storage_bytes` counts the covariance matrices
a sequential editor keeps to make further edits (one D_in² fp32 matrix per edited layer).
"""
from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field

from core.lm import LM
from core.options import checked
from core.types import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, UnitFloat
from methods.mass_editing import DEFAULT_STATS_PATHS, MassEditor, memit_update

#: knob values of the reference implementation (Llama-3-8B hparams; `layer_span` = layers 4-8 of 32)
MASS_EDITING_REFERENCE: dict = {
    "layers": None,
    "layer_span": [0.125, 0.25],
    "batch_size": 100,  # AlphaEdit's sequential protocol: batches of 100 edits
    "v_num_grad_steps": 25,
    "v_lr": 0.1,
    "v_weight_decay": 0.5,
    "clamp_norm_factor": 0.75,
    "kl_factor": 0.0625,
    "n_context_templates": 5,
    "context_template_tokens": 10,
    "target_suffix": "",
}


class MemitMethod(MassEditor):
    """MEMIT: least-squares updates of the down-projections, protected by the preserved keys' statistics."""

    name = "memit"
    reference: ClassVar[dict] = MASS_EDITING_REFERENCE | {"mom2_update_weight": 15000.0}

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
        mom2_update_weight: PositiveFloat = 15000.0,
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
        self.mom2_update_weight = mom2_update_weight
        super().__init__(
            lm, layers=layers, layer_span=list(layer_span), batch_size=batch_size, v_num_grad_steps=v_num_grad_steps,
            v_lr=v_lr, v_weight_decay=v_weight_decay, clamp_norm_factor=clamp_norm_factor, kl_factor=kl_factor,
            n_context_templates=n_context_templates, context_template_tokens=context_template_tokens,
            target_suffix=target_suffix, answer_marker=answer_marker,
            stats_paths=stats_paths if stats_paths is not None else DEFAULT_STATS_PATHS, stats_tokens=stats_tokens,
            stats_chunk_tokens=stats_chunk_tokens, stats_batch_size=stats_batch_size, seed=seed,
        )

    def layer_update(self, position: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        return memit_update(keys, resid, self.cov[layer].to(keys.device), self.mom2_update_weight).float()
