"""`method=memoir`: MEMOIR-style sparse residual memory (Wang et al. 2025, "MEMOIR: Lifelong Model
Editing with Minimal Overwrite and Informed Retention").

One MLP down-projection W of layer `layer` gets a zero-initialised residual copy W_mem of the same shape:

    out(x) = W x + W_mem[:, m] x[m]

where x is the projection's input (the MLP's hidden activation, D = 2048 on Gemma 3 270M) at each
position and m is a sample-dependent set of k = round(density · D) input columns (the mask):

    m(prompt) = π( top-k_i | mean_t x_t,i(prompt) − μ_i | )

mean_t runs over the prompt's tokens (start tokens excluded), μ is the same mean averaged over
`n_background` unrelated prompts (the background), and π a fixed, seeded random permutation of the D
columns (the reference's TopHasher: which columns of W_mem hold an edit is decorrelated from which
features fired).

- Edit (`inject`), one per (prompt, target): m_e = m(prompt); only the columns W_mem[:, m_e] are
  trained, by SGD (lr, iterations, gradient-norm clip, weight decay on those columns), to minimise
  −log p(target | prompt) with the memory applied at every position; then m_e is stored. Columns
  shared with earlier edits continue from their current values (the reference's overwrite).
- Inference (`answer`, `score`): the query's mask m_q is compared with every stored mask,
  overlap_e = |m_q ∩ m_e| / k. If the best overlap ≥ `threshold`, that edit's stored mask is applied at
  every position of the sequence (prompt and generated tokens); otherwise the memory is off and the
  layer's output is exactly W x (locality). Each query is routed on its own, once, before its forward
  pass; the LM wrapper hands each batch's rows to the memory, so batches mix rows freely.
- Edits come from `Knowledge.meta` (`prompt`, `target`: task=editing) or, for QA tasks, from each
  training sentence split at its last `answer_marker` ("Question: q\\nAnswer:" | " a").
- Background prompts (no download): `background_source=training` uses the prompts of the task's
  held-out training edits (`prepare`), the closest to the reference, which took them from the edit data
  set; `model` uses `n_background` seeded unconditional samples of the model itself; `auto` takes the
  training split when the task has one, else model samples.
- `calibrate_threshold` (opt-in, not in the reference): instead of the fixed `threshold`, take the lowest
  threshold that routes that fraction of the held-out training edits' locality prompts to no edit, with
  the training edits' masks standing for the stored ones (the reference's 0.4 was set for Llama-3-8B).
- `extra_storage_bytes` = W_mem + the stored masks (one byte per column per edit) + the routing state
  (background mean, permutation).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from core.lm import LM
from core.options import checked
from core.progress import progress
from core.types import (
    Answer, GenerationSpec, KBenchError, Knowledge, NonFiniteLossError, NonNegativeFloat, PositiveFloat, PositiveInt, Query,
    TargetScore, UnitFloat,
)
from methods.base import Method

log = logging.getLogger(__name__)

BACKGROUND_SOURCES = ("auto", "training", "model")


# ---------------------------------------------------------------------- masks (pure functions)
def select_mask(features: torch.Tensor, background_mean: torch.Tensor, k: int, permutation: torch.Tensor) -> torch.Tensor:
    """Boolean masks `[N, D]`: the top-k columns of |features − background_mean| mapped through `permutation`."""
    if features.dim() == 1:
        features = features[None]
    top = torch.topk((features - background_mean).abs(), k, dim=-1).indices
    masks = torch.zeros(features.shape, dtype=torch.bool, device=features.device)
    return masks.scatter_(1, permutation.to(features.device)[top], True)


def best_match(query_masks: torch.Tensor, stored_masks: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query mask `[N, D]`: the index of the stored mask `[T, D]` it overlaps most, and that
    overlap |m_q ∩ m_e| / k (ties go to the earliest edit)."""
    overlap = query_masks.float() @ stored_masks.float().T / k
    best, index = overlap.max(dim=1)
    return index, best


