"""`method=grace`: GRACE, a discrete key-value codebook at one layer (Hartvigsen et al., NeurIPS 2023,
"Aging with GRACE: Lifelong Model Editing with Discrete Key-Value Adaptors"; reference code:
Thartvigsen/GRACE and its port in zjunlp/EasyEdit `easyeditor/models/grace/`).

One Linear module f of layer `layer` (default the MLP down-projection) gets a codebook of
(key k_i, value v_i, deferral radius ε_i). For an input whose query h is f's input at the last prompt
token:

    i* = argmin_i ‖h − k_i‖₂,     f'(x)_t = v_{i*}   if ‖h − k_{i*}‖₂ ≤ ε_{i*} (t = the key token)
                                  f'(x)   = f(x)     otherwise (the layer untouched)

- Edit (`inject`), one per (prompt, target), query h_e at the edit prompt's last token. Codebook update
  (the paper's Algorithm 1, as the reference codes it), with d = ‖h_e − k_n‖ to the nearest key n:
  no key, or d > ε₀ + ε_n → a new entry (h_e, v, ε₀); d within reach and the stored target differs →
  a new entry and both radii split: ε_n = d/2 − 1e-5, ε_new = d/2; same target → expand ε_n to d if
  needed (`eps_expand=coverage`; `moving_average` also moves k_n halfway to h_e). Then the value of the
  entry nearest to h_e (new, or n) is trained, all else frozen: Adam (`lr`) for `iterations` steps on
  −log p(target | prompt) with the value in place. A new value starts uniform in [0, 1) (`value_init=cold`)
  or as f's own output at the key token (`warm`).
- Inference (`answer`, `loglikelihood`): each query is routed once, on its prompt, before its forward pass; inside
  the radius the value replaces f's output at the key token (`replacement=last`; `prompt`: at the tokens
  before it; `all`: at every position, generated tokens included). Outside the radius the hook returns
  nothing and the logits are exactly the base model's.
- Edits come from `Knowledge.edit` (`prompt`, `target`: task=editing) or, for QA tasks, from each
  training sentence split at its last `answer_marker`.
- `extra_storage_bytes`: keys + values + radii (fp32) + the stored targets' token ids (int32).

Deviations from the reference (each a knob, listed in `reference`): `replacement=last` (the reference's
Llama-2-7B config replaces the tokens *before* the key token; at the top layer those positions cannot
reach any target logit, so the value would get no gradient; EasyEdit's later configs use replace_last);
`layer` is the reference's 31 of 32 as a depth fraction. Not knobs: targets are compared by their token
ids (the reference compares the mean of the label tensors); the query token is the prompt's last one in
scoring and generation alike (the reference's teacher-forced evaluation reuses the last edit's position);
decoding steps never look the codebook up again (the reference re-queries each generated token).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from core.lm import LM
from core.replay import FrozenPrefix
from core.options import checked
from core.progress import progress
from core.types import (
    RETRIEVED_KNOWLEDGE_IDS, Answer, GenerationSpec, KBenchError, Knowledge, NonFiniteLossError, PositiveFloat, PositiveInt,
    Query, TargetScore,
)
from methods.base import Method, edit_pairs

log = logging.getLogger(__name__)


class _Codebook:
    """The forward hook that swaps in a codebook value. Modes: `training` (one value at one position, differentiable), and routed inference inside
    `rows(values, positions)`: row b gets `values[b]` (None = untouched) at `positions[b]` of the first
    forward of the session (the whole sequence; later forwards are decoding steps)."""

    def __init__(self, module: torch.nn.Linear, replacement: str) -> None:
        self.replacement = replacement
        self.train: tuple[int, torch.Tensor] | None = None
        self.row_values: list[torch.Tensor | None] | None = None
        self.row_positions: list[int] = []
        self.forwards = 0
        self.handle = module.register_forward_hook(self._hook, with_kwargs=True)

    def _replace(self, out: torch.Tensor, b: int, position: int, value: torch.Tensor, first: bool) -> torch.Tensor:
        value, device = value.to(device=out.device, dtype=out.dtype), out.device
        if self.replacement == "all":
            return out.index_put((torch.tensor([b], device=device),), value.expand(out.shape[1], -1)[None])
        if not first:  # decoding steps: the key token is in the cache, not in this forward
            return out
        if self.replacement == "last":
            return out.index_put((torch.tensor([b], device=device), torch.tensor([position], device=device)), value[None])
        rows = torch.full((position,), b, device=device)  # "prompt": the tokens before the key token
        return out.index_put((rows, torch.arange(position, device=device)), value.expand(position, -1))

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0] if args else kwargs["input"]
        if self.train is not None:
            position, value = self.train
            return self._replace(output, 0, position, value, first=True)  # out-of-place: autograd sees it
        if self.row_values is None:
            return None
        first, self.forwards = self.forwards == 0, self.forwards + 1
        if x.shape[0] != len(self.row_values):
            raise KBenchError(f"method=grace: a forward of {x.shape[0]} rows inside a session for {len(self.row_values)}")
        out = output
        for b, value in enumerate(self.row_values):
            if value is not None:
                out = self._replace(out, b, self.row_positions[b], value, first)
        return out

    @contextlib.contextmanager
    def rows(self, values: list[torch.Tensor | None], positions: list[int]) -> Iterator[None]:
        self.row_values = None if all(v is None for v in values) else values
        self.row_positions, self.forwards = positions, 0
        try:
            yield
        finally:
            self.row_values = None


class GraceMethod(Method):
    """GRACE: a codebook of (key, value, radius) at one layer; inside a radius the value replaces the output."""

    name = "grace"
    # EasyEdit hparams/GRACE/llama-7B.yaml (Llama-2-7B, the model of the WISE paper's GRACE baseline)
    reference = {"layer": 31 / 32, "lr": 1.0, "iterations": 100, "eps": 1.0, "value_init": "cold",
                 "eps_expand": "coverage", "replacement": "prompt"}

    @checked("method")
    def __init__(
        self,
        lm: LM,
        layer: int | float = 31 / 32,
        module: str = "mlp.down_proj",
        eps: PositiveFloat = 1.0,
        lr: PositiveFloat = 1.0,
        iterations: PositiveInt = 100,
        value_init: Literal["cold", "warm"] = "cold",
        eps_expand: Literal["coverage", "moving_average"] = "coverage",
        replacement: Literal["last", "prompt", "all"] = "last",
        answer_marker: str = "\nAnswer:",
        seed: int = 0,
    ) -> None:
        super().__init__(lm)
        self.layer = layer
        self.layer_index, self.target_module = lm.linear_at(layer, module)
        self.eps, self.lr, self.iterations = eps, lr, iterations
        self.value_init, self.eps_expand, self.replacement = value_init, eps_expand, replacement
        self.answer_marker, self.seed = answer_marker, seed
        self.generator = torch.Generator().manual_seed(seed)
        self.hook = _Codebook(self.target_module, replacement)
        device = self.target_module.weight.device
        self.keys = torch.zeros((0, self.target_module.in_features), device=device)
        self.values = torch.zeros((0, self.target_module.out_features), device=device)
        self.epsilons = torch.zeros(0, device=device)
        self.labels: list[list[int]] = []  # each entry's target token ids (conflict test)
        self.edit_ids: list[list[str]] = []  # the edits each entry serves
        self.edit_log: list[dict[str, Any]] = []  # per edit: action, first / last loss
        self.routed = {"queries": 0, "in_radius": 0}

    # ------------------------------------------------------------------ queries
    @torch.no_grad()
    def queries_of(self, prompts: Sequence[str]) -> torch.Tensor:
        """f's input at each prompt's last token, `[N, D_in]` fp32 (codebook off, layers above skipped)."""
        rows = []
        for chunk in self.lm.batches(list(prompts), desc="grace keys"):
            ids = [self.lm.prompt_ids(p) for p in chunk]
            batch = self.lm.collate([(i[:-1], i[-1:]) for i in ids])  # right-padded; the last token is the "target"
            (captured,) = self.lm.module_inputs([self.target_module], batch.input_ids, batch.attention_mask)
            last = torch.tensor([len(i) - 1 for i in ids], device=captured.device)
            rows.append(captured[torch.arange(len(ids), device=last.device), last].float())
        return torch.cat(rows)

    def route(self, queries: Sequence[Query]) -> list[tuple[int | None, float]]:
        """Per query: the codebook entry whose value it gets (None: outside every radius) and the distance."""
        if not len(self.keys) or not queries:
            return [(None, math.inf)] * len(queries)
        distance, nearest = torch.cdist(self.queries_of([q.prompt for q in queries]), self.keys).min(1)
        inside = (distance <= self.epsilons[nearest]).tolist()
        decisions = [(n if ok else None, d) for n, d, ok in zip(nearest.tolist(), distance.tolist(), inside)]
        self.routed["queries"] += len(decisions)
        self.routed["in_radius"] += sum(n is not None for n, _ in decisions)
        return decisions

    # ------------------------------------------------------------------ editing
    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        for item in knowledge:
            for prompt, target in edit_pairs(item, self.answer_marker, self.name):
                self._edit(item.id, prompt, target)

    def _new_value(self, prompt_ids: list[int], position: int) -> torch.Tensor:
        if self.value_init == "cold":
            return torch.rand(self.values.shape[1], generator=self.generator).to(self.values.device)
        (output,) = self.lm.module_inputs([], torch.tensor([prompt_ids], device=self.lm.device),
                                          outputs_of=[self.target_module])
        return output[0, position].float()

    def _update_codebook(self, key: torch.Tensor, label: list[int], edit_id: str, prompt_ids: list[int]) -> tuple[int, str]:
        """The paper's codebook step for a new edit: which entry to train, and what happened."""
        def add(radius: float) -> int:
            value = self._new_value(prompt_ids, len(prompt_ids) - 1)
            self.keys = torch.cat([self.keys, key[None]])
            self.values = torch.cat([self.values, value[None]])
            self.epsilons = torch.cat([self.epsilons, self.epsilons.new_tensor([radius])])
            self.labels.append(label)
            self.edit_ids.append([edit_id])
            return len(self.keys) - 1

        if not len(self.keys):
            return add(self.eps), "add"
        distance, nearest = torch.cdist(key[None], self.keys)[0].min(0)
        d, n = float(distance), int(nearest)
        if d > self.eps + float(self.epsilons[n]):
            return add(self.eps), "add"
        if self.labels[n] != label:  # a conflicting edit in reach: both radii split the gap
            new = add(d / 2)
            self.epsilons[n] = d / 2 - 1e-5
            return new, "split"
        if d > float(self.epsilons[n]):
            if self.eps_expand == "moving_average":
                self.keys[n] = 0.5 * self.keys[n] + 0.5 * key
            self.epsilons[n] = d
        self.edit_ids[n].append(edit_id)
        return n, "expand"

    def _edit(self, edit_id: str, prompt: str, target: str) -> None:
        prompt_ids, target_ids = self.lm.prompt_ids(prompt), self.lm.encode(target)
        key = self.queries_of([prompt])[0]
        entry, action = self._update_codebook(key, target_ids, edit_id, prompt_ids)
        batch = self.lm.collate([(prompt_ids, target_ids)])
        value = self.values[entry].clone().requires_grad_(True)
        optimizer = torch.optim.Adam([value], lr=self.lr)
        losses: list[float] = []
        self.hook.train = (len(prompt_ids) - 1, value)
        # the layers below the codebook never change: computed once per edit (checked on the first edit)
        frozen = FrozenPrefix(self.lm.decoder_layers(), self.layer_index, check=not self.edit_log)
        try:
            for _ in progress(range(self.iterations), desc=f"grace edit {len(self.edit_log) + 1}"):
                loss = F.cross_entropy(frozen.verified(lambda: self.lm.target_logits(batch)), batch.target_ids)
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise NonFiniteLossError(f"grace: loss became {losses[-1]} on edit {edit_id!r}; lower method.lr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        finally:
            self.hook.train = None
        with torch.no_grad():
            self.values[entry] = value.detach()
        self.edit_log.append({"id": edit_id, "action": action, "first_loss": losses[0], "last_loss": losses[-1]})

    # ------------------------------------------------------------------ inference
    def _row_state(self, decisions: Sequence[tuple[int | None, float]], key_positions) -> Any:
        values = [None if entry is None else self.values[entry] for entry, _ in decisions]
        return lambda rows: self.hook.rows([values[i] for i in rows], key_positions(rows))

    def answer(self, queries: Sequence[Query], generation: GenerationSpec) -> list[Answer]:
        decisions = self.route(queries)
        prompts = [self.prompt_ids(q) for q in queries]
        # generation batches are left-padded (prompts cut to `room` tokens): every prompt's last token sits
        # at the batch's last column
        room = self.lm.max_length - generation.max_new_tokens
        lengths = [min(len(p), room) for p in prompts]
        last_column = lambda rows: [max(lengths[i] for i in rows) - 1] * len(rows)  # noqa: E731
        texts = self.lm.generate_until(prompts, generation, row_state=self._row_state(decisions, last_column))
        # the edits the entry serves (several when they share its label), in the order they were made
        return [Answer(text, meta={RETRIEVED_KNOWLEDGE_IDS: [] if entry is None else list(self.edit_ids[entry]),
                                   "grace_entry": entry, "distance": round(d, 4) if math.isfinite(d) else None})
                for text, (entry, d) in zip(texts, decisions)]

    def loglikelihood(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        decisions = self.route(queries)
        pairs = [(self.prompt_ids(q), self.lm.encode(t)) for q, t in zip(queries, targets)]
        # scoring batches are right-padded: the key token is at the prompt's own last position
        return self.lm.loglikelihood(pairs, row_state=self._row_state(decisions, lambda rows: [len(pairs[i][0]) - 1 for i in rows]))

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        self.keys, self.values, self.epsilons = self.keys[:0], self.values[:0], self.epsilons[:0]
        self.labels, self.edit_ids, self.edit_log = [], [], []
        self.generator.manual_seed(self.seed)

    def extra_storage_bytes(self) -> int:
        tensors = sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.epsilons))
        return tensors + 4 * sum(len(label) for label in self.labels)

    def info(self) -> dict[str, Any]:
        log_ = self.edit_log
        actions = [e["action"] for e in log_]
        return {
            "layer": self.layer_index,
            "entries": len(self.keys),
            "edits": len(log_),
            "actions": {a: actions.count(a) for a in ("add", "split", "expand")},
            "mean_radius": float(self.epsilons.mean()) if len(self.epsilons) else None,
            "routed_queries": dict(self.routed),
            "mean_first_loss": sum(e["first_loss"] for e in log_) / len(log_) if log_ else None,
            "mean_final_loss": sum(e["last_loss"] for e in log_) / len(log_) if log_ else None,
        }

    def save_state(self, directory: Path) -> bool:
        save_file({"keys": self.keys.cpu().contiguous(), "values": self.values.cpu().contiguous(),
                   "epsilons": self.epsilons.cpu().contiguous()}, str(directory / "grace_codebook.safetensors"))
        state = {"labels": self.labels, "edit_ids": self.edit_ids, "edit_log": self.edit_log,
                 "generator": self.generator.get_state().tolist()}
        (directory / "grace_state.json").write_text(json.dumps(state))
        return True

    def load_state(self, directory: Path) -> None:
        tensors = load_file(str(directory / "grace_codebook.safetensors"))
        device = self.keys.device
        self.keys, self.values, self.epsilons = (tensors[k].to(device) for k in ("keys", "values", "epsilons"))
        state = json.loads((directory / "grace_state.json").read_text())
        self.labels, self.edit_ids, self.edit_log = state["labels"], state["edit_ids"], state["edit_log"]
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    def remove(self) -> None:
        """Detach the hook from the model (the method is unusable afterwards)."""
        self.hook.handle.remove()
