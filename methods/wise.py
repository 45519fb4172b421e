"""`method=wise`: WISE, a side memory for one FFN value matrix with activation routing, knowledge
sharding and merging (Wang et al., NeurIPS 2024, "WISE: Rethinking the Knowledge Memory for Lifelong
Model Editing of Large Language Models"; reference code: zjunlp/EasyEdit `easyeditor/models/wise/`,
run as WISE-Retrieve, the reference's configs for Llama-2-7B and Mistral-7B).

The main memory W (the down-projection of layer `layer`) is never changed; edits go into a side copy W'.
For a query with projection inputs x_t (t over its prompt's tokens) and σ the model's MLP activation:

    Δ(W̃) = mean_t ‖σ(W̃ x_t) − σ(W x_t)‖₂          (the routing activation of memory W̃)
    out(x) = W̃* x  for the memory W̃* with the largest Δ above its threshold ε_W̃ · act_ratio, else W x

- Edit (`inject`), one per (prompt, target): 11 rows = the prompt behind each context template ("{}" and
  10 short greedy continuations of "I", "You", "Because", "Yes", "Q: ", 5 and 10 tokens, generated once)
  + target, and one irrelevant row x_i (a held-out edit's locality prompt + answer, like the reference's
  training-set `loc_prompt`). W' is trained by SGD (lr, weight decay 1e-5) on

    L = −log p(target | template + prompt) + mean⁺[Δ_i − Δ_e + γ] + mean⁺[Δ_i − α] + mean⁺[β − Δ_e]

  (mean⁺: mean over the positive terms; Δ_e per template row, Δ_i on the irrelevant row), with the
  gradient masked to this shard's random subspace (each element kept with probability `mask_ratio`),
  W' clamped to W ± `norm_constraint` after each step, at most `iterations` steps (stop once the loss is
  ≤ 0.02 and flat). The edit's final mean Δ_e updates the shard's threshold ε = min over its edits.
- Sharding and merging: every `save_freq` edits W' is stored as a shard memory and a fresh W' = W gets a
  new random mask; every `merge_freq` edits the last merge_freq / save_freq shards are merged into one
  memory by TIES (task vectors W_k − W, top-`densities` by magnitude, sign election by sum, weighted
  mean of the agreeing entries, weights `merge_weight` / n), whose threshold is the least of theirs.
- Inference (`answer`, `loglikelihood`): each query is routed once, before its forward pass, on what the forward
  reads (`routing=sequence`, the reference: prompt + target under teacher forcing, the prompt when
  generating; `prompt`: the prompt alone for both): the current W' is used when Δ ≥ its threshold, a
  stored memory when its Δ exceeds both that and its own threshold; otherwise the main memory, and the
  logits are exactly the base model's.
- `extra_storage_bytes`: W' and every stored memory (fp32), the current mask (one byte per element),
  the thresholds.

Deviations, not knobs: a generated answer keeps its prompt's routing for every generated token (the
reference decides per forward call, so per generated token while decoding); Δ and the
fine-tuning loss average over real tokens only (the reference also averages over padding positions);
no replay (off in the reference configs) and no WISE-Merge mode (`retrieve: False`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from transformers.activations import ACT2FN

from core.lm import LM
from core.options import checked
from core.progress import progress
from core.types import (
    Answer, GenerationSpec, KBenchError, Knowledge, NonFiniteLossError, NonNegativeFloat, PositiveFloat, PositiveInt,
    Query, TargetScore, UnitFloat,
)
from methods.base import Method, edit_pairs
from core.replay import FrozenPrefix

log = logging.getLogger(__name__)

TEMPLATE_STARTS = ("I", "You", "Because", "Yes", "Q: ")  # the reference's context-template prompts


def routing_activation(original: torch.Tensor, edited: torch.Tensor, act, weights: torch.Tensor) -> torch.Tensor:
    """Δ per row: mean over the tokens weighted by `weights` `[B, T]` of ‖act(edited) − act(original)‖₂."""
    distance = torch.linalg.vector_norm(act(edited.float()) - act(original.float()), dim=-1)
    return (distance * weights).sum(1) / weights.sum(1)


def positive_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of the positive entries (0 when there are none), the reference's margin reduction."""
    positive = values[values > 0]
    return positive.mean() if positive.numel() else values.new_zeros(())