class _StopForward(Exception):
    """Raised by the hook once the layer's input is captured: the layers above are not needed."""


class _ResidualMemory:
    """The forward hook that adds W_mem[:, m] x[m] to the down-projection's output.

    Three modes: `capture` (record the projection's input and stop the forward), training (one edit's
    columns with a trainable copy of them), and routed inference: inside `rows(masks)`, row b of every
    forward pass gets mask `masks[b]` (all-False = memory off). The LM wrapper enters `rows` around each
    batch with that batch's rows (`LM.generate` / `LM.score`'s `row_state`), so the masks are decided
    once per prompt, before the forward, and a decoding step keeps its row's mask by construction; the
    hook reads nothing of how `generate` calls the model. Outside these modes the hook adds nothing.
    """

    def __init__(self, module: torch.nn.Linear) -> None:
        # W_mem, [D_out, D], in fp32 whatever the model's dtype: its SGD steps (lr 1.0) round away in bf16
        self.weight = torch.zeros_like(module.weight, dtype=torch.float32, requires_grad=False)
        self.columns: torch.Tensor | None = None  # training: the edit's mask as column indices
        self.trainable: torch.Tensor | None = None  # training: W_mem[:, columns] being optimised
        self.capture: list[torch.Tensor] | None = None
        self.row_masks: torch.Tensor | None = None  # [B, D] masks of the current batch's rows; None: all off
        self.handles = [module.register_forward_hook(self._add_memory, with_kwargs=True)]

    def _add_memory(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0] if args else kwargs["input"]  # nn.Linear.forward(input)
        if self.capture is not None:
            self.capture.append(x.detach())
            raise _StopForward
        if self.trainable is not None:
            # the fp32 trainable columns see an fp32 copy of the (maybe bf16) input; the sum keeps the layer's dtype
            return output + F.linear(x.index_select(-1, self.columns).to(self.trainable.dtype), self.trainable).to(output.dtype)
        if self.row_masks is None:
            return None  # memory off for every row: the layer's own output, untouched
        if x.shape[0] != self.row_masks.shape[0]:
            raise KBenchError(
                f"method=memoir: a forward pass of {x.shape[0]} rows inside a routing session for "
                f"{self.row_masks.shape[0]} rows (the LM wrapper must enter `rows` once per batch)"
            )
        # rows with the memory off have an all-zero mask: they add exact zeros
        masks = self.row_masks[:, None, :].to(device=x.device, dtype=x.dtype)
        return output + F.linear(x * masks, self.weight.to(device=x.device, dtype=x.dtype))

    @contextlib.contextmanager
    def training(self, columns: torch.Tensor, trainable: torch.Tensor) -> Iterator[None]:
        self.columns, self.trainable = columns, trainable
        try:
            yield
        finally:
            self.columns, self.trainable = None, None

    @contextlib.contextmanager
    def rows(self, masks: Sequence[torch.Tensor | None]) -> Iterator[None]:
        """Apply `masks[b]` (`[D]` bool, or None: memory off) to row b of every forward inside."""
        if all(mask is None for mask in masks):
            self.row_masks = None
        else:
            off = torch.zeros(self.weight.shape[1], dtype=torch.bool, device=self.weight.device)
            self.row_masks = torch.stack([off if mask is None else mask.to(off.device) for mask in masks])
        try:
            yield
        finally:
            self.row_masks = None