def ties_merge(base: torch.Tensor, memories: Sequence[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES merge of `memories` into `base`: keep each task vector's top-`density` entries by magnitude,
    elect each entry's sign by the weighted sum, average the agreeing weighted entries (by their weights)."""
    deltas = []
    for memory in memories:
        delta = memory - base
        k = int(density * delta.numel())
        if k < delta.numel():
            keep = torch.zeros(delta.numel(), dtype=torch.bool, device=delta.device)
            keep[delta.abs().flatten().topk(k).indices] = True
            delta = delta * keep.view_as(delta)
        deltas.append(delta)
    stacked = torch.stack(deltas)
    w = torch.tensor(list(weights), dtype=stacked.dtype, device=stacked.device).view(-1, *[1] * base.dim())
    weighted = stacked * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (weighted.sign() == sign).to(stacked.dtype)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return base + (weighted * agree).sum(0) / divisor


class _SideMemory:
    """The forward hook on the down-projection. Modes: editing (the side weight's output replaces the
    layer's; both are kept for Δ), and routed inference inside `rows(weights)`: row b's output becomes `weights[b] x` (None: the layer's own, untouched)."""

    def __init__(self, module: torch.nn.Linear) -> None:
        self.editing: torch.Tensor | None = None
        self.outputs: tuple[torch.Tensor, torch.Tensor] | None = None  # (original, side) of the last editing forward
        self.row_weights: list[torch.Tensor | None] | None = None
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0] if args else kwargs["input"]
        if self.editing is not None:
            side = F.linear(x.to(self.editing.dtype), self.editing)
            self.outputs = (output.detach(), side)
            return side.to(output.dtype)
        if self.row_weights is None:
            return None
        if x.shape[0] != len(self.row_weights):
            raise KBenchError(f"method=wise: a forward of {x.shape[0]} rows inside a session for {len(self.row_weights)}")
        rows = [output[b] if w is None else F.linear(x[b].to(w.dtype), w.to(x.device)).to(output.dtype)
                for b, w in enumerate(self.row_weights)]
        return torch.stack(rows)

    @contextlib.contextmanager
    def rows(self, weights: list[torch.Tensor | None]) -> Iterator[None]:
        self.row_weights = None if all(w is None for w in weights) else weights
        try:
            yield
        finally:
            self.row_weights = None


class WiseMethod(Method):
    """WISE-Retrieve: side memory W' of one down-projection, routed by activation, sharded and merged."""

    name = "wise"
    # EasyEdit hparams/WISE/mistral-7b.yaml (= llama-7b.yaml): layer 27 of 32, the paper's Mistral-7B anchor
    reference = {"layer": 27 / 32, "mask_ratio": 0.2, "lr": 1.0, "iterations": 70, "norm_constraint": 1.0,
                 "alpha": 5.0, "beta": 20.0, "gamma": 10.0, "act_ratio": 0.88, "save_freq": 500,
                 "merge_freq": 1000, "densities": 0.53, "merge_weight": 1.0, "routing": "sequence"}

    @checked("method")
    def __init__(
        self,
        lm: LM,
        layer: int | float = 27 / 32,
        module: str = "mlp.down_proj",
        mask_ratio: Annotated[float, Field(gt=0, le=1)] = 0.2,
        lr: PositiveFloat = 1.0,
        iterations: PositiveInt = 70,
        weight_decay: NonNegativeFloat = 1e-5,
        norm_constraint: PositiveFloat | None = 1.0,
        alpha: float = 5.0,
        beta: float = 20.0,
        gamma: float = 10.0,
        act_ratio: PositiveFloat = 0.88,
        save_freq: PositiveInt = 500,
        merge_freq: PositiveInt = 1000,
        densities: UnitFloat = 0.53,
        merge_weight: PositiveFloat = 1.0,
        template_lengths: list[PositiveInt] | None = None,
        routing: Literal["sequence", "prompt"] = "sequence",
        answer_marker: str = "\nAnswer:",
        n_irrelevant: PositiveInt = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(lm)
        if merge_freq % save_freq:
            raise ValueError(f"method.merge_freq={merge_freq} must be a multiple of method.save_freq={save_freq}")
        self.layer = layer
        self.layer_index, self.target_module = lm.linear_at(layer, module)
        self.mask_ratio, self.lr, self.iterations, self.weight_decay = mask_ratio, lr, iterations, weight_decay
        self.norm_constraint, self.alpha, self.beta, self.gamma = norm_constraint, alpha, beta, gamma
        self.act_ratio, self.save_freq, self.merge_freq = act_ratio, save_freq, merge_freq
        self.densities, self.merge_weight = densities, merge_weight
        self.template_lengths = list(template_lengths if template_lengths is not None else [5, 10])
        self.answer_marker, self.n_irrelevant, self.seed = answer_marker, n_irrelevant, seed
        self.routing = routing
        config = lm.causal_lm.config
        act_name = getattr(config, "hidden_act", None) or getattr(config, "hidden_activation", None) or "silu"
        self.act = ACT2FN[act_name]
        self.main = self.target_module.weight.detach().float()  # W, fp32, for the clamp, the merge, fresh W'
        self.hook = _SideMemory(self.target_module)
        self.templates: list[str] | None = None
        self.irrelevant: list[str] = []
        self.generator = torch.Generator().manual_seed(seed)
        self._fresh()

    def _fresh(self) -> None:
        """Empty state: W' = W with no edits, no stored memories."""
        self.side = self.main.clone()
        self.side_threshold = math.inf  # min Δ over the shard's edits (reference: EditingMeanAct, 1e9 when empty)
        self.memories: list[torch.Tensor] = []
        self.memory_thresholds: list[float] = []
        self.mask: torch.Tensor | None = None
        self.edits_done, self.merges = 0, 0
        self.edit_log: list[dict[str, Any]] = []
        self.routed = {"queries": 0, "main": 0, "side": 0, "memory": 0}
        self.generator.manual_seed(self.seed)

    # ------------------------------------------------------------------ data the edits need
    def prepare(self, training_knowledge: Sequence[Knowledge]) -> None:
        """Context templates (the model's own greedy continuations, as the reference) and the irrelevant rows:
        the held-out edits' locality prompts with their answers, else the model's own samples."""
        spec = lambda n: GenerationSpec(max_new_tokens=n, stop=())  # noqa: E731
        templates = ["{}"]
        for length in self.template_lengths:
            texts = self.lm.generate_until([self.lm.prompt_ids(s) for s in TEMPLATE_STARTS], spec(length))
            templates += [(start.rstrip() + " " + text.replace("{", " ").replace("}", " ")).strip() + " {}"
                          for start, text in zip(TEMPLATE_STARTS, texts)]
        self.templates = templates
        rows = [p + " " + a for item in training_knowledge if item.edit is not None
                for p, a in zip(item.edit.locality_prompts, item.edit.locality_answers)]
        if rows:
            self.irrelevant, source = rows[: self.n_irrelevant], "training"
        else:
            samples = self.lm.sample_texts(self.n_irrelevant, 16, 1.0, self.seed,
                                           batch_size=self.n_irrelevant)  # one seeded batch, as recorded runs drew them
            self.irrelevant, source = [s for s in samples if s.strip()], "model"
        log.info("wise: %d context templates, %d irrelevant rows from %s", len(self.templates), len(self.irrelevant), source)

    # ------------------------------------------------------------------ routing
    @torch.no_grad()
    def inputs_of(self, sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The projection's inputs over each token sequence `[N, T, D]` and the real-token weights `[N, T]`."""
        batch = self.lm.collate([(list(ids[:-1]), list(ids[-1:])) for ids in sequences])
        (captured,) = self.lm.module_inputs([self.target_module], batch.input_ids, batch.attention_mask)
        return captured.float(), batch.attention_mask.to(captured.device).float()

    def _delta(self, weight: torch.Tensor, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return routing_activation(F.linear(x, self.main), F.linear(x, weight), self.act, mask)

    def route(self, sequences: Sequence[Sequence[int]]) -> list[int | None]:
        """Per token sequence: None (main memory), -1 (the current side memory W') or a stored memory's index."""
        if not self.edits_done or not sequences:
            return [None] * len(sequences)
        decisions = []
        for chunk in self.lm.batches(list(sequences), desc="wise routing"):
            x, mask = self.inputs_of(chunk)
            best = self._delta(self.side, x, mask)  # the reference starts from W' and keeps Δ even below its threshold
            choice = [-1 if d >= self.side_threshold * self.act_ratio else None for d in best.tolist()]
            for i, (memory, threshold) in enumerate(zip(self.memories, self.memory_thresholds)):
                delta = self._delta(memory, x, mask)
                wins = (delta > best) & (delta > threshold * self.act_ratio)
                choice = [i if w else c for w, c in zip(wins.tolist(), choice)]
                best = torch.where(wins, delta, best)
            decisions += choice
        self.routed["queries"] += len(decisions)
        for d in decisions:
            self.routed["main" if d is None else "side" if d == -1 else "memory"] += 1
        return decisions

    def _row_state(self, decisions: Sequence[int | None]):
        weights = [None if d is None else self.side if d == -1 else self.memories[d] for d in decisions]
        return lambda rows: self.hook.rows([weights[i] for i in rows])

    def answer(self, queries: Sequence[Query], generation: GenerationSpec) -> list[Answer]:
        prompts = [self.prompt_ids(q) for q in queries]
        decisions = self.route(prompts)  # the prompt is all there is before decoding (the reference's prefill)
        texts = self.lm.generate_until(prompts, generation, row_state=self._row_state(decisions))
        names = {None: "main", -1: "side"}
        return [Answer(t, meta={"wise_memory": names.get(d, d)}) for t, d in zip(texts, decisions)]

    def loglikelihood(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        pairs = [(self.prompt_ids(q), self.lm.encode(t)) for q, t in zip(queries, targets)]
        # routing = "sequence": on what the teacher-forced forward reads, prompt + target (the reference's
        # evaluation); "prompt": on the prompt alone, as a generated answer is routed
        decisions = self.route([p + t if self.routing == "sequence" else p for p, t in pairs])
        return self.lm.loglikelihood(pairs, row_state=self._row_state(decisions))

    # ------------------------------------------------------------------ editing
    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        if self.templates is None:
            self.prepare([])
        for item in knowledge:
            for prompt, target in edit_pairs(item, self.answer_marker, self.name):
                self._edit(item.id, prompt, target)

    def _new_mask(self) -> None:
        """This shard's random subspace: each element of W' is trainable with probability mask_ratio."""
        draw = torch.rand(self.side.shape, generator=self.generator)
        self.mask = (draw < self.mask_ratio).to(self.side.device)

    def _edit(self, edit_id: str, prompt: str, target: str) -> None:
        if self.edits_done % self.save_freq == 0:
            self._new_mask()
        irrelevant = self.irrelevant[self.edits_done % len(self.irrelevant)]
        x_irr, m_irr = self.inputs_of([self.lm.prompt_ids(irrelevant)])
        target_ids = self.lm.encode(target)
        batch = self.lm.collate([(self.lm.prompt_ids(t.format(prompt)), target_ids) for t in self.templates])
        real = batch.attention_mask.float()
        weight = self.side.clone().requires_grad_(True)
        optimizer = torch.optim.SGD([weight], lr=self.lr, weight_decay=self.weight_decay)
        losses: list[float] = []
        in_scope = math.nan
        self.hook.editing = weight
        # the layers below the side memory never change: computed once per edit (checked on the first edit)
        frozen = FrozenPrefix(self.lm.decoder_layers(), self.layer_index, check=not self.edit_log)
        try:
            for _ in progress(range(self.iterations), desc=f"wise edit {self.edits_done + 1}"):
                logits = frozen.verified(lambda: self.lm.target_logits(batch))
                token_loss = F.cross_entropy(logits, batch.target_ids, reduction="none")
                ft = torch.stack([row.mean() for row in token_loss.split(batch.target_lengths)]).mean()
                original, side = self.hook.outputs
                delta_edit = routing_activation(original, side, self.act, real.to(side.device))
                delta_irr = self._delta(weight, x_irr, m_irr)
                act = (positive_mean(delta_irr.view(-1, 1) - delta_edit + self.gamma)
                       + positive_mean(delta_irr - self.alpha) + positive_mean(self.beta - delta_edit))
                loss = ft + act.to(ft.device)
                in_scope = float(delta_edit.mean().detach())
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise NonFiniteLossError(f"wise: loss became {losses[-1]} on edit {edit_id!r}; lower method.lr")
                # the reference's EarlyStopMeter: loss ≤ 0.02 and flat (checked on the previous two steps)
                if len(losses) > 2 and abs(losses[-2] - losses[-3]) <= 1e-4 and losses[-2] <= 0.02:
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                weight.grad *= self.mask  # only this shard's subspace learns
                optimizer.step()
                if self.norm_constraint is not None:
                    with torch.no_grad():
                        weight.copy_(torch.clamp(weight, self.main - self.norm_constraint, self.main + self.norm_constraint))
        finally:
            self.hook.editing, self.hook.outputs = None, None
        self.side = weight.detach()
        self.side_threshold = min(self.side_threshold, in_scope)
        self.edits_done += 1
        self.edit_log.append({"id": edit_id, "first_loss": losses[0], "last_loss": losses[-1], "steps": len(losses),
                              "delta_edit": in_scope})
        if self.edits_done % self.save_freq == 0:  # the shard is full: store it, start a fresh W'
            self.memories.append(self.side)
            self.memory_thresholds.append(self.side_threshold)
            self.side, self.side_threshold = self.main.clone(), math.inf
        if self.edits_done % self.merge_freq == 0:
            n = self.merge_freq // self.save_freq
            merged = ties_merge(self.main, self.memories[-n:], [self.merge_weight / n] * n, self.densities)
            threshold = min(self.memory_thresholds[-n:])
            self.memories, self.memory_thresholds = self.memories[:-n] + [merged], self.memory_thresholds[:-n] + [threshold]
            self.merges += 1

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        self._fresh()

    def extra_storage_bytes(self) -> int:
        if not self.edits_done:
            return 0
        weights = (1 + len(self.memories)) * self.side.numel() * 4
        mask = self.mask.numel() if self.mask is not None else 0
        return weights + mask + 8 * (1 + len(self.memories))

    def info(self) -> dict[str, Any]:
        log_ = self.edit_log
        return {
            "layer": self.layer_index,
            "edits": self.edits_done,
            "memories": len(self.memories),
            "merges": self.merges,
            "side_threshold": None if math.isinf(self.side_threshold) else self.side_threshold * self.act_ratio,
            "memory_thresholds": [t * self.act_ratio for t in self.memory_thresholds],
            "templates": len(self.templates or []),
            "routed_queries": dict(self.routed),
            "mean_first_loss": sum(e["first_loss"] for e in log_) / len(log_) if log_ else None,
            "mean_final_loss": sum(e["last_loss"] for e in log_) / len(log_) if log_ else None,
            "mean_steps": sum(e["steps"] for e in log_) / len(log_) if log_ else None,
        }

    def save_state(self, directory: Path) -> bool:
        tensors = {"side": self.side.cpu().contiguous()} | {f"memory{i}": m.cpu().contiguous() for i, m in enumerate(self.memories)}
        if self.mask is not None:
            tensors["mask"] = self.mask.cpu().to(torch.uint8).contiguous()
        save_file(tensors, str(directory / "wise_memories.safetensors"))
        state = {"side_threshold": None if math.isinf(self.side_threshold) else self.side_threshold,
                 "memory_thresholds": self.memory_thresholds, "edits_done": self.edits_done, "merges": self.merges,
                 "edit_log": self.edit_log, "templates": self.templates, "irrelevant": self.irrelevant,
                 "generator": self.generator.get_state().tolist()}
        (directory / "wise_state.json").write_text(json.dumps(state, ensure_ascii=False))
        return True

    def load_state(self, directory: Path) -> None:
        tensors = load_file(str(directory / "wise_memories.safetensors"))
        state = json.loads((directory / "wise_state.json").read_text())
        device = self.main.device
        self.side = tensors["side"].to(device)
        self.memories = [tensors[f"memory{i}"].to(device) for i in range(len(state["memory_thresholds"]))]
        self.mask = tensors["mask"].to(device).bool() if "mask" in tensors else None
        self.side_threshold = math.inf if state["side_threshold"] is None else state["side_threshold"]
        self.memory_thresholds, self.edits_done, self.merges = state["memory_thresholds"], state["edits_done"], state["merges"]
        self.edit_log, self.templates, self.irrelevant = state["edit_log"], state["templates"], state["irrelevant"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    def remove(self) -> None:
        """Detach the hook from the model (the method is unusable afterwards)."""
        self.hook.handle.remove()