class MemoirMethod(Method):
    """Sparse residual memory on one down-projection, routed by mask overlap."""

    name = "memoir"

    @checked("method")
    def __init__(
        self,
        lm: LM,
        layer: int | float = 0.84,
        module: str = "mlp.down_proj",
        density: Annotated[float, Field(gt=0, le=1)] = 0.2857,
        threshold: UnitFloat = 0.4,
        lr: PositiveFloat = 1.0,
        iterations: PositiveInt = 30,
        max_grad_norm: NonNegativeFloat = 1.0,
        weight_decay: NonNegativeFloat = 1e-5,
        stop_loss: NonNegativeFloat = 0.02,
        target_suffix: str = "\n",
        answer_marker: str = "\nAnswer:",
        background_source: Literal["auto", "training", "model"] = "auto",
        n_background: PositiveInt = 100,
        background_tokens: PositiveInt = 32,
        calibrate_threshold: Annotated[float, Field(gt=0, le=1)] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(lm)
        layers = lm.decoder_layers()
        if isinstance(layer, float):  # a fraction of the depth, so one default fits every model
            if not 0.0 <= layer <= 1.0:
                raise ValueError(f"method.layer={layer}: a float is a fraction of the depth and must be in [0, 1]")
            layer = min(round(layer * len(layers)), len(layers) - 1)
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"method.layer={layer} is out of range: the model has {len(layers)} layers")
        self.layer_index = layer % len(layers)
        self.target_module = layers[self.layer_index].get_submodule(module)
        if not isinstance(self.target_module, torch.nn.Linear):
            raise ValueError(f"method.module={module!r} is a {type(self.target_module).__name__}, not a Linear layer")
        self.dim = self.target_module.in_features
        self.k = max(1, round(density * self.dim))
        self.threshold, self.lr, self.iterations = threshold, lr, iterations
        self.max_grad_norm, self.weight_decay, self.stop_loss = max_grad_norm, weight_decay, stop_loss
        self.target_suffix, self.answer_marker = target_suffix, answer_marker
        self.background_source, self.n_background, self.background_tokens = background_source, n_background, background_tokens
        self.calibrate_threshold, self.threshold_source = calibrate_threshold, "config"
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.permutation = torch.randperm(self.dim, generator=generator).to(self.target_module.weight.device)
        self.memory = _ResidualMemory(self.target_module)
        self.background_mean: torch.Tensor | None = None
        self.background_used: str | None = None
        self.masks = torch.zeros((0, self.dim), dtype=torch.bool, device=self.target_module.weight.device)
        self.edit_ids: list[str] = []
        self.edit_losses: list[tuple[float, float, int]] = []  # (first loss, last loss, iterations) per edit
        self.routed = {"queries": 0, "memory_on": 0}

    # ------------------------------------------------------------------ features and masks
    def _split_prompt(self, prompt: str) -> tuple[list[int], list[int]]:
        """(start tokens, prompt tokens) of a prompt as the model sees it; features average the latter."""
        ids = self.prompt_ids(Query(id="", prompt=prompt))
        start = self.lm.start_ids
        n_start = len(start) if ids[: len(start)] == start else 0
        if len(ids) == n_start:
            raise KBenchError(f"method=memoir cannot build a mask for an empty prompt: {prompt!r}")
        return ids[:n_start], ids[n_start:]

    @torch.no_grad()
    def prompt_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Mean down-projection input over each prompt's tokens, `[N, D]` (memory off, layers above skipped)."""
        rows = []
        for chunk in self.lm.batches(list(prompts), desc="memoir features"):
            batch = self.lm.collate([self._split_prompt(p) for p in chunk])
            self.memory.capture = []
            try:
                self.lm.causal_lm.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
            except _StopForward:
                pass
            finally:
                captured, self.memory.capture = self.memory.capture, None
            if not captured:
                raise KBenchError(f"the hook on layer {self.layer_index} never ran: is the module on the forward path?")
            # on the captured state's device (the layer's GPU when the model is split), not the inputs'
            weights = batch.target_mask.to(device=captured[0].device, dtype=captured[0].dtype)[..., None]
            rows.append((captured[0] * weights).sum(1) / weights.sum(1))
        return torch.cat(rows).float()

    def masks_of(self, prompts: Sequence[str]) -> torch.Tensor:
        if self.background_mean is None:
            self.prepare([])
        return select_mask(self.prompt_features(prompts), self.background_mean, self.k, self.permutation)

    def route(self, queries: Sequence[Query]) -> list[tuple[int | None, float]]:
        """For each query: the index of the edit whose mask to use (None = memory off) and the best overlap."""
        if not len(self.masks) or not queries:
            return [(None, 0.0)] * len(queries)
        index, overlap = best_match(self.masks_of([q.prompt for q in queries]), self.masks, self.k)
        # one transfer for the whole batch of queries, not a float() per query
        decisions = [(i if o >= self.threshold else None, o) for i, o in zip(index.tolist(), overlap.tolist())]
        self.routed["queries"] += len(decisions)
        self.routed["memory_on"] += sum(d is not None for d, _ in decisions)
        return decisions

    # ------------------------------------------------------------------ background
    def prepare(self, training_knowledge: Sequence[Knowledge]) -> None:
        """Fit the background mean μ from unrelated prompts (see the module docstring)."""
        source = self.background_source
        training_prompts = [p for item in training_knowledge for p, _ in self.edit_pairs(item)][: self.n_background]
        if source == "auto":
            source = "training" if training_prompts else "model"
        if source == "training":
            if not training_prompts:
                raise KBenchError("method.background_source=training needs a task with a training split "
                                  "(Task.training_knowledge); use background_source=model")
            prompts = training_prompts
        else:
            spec = GenerationSpec(max_new_tokens=self.background_tokens, stop=())
            samples = self.lm.sample(self.lm.start_ids, self.n_background, spec, temperature=1.0, top_p=1.0, seed=self.seed)
            prompts = [s for s in samples if s.strip()]
        self.background_mean = self.prompt_features(prompts).mean(0)
        self.background_used = f"{source} ({len(prompts)} prompts)"
        log.info("memoir: background from %s", self.background_used)
        if self.calibrate_threshold is not None:
            self._calibrate(training_knowledge)

    def _calibrate(self, training_knowledge: Sequence[Knowledge]) -> None:
        """Set `threshold` on the held-out split: the training edits' masks stand for stored edits, and the
        threshold is the lowest that routes `calibrate_threshold` of their locality prompts to no edit."""
        edits = [item for item in training_knowledge if item.meta.get("locality_prompts") and "prompt" in item.meta]
        if not edits:
            raise KBenchError("method.calibrate_threshold needs held-out edits with locality prompts (task=editing "
                              "with a training split); set it to null to use method.threshold")
        stored = self.masks_of([item.meta["prompt"] for item in edits])
        _, best = best_match(self.masks_of([p for item in edits for p in item.meta["locality_prompts"]]), stored, self.k)
        candidates = sorted(set(best.tolist())) + [1.0 + 1.0 / self.k]
        self.threshold = next(t for t in candidates if (best < t).float().mean() >= self.calibrate_threshold)
        self.threshold_source = (f"calibrated: routes {self.calibrate_threshold:.0%} of {len(best)} held-out locality "
                                 f"prompts off against {len(edits)} held-out edits")
        log.info("memoir: threshold %.4f (%s)", self.threshold, self.threshold_source)

    # ------------------------------------------------------------------ editing
    def edit_pairs(self, item: Knowledge) -> list[tuple[str, str]]:
        """(prompt, target) pairs of one piece of knowledge: the structured edit, else QA sentences."""
        if "prompt" in item.meta and "target" in item.meta:
            return [(item.meta["prompt"], item.meta["target"])]
        pairs = []
        for sentence in item.train_sentences:
            head, marker, tail = sentence.rpartition(self.answer_marker)
            if not marker or not tail.strip():
                raise KBenchError(
                    f"method=memoir edits (prompt, target) pairs: knowledge {item.id!r} has no structured edit in its meta "
                    f"and its training sentence {sentence!r} has no answer after {self.answer_marker!r} "
                    "(set method.answer_marker, or use task=editing)"
                )
            pairs.append((head + marker, tail.rstrip("\n")))
        if not pairs:
            raise KBenchError(f"method=memoir: knowledge {item.id!r} carries neither a structured edit nor QA sentences")
        return pairs

    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        for item in knowledge:
            for prompt, target in self.edit_pairs(item):
                self._edit(item.id, prompt, target)

    def _edit(self, edit_id: str, prompt: str, target: str) -> None:
        mask = self.masks_of([prompt])[0]
        columns = mask.nonzero().squeeze(1)
        batch = self.lm.collate([(self.prompt_ids(Query(id=edit_id, prompt=prompt)), self.lm.encode(target + self.target_suffix))])
        trainable = self.memory.weight.index_select(1, columns).clone().requires_grad_(True)
        optimizer = torch.optim.SGD([trainable], lr=self.lr, weight_decay=self.weight_decay)
        losses: list[float] = []
        with self.memory.training(columns, trainable):
            for _ in progress(range(self.iterations), desc=f"memoir edit {len(self.edit_ids) + 1}"):
                loss = F.cross_entropy(self.lm.target_logits(batch), batch.target_ids)
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise NonFiniteLossError(f"memoir: loss became {losses[-1]} on edit {edit_id!r}; lower method.lr")
                if losses[-1] <= self.stop_loss:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([trainable], self.max_grad_norm)
                optimizer.step()
        with torch.no_grad():
            self.memory.weight[:, columns] = trainable.detach()
        self.masks = torch.cat([self.masks, mask[None]])
        self.edit_ids.append(edit_id)
        self.edit_losses.append((losses[0], losses[-1], len(losses)))

    # ------------------------------------------------------------------ inference
    def _row_state(self, decisions: Sequence[tuple[int | None, float]]):
        """`LM.generate` / `LM.score`'s per-batch hook: the rows' stored masks (None: memory off)."""
        masks = [None if edit is None else self.masks[edit] for edit, _ in decisions]
        return lambda rows: self.memory.rows([masks[i] for i in rows])

    def answer(self, queries: Sequence[Query], generation: GenerationSpec) -> list[Answer]:
        decisions = self.route(queries)
        texts = self.lm.generate([self.prompt_ids(q) for q in queries], generation, row_state=self._row_state(decisions))
        return [
            Answer(text, meta={"memoir_edit": None if edit is None else self.edit_ids[edit], "overlap": round(overlap, 4)})
            for text, (edit, overlap) in zip(texts, decisions)
        ]

    def score(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        decisions = self.route(queries)
        pairs = [(self.prompt_ids(q), self.lm.encode(t)) for q, t in zip(queries, targets)]
        return self.lm.score(pairs, row_state=self._row_state(decisions))

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        with torch.no_grad():
            self.memory.weight.zero_()
        self.masks = self.masks[:0]
        self.edit_ids, self.edit_losses = [], []

    def remove(self) -> None:
        """Detach the hooks from the model (the method is unusable afterwards)."""
        for handle in self.memory.handles:
            handle.remove()

    def extra_storage_bytes(self) -> int:
        weight = self.memory.weight.numel() * self.memory.weight.element_size()
        masks = self.masks.numel()  # one byte per column per stored edit
        routing = self.permutation.numel() * self.permutation.element_size()
        if self.background_mean is not None:
            routing += self.background_mean.numel() * self.background_mean.element_size()
        return weight + masks + routing

    def info(self) -> dict[str, Any]:
        losses = self.edit_losses
        return {
            "layer": self.layer_index,
            "mask_columns": f"{self.k} of {self.dim}",
            "threshold": self.threshold,
            "threshold_source": self.threshold_source,
            "edits_stored": len(self.edit_ids),
            "background": self.background_used,
            "routed_queries": dict(self.routed),
            "mean_first_loss": sum(l[0] for l in losses) / len(losses) if losses else None,
            "mean_final_loss": sum(l[1] for l in losses) / len(losses) if losses else None,
            "mean_iterations": sum(l[2] for l in losses) / len(losses) if losses else None,
            "columns_used": int(self.masks.any(0).sum()) if len(self.masks) else 0,
        }
