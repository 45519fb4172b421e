"""`method=memoir`: MEMOIR sparse residual memory (Wang et al. 2025, "MEMOIR: Lifelong Model Editing with
Minimal Overwrite and Informed Retention"), faithful by default to its code, qym7/MEMOIR (EasyEdit-based):
`easyeditor/models/memoir/` (`MEMOIR.py`: TopHasher, MEMOIR.edit, _cal_ft_loss, MEMOIRAdapter; the module
with `apply_memoir_to_model`; `utils.py`: tokenize, EarlyStopMeter, get_context_templates),
`hparams/MEMOIR/llama3-8b.yaml` and the runner `examples/run_wise_editing.py`. docs/editing.md says where
each setting is read.

One MLP down-projection W of layer `layer` gets a zero-initialised residual copy W_mem of the same shape:

    out(x) = W x + W_mem[:, m] x[m]

where x is the projection's input (the MLP's hidden activation, D = 2048 on Gemma 3 270M) at each
position and m is a sample-dependent set of k = round(density · D) input columns (the mask):

    m(prompt) = π( top-k_i | mean_t x_t,i(prompt) − μ_i | )

mean_t runs over the prompt's tokens, the start token (BOS) included (`include_start_tokens`, as the
reference at inference), μ is the same mean averaged over `n_background` unrelated texts (the background),
and π a fixed, seeded random permutation of the D columns (the reference's TopHasher).

- Edit (`inject`), one per (prompt, target): m_e = m(prompt) is stored; only W_mem[:, m_e] gets gradient.
  The batch is the reference's (`training_rows`): the prompt + target, the prompt behind each of the
  `augment_prefixes()` ("prefix prompt" + target; 10 short texts the model generates from five start
  words at two lengths, cached under $KBENCH_CACHE/memoir/), and one unrelated background text that runs
  through the model without a loss (`unrelated_in_batch`). Loss: each loss row's mean cross-entropy over
  its target tokens, averaged over rows. SGD (lr, iterations, gradient-norm clip, weight decay over all
  of W_mem: `weight_decay_scope=memory`), early stop as the reference's EarlyStopMeter (`stop_loss`,
  `stop_flat`). Columns shared with earlier edits continue from their values (the reference's overwrite).
  Only the layers from the memory's up are replayed in each iteration (nothing below depends on W_mem;
  checked against the full forward on the first edit).
- Inference (`answer`, `loglikelihood`): the query's mask m_q is compared with every stored mask,
  overlap_e = |m_q ∩ m_e| / k. If the best overlap ≥ `threshold`, that edit's stored mask is applied at
  every position of the sequence (prompt and generated tokens); otherwise the memory is off and the
  layer's output is exactly W x (locality). Each query is routed on its own, once, before its forward
  pass; the LM wrapper hands each batch's rows to the memory, so a batch may mix masks row by row.
- Edits come from `Knowledge.edit` (`prompt`, `target`: task=editing) or, for QA tasks, from each
  training sentence split at its last `answer_marker` ("Question: q\\nAnswer:" | " a").
- Background texts (`prepare`): `locality` = the held-out split's locality prompts with their answers,
  "prompt answer" (the reference's `loc + ' ' + loc_ans` rows of zsre_mend_train.json); `general_text` =
  seeded sentences of WikiText-2 (core/general_text.py); `model` = the model's own samples; `edit_prompts`
  = the held-out edit prompts (the previous kbench behaviour, not the reference); `auto` = locality when
  the task has them, else general_text when the file exists, else model.
- `calibrate_threshold` (opt-in, not in the reference): instead of the fixed `threshold`, take the lowest
  threshold that routes that fraction of the held-out training edits' locality prompts to no edit, with
  the training edits' masks standing for the stored ones (the reference's 0.4 was set for Llama-3-8B).
- Deviations: `reference` holds the reference's value of every knob; `reference_deviations` names the
  knobs set otherwise (by default only `target_suffix`, kept so generations stop) and the runner appends
  them to every metric's protocol. The previous behaviour: augment_lengths=[] unrelated_in_batch=false
  background_source=edit_prompts weight_decay_scope=columns include_start_tokens=false stop_flat=null.
- `report`: a histogram of the best mask overlap of the stored edits' prompts, rephrasings and locality
  prompts against the threshold (`memoir_overlap.png` / `.json` beside the record).
- `extra_storage_bytes` = W_mem + the stored masks (one byte per column per edit) + the routing state
  (background mean, permutation).
"""
from __future__ import annotations

import contextlib
import logging
import math
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from transformers import GenerationConfig

from core import general_text
from core.cache import disk_cached, text_list
from core.io import atomic_write_json, stable_hash
from core.lm import LM, TokenBatch
from core.options import checked
from core.progress import progress
from core.types import (
    RETRIEVED_KNOWLEDGE_IDS, Answer, EditSpec, GenerationSpec, KBenchError, Knowledge, NonFiniteLossError, NonNegativeFloat,
    PositiveFloat, PositiveInt, Query, TargetScore, UnitFloat,
)
from methods.base import Method, edit_pairs

log = logging.getLogger(__name__)

BACKGROUND_SOURCES = ("auto", "locality", "general_text", "model", "edit_prompts")
#: the reference's augmentation (easyeditor/models/memoir/utils.py `get_context_templates`, called with
#: length_params=[[5, 5], [10, 5]] by memoir_main.py): continuations of these start words, 5 and 10 tokens
REFERENCE_STARTS = ["I", "You", "Because", "Yes", "Q: "]
REFERENCE_LENGTHS = [[5, 5], [10, 5]]
OVERLAP_PLOT = "memoir_overlap.png"
OVERLAP_JSON = "memoir_overlap.json"


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


class _ResidualMemory:
    """The forward hook that adds W_mem[:, m] x[m] to the down-projection's output.

    Two modes: training (one edit's columns with a trainable copy of them), and routed inference: inside `rows(masks)`, row b of every
    forward pass gets mask `masks[b]` (all-False = memory off). The LM wrapper enters `rows` around each
    batch with that batch's rows (`LM.generate_until` / `LM.loglikelihood`'s `row_state`), so the masks are decided
    once per prompt, before the forward, and a decoding step keeps its row's mask by construction; the
    hook reads nothing of how `generate` calls the model. Outside these modes the hook adds nothing.
    """

    def __init__(self, module: torch.nn.Linear) -> None:
        # W_mem, [D_out, D], in fp32 whatever the model's dtype: its SGD steps (lr 1.0) round away in bf16
        self.weight = torch.zeros_like(module.weight, dtype=torch.float32, requires_grad=False)
        self.columns: torch.Tensor | None = None  # training: the edit's mask as column indices
        self.trainable: torch.Tensor | None = None  # training: W_mem[:, columns] being optimised
        self.row_masks: torch.Tensor | None = None  # [B, D] masks of the current batch's rows; None: all off
        self.handles = [module.register_forward_hook(self._add_memory, with_kwargs=True)]

    def _add_memory(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
        x = args[0] if args else kwargs["input"]  # nn.Linear.forward(input)
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

    #: the reference's values (qym7/MEMOIR: hparams/MEMOIR/llama3-8b.yaml, easyeditor/models/memoir/); see
    #: the module docstring for where each is read. `layer` / `density` are the reference's as fractions.
    reference = {
        "layer": 0.84,
        "density": 0.2857,
        "threshold": 0.4,
        "calibrate_threshold": None,
        "lr": 1.0,
        "iterations": 30,
        "max_grad_norm": 1.0,
        "weight_decay": 1e-5,
        "weight_decay_scope": "memory",
        "stop_loss": 0.02,
        "stop_flat": 1e-4,
        "target_suffix": "",
        "augment_starts": list(REFERENCE_STARTS),
        "augment_lengths": [list(pair) for pair in REFERENCE_LENGTHS],
        "unrelated_in_batch": True,
        "include_start_tokens": True,
        "background_source": "locality",
        "n_background": 100,
    }

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
        weight_decay_scope: Literal["memory", "columns"] = "memory",
        stop_loss: NonNegativeFloat = 0.02,
        stop_flat: NonNegativeFloat | None = 1e-4,
        target_suffix: str = "\n",
        answer_marker: str = "\nAnswer:",
        augment_starts: list[str] = REFERENCE_STARTS,
        augment_lengths: list[list[int]] = REFERENCE_LENGTHS,
        unrelated_in_batch: bool = True,
        include_start_tokens: bool = True,
        background_source: Literal["auto", "locality", "general_text", "model", "edit_prompts"] = "auto",
        n_background: PositiveInt = 100,
        background_tokens: PositiveInt = 32,
        general_text: str | None = None,
        calibrate_threshold: Annotated[float, Field(gt=0, le=1)] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(lm)
        self.layer = layer
        self.layer_index, self.target_module = lm.linear_at(layer, module)
        for pair in augment_lengths:
            if len(pair) != 2 or pair[0] < 1 or pair[1] < len(augment_starts):
                raise ValueError(
                    f"method.augment_lengths: each entry is [max_new_tokens, n_gen] with max_new_tokens >= 1 and "
                    f"n_gen >= len(augment_starts) = {len(augment_starts)} (n_gen // that many prefixes per start "
                    f"word), got {list(pair)}"
                )
        if augment_lengths and not augment_starts:
            raise ValueError("method.augment_starts: the augmentation prefixes need at least one start word")
        self.dim = self.target_module.in_features
        self.density = density
        self.k = max(1, round(density * self.dim))
        self.threshold, self.lr, self.iterations = threshold, lr, iterations
        self.max_grad_norm, self.weight_decay, self.weight_decay_scope = max_grad_norm, weight_decay, weight_decay_scope
        self.stop_loss, self.stop_flat = stop_loss, stop_flat
        self.target_suffix, self.answer_marker = target_suffix, answer_marker
        self.augment_starts = [str(s) for s in augment_starts]
        self.augment_lengths = [[int(a), int(b)] for a, b in augment_lengths]
        self.unrelated_in_batch, self.include_start_tokens = unrelated_in_batch, include_start_tokens
        self.background_source, self.n_background, self.background_tokens = background_source, n_background, background_tokens
        self.general_text = general_text
        self.calibrate_threshold, self.threshold_source = calibrate_threshold, "config"
        self.seed = seed
        generator = torch.Generator().manual_seed(seed)
        self.permutation = torch.randperm(self.dim, generator=generator).to(self.target_module.weight.device)
        self.memory = _ResidualMemory(self.target_module)
        self.background_mean: torch.Tensor | None = None
        self.background_used: str | None = None
        self.unrelated_texts: list[str] = []  # the background texts; edit i's batch carries text i (cycled)
        self._prefixes: list[str] | None = None
        self.replay: bool | None = None  # train by replaying the upper layers (None: not yet checked on this model)
        self.masks = torch.zeros((0, self.dim), dtype=torch.bool, device=self.target_module.weight.device)
        self.edit_ids: list[str] = []
        self.edit_meta: list[dict[str, Any]] = []  # the structured edit behind each stored mask (for `report`)
        self.edit_losses: list[tuple[float, float, int]] = []  # (first loss, last loss, iterations) per edit
        self.routed = {"queries": 0, "memory_on": 0}
        self._overlap_seen: dict[str, float] = {}  # prompt -> best overlap, as routed since the last edit

    # ------------------------------------------------------------------ features and masks
    def _feature_ids(self, ids: Sequence[int]) -> tuple[list[int], list[int]]:
        """(tokens run but not averaged, tokens averaged): the start tokens (BOS) go in the first part
        unless `include_start_tokens` (the reference averages them too)."""
        ids = list(ids)
        start = self.lm.start_ids
        n_start = len(start) if not self.include_start_tokens and ids[: len(start)] == start else 0
        if len(ids) == n_start:
            raise KBenchError(f"method=memoir cannot build a mask for an empty prompt: {self.lm.decode(ids)!r}")
        return ids[:n_start], ids[n_start:]

    def text_ids(self, text: str) -> list[int]:
        """A plain text (background, unrelated row) as the model reads it: start tokens + text."""
        return list(self.lm.start_ids) + self.lm.encode(text)

    @torch.no_grad()
    def features_of(self, sequences: Sequence[Sequence[int]]) -> torch.Tensor:
        """Mean down-projection input over each token sequence, `[N, D]` (memory off, layers above skipped)."""
        rows = []
        for chunk in self.lm.batches(list(sequences), desc="memoir features"):
            batch = self.lm.collate([self._feature_ids(ids) for ids in chunk])
            (captured,) = self.lm.module_inputs([self.target_module], batch.input_ids, batch.attention_mask)
            # on the captured state's device (the layer's GPU when the model is split), not the inputs'
            weights = batch.target_mask.to(device=captured.device, dtype=captured.dtype)[..., None]
            rows.append((captured * weights).sum(1) / weights.sum(1))
        return torch.cat(rows).float()

    def prompt_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """`features_of` the prompts as queries render them (`prompt_ids`)."""
        return self.features_of([self.prompt_ids(Query(id="", prompt=p)) for p in prompts])

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
        self._overlap_seen.update((q.prompt, o) for q, (_, o) in zip(queries, decisions))  # for `report`
        self.routed["queries"] += len(decisions)
        self.routed["memory_on"] += sum(d is not None for d, _ in decisions)
        return decisions

    # ------------------------------------------------------------------ background
    @staticmethod
    def locality_texts(training_knowledge: Sequence[Knowledge]) -> list[str]:
        """The held-out edits' locality prompts with their answers, "prompt answer" (the reference's
        `loc + ' ' + loc_ans`), in order."""
        return [
            f"{prompt} {answer.strip()}"
            for item in training_knowledge
            if item.edit is not None
            for prompt, answer in zip(item.edit.locality_prompts, item.edit.locality_answers)
            if prompt.strip() and answer.strip()
        ]

    def _general_texts(self) -> list[str]:
        if not self.general_text:
            return []
        found = general_text.available([self.general_text])
        if not found:
            return []
        sentences = [s for document in general_text.read_texts(found[0]) for s in document]
        rng = random.Random(self.seed)  # a seeded draw over the whole file, not the first article's sentences
        return rng.sample(sentences, min(self.n_background, len(sentences)))

    def prepare(self, training_knowledge: Sequence[Knowledge]) -> None:
        """Fit the background mean μ from unrelated texts (see the module docstring)."""
        source = self.background_source
        locality = self.locality_texts(training_knowledge)[: self.n_background]
        general = self._general_texts() if source in ("auto", "general_text") and not (source == "auto" and locality) else []
        if source == "auto":
            source = "locality" if locality else "general_text" if general else "model"
        if source == "locality":
            if not locality:
                raise KBenchError("method.background_source=locality needs a task whose held-out split "
                                  "(Task.training_knowledge) carries locality prompts (task=editing with a training "
                                  "split); use background_source=general_text or model")
            texts = locality
        elif source == "general_text":
            if not general:
                raise KBenchError(f"method.background_source=general_text: no text read from "
                                  f"method.general_text={self.general_text!r}")
            texts = general
        elif source == "edit_prompts":  # the previous behaviour: the held-out *edit* prompts
            texts = [p for item in training_knowledge for p, _ in self.edit_pairs(item)][: self.n_background]
            if not texts:
                raise KBenchError("method.background_source=edit_prompts needs a task with a training split "
                                  "(Task.training_knowledge)")
        else:
            samples = self.lm.sample_texts(self.n_background, self.background_tokens, 1.0, self.seed,
                                           batch_size=self.n_background)  # one seeded batch, as recorded runs drew them
            texts = [s for s in samples if s.strip()]
        if source == "edit_prompts":
            sequences = [self.prompt_ids(Query(id="", prompt=p)) for p in texts]
        else:
            sequences = [self.text_ids(t) for t in texts]
        self.background_source = source  # the source used (reference_deviations reads it)
        self.background_mean = self.features_of(sequences).mean(0)
        self.unrelated_texts = list(texts)
        self.background_used = f"{source} ({len(texts)} texts)"
        log.info("memoir: background from %s", self.background_used)
        if self.calibrate_threshold is not None:
            self._calibrate(training_knowledge)

    def _calibrate(self, training_knowledge: Sequence[Knowledge]) -> None:
        """Set `threshold` on the held-out split: the training edits' masks stand for stored edits, and the
        threshold is the lowest that routes `calibrate_threshold` of their locality prompts to no edit."""
        edits = [item.edit for item in training_knowledge if item.edit is not None and item.edit.locality_prompts]
        if not edits:
            raise KBenchError("method.calibrate_threshold needs held-out edits with locality prompts (task=editing "
                              "with a training split); set it to null to use method.threshold")
        stored = self.masks_of([edit.prompt for edit in edits])
        _, best = best_match(self.masks_of([p for edit in edits for p in edit.locality_prompts]), stored, self.k)
        candidates = sorted(set(best.tolist())) + [1.0 + 1.0 / self.k]
        self.threshold = next(t for t in candidates if (best < t).float().mean() >= self.calibrate_threshold)
        self.threshold_source = (f"calibrated: routes {self.calibrate_threshold:.0%} of {len(best)} held-out locality "
                                 f"prompts off against {len(edits)} held-out edits")
        log.info("memoir: threshold %.4f (%s)", self.threshold, self.threshold_source)

    # ------------------------------------------------------------------ augmentation prefixes
    def _decoding(self) -> dict[str, Any]:
        """How the model decodes by default (its generation_config): the reference calls `generate` without
        decoding arguments, so Llama-3-8B-Instruct samples (T 0.6, top-p 0.9) and a greedy model is greedy."""
        config = self.lm.causal_lm.generation_config
        if not getattr(config, "do_sample", False):
            return {"do_sample": False}
        return {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k}

    def augment_prefixes(self) -> list[str]:
        """The short texts the edit prompt is trained behind (the reference's context templates): for each
        [max_new_tokens, n_gen] in `augment_lengths`, n_gen // len(starts) continuations of each start word,
        start word included; generated once per (model, settings) and cached under $KBENCH_CACHE/memoir/."""
        if self._prefixes is not None:
            return self._prefixes
        if not self.augment_lengths:
            self._prefixes = []
            return self._prefixes
        decoding = self._decoding()
        identity = {"model": self.lm.name, "starts": self.augment_starts, "lengths": self.augment_lengths,
                    "start_ids": list(self.lm.start_ids), "decoding": decoding,
                    "seed": self.seed if decoding["do_sample"] else None}
        self._prefixes = disk_cached("memoir", f"prefixes-{stable_hash(identity)}", lambda: self._generate_prefixes(decoding),
                                     what="a cached JSON list of MEMOIR augmentation prefixes", valid=text_list)
        log.info("memoir: %d augmentation prefixes, e.g. %r", len(self._prefixes), self._prefixes[:2])
        return self._prefixes

    def _generate_prefixes(self, decoding: dict[str, Any]) -> list[str]:
        prefixes: list[str] = []
        with torch.inference_mode():
            for length, n_gen in self.augment_lengths:
                n = n_gen // len(self.augment_starts)
                for i, word in enumerate(self.augment_starts):
                    ids = list(self.lm.start_ids) + self.lm.encode(word)
                    torch.manual_seed(self.seed + 1000 * length + i)
                    config = GenerationConfig(max_new_tokens=length, num_beams=n, num_return_sequences=n,
                                              pad_token_id=self.lm.pad_id, eos_token_id=self.lm.tokenizer.eos_token_id,
                                              **decoding)
                    out = self.lm.model.generate(input_ids=torch.tensor([ids], device=self.lm.device), generation_config=config)
                    start = len(self.lm.start_ids)
                    prefixes += [self.lm.decode(row[start:].tolist()).strip() for row in out]
        return prefixes

    def training_rows(self, prompt: str, target: str, position: int) -> tuple[list[tuple[list[int], list[int]]], int]:
        """The reference's batch for one edit (`tokenize` in its utils.py): the edit prompt, the prompt behind
        each augmentation prefix ("prefix prompt"), all with the target; then one unrelated text, which
        runs through the model but carries no loss. Returns (rows, number of rows with a loss)."""
        target_ids = self.lm.encode(target + self.target_suffix)
        rows = [(self.prompt_ids(Query(id="", prompt=prompt)), target_ids)]
        rows += [(self.prompt_ids(Query(id="", prompt=f"{prefix} {prompt}")), target_ids) for prefix in self.augment_prefixes()]
        n_loss = len(rows)
        if self.unrelated_in_batch and self.unrelated_texts:
            ids = self.text_ids(self.unrelated_texts[position % len(self.unrelated_texts)])
            rows.append((ids[:-1], ids[-1:]))
        return rows, n_loss

    # ------------------------------------------------------------------ editing
    def edit_pairs(self, item: Knowledge) -> list[tuple[str, str]]:
        """(prompt, target) pairs of one piece of knowledge (`methods.base.edit_pairs`)."""
        return edit_pairs(item, self.answer_marker, self.name)

    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        if self.background_mean is None:
            self.prepare([])
        for item in knowledge:
            for prompt, target in self.edit_pairs(item):
                self._edit(item.id, prompt, target, item.edit)

    def _stop(self, losses: Sequence[float]) -> bool:
        """The reference's EarlyStopMeter, checked after the current loss is computed and before its step:
        stop once the *previous* loss is <= stop_loss and within stop_flat of the one before it. With
        stop_flat=null: stop once the current loss is <= stop_loss (the previous behaviour)."""
        if self.stop_flat is None:
            return losses[-1] <= self.stop_loss
        return len(losses) >= 3 and losses[-2] <= self.stop_loss and abs(losses[-2] - losses[-3]) <= self.stop_flat

    # ------------------------------------------------------------------ replay from the memory's layer
    @torch.no_grad()
    def _capture_upper_calls(self, batch: TokenBatch) -> list[tuple[tuple, dict]] | None:
        """One forward of `batch` recording the inputs (hidden state, masks, position embeddings) of every
        layer from the memory's layer up. Nothing below that layer depends on W_mem, so an edit's
        iterations replay only these layers (`_replay_logits`): the same logits for a fraction of the
        compute (Gemma 3 270M: 3 of 18 layers). None when the decoder has no `norm` to finish with."""
        decoder = self.lm.causal_lm.get_decoder()
        if not isinstance(getattr(decoder, "norm", None), torch.nn.Module):
            return None
        calls: list[tuple[tuple, dict]] = []
        handles = [layer.register_forward_pre_hook(lambda _m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
                   for layer in self.lm.decoder_layers()[self.layer_index:]]
        try:
            decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
        return calls

    def _replay_logits(self, batch: TokenBatch, calls: list[tuple[tuple, dict]]) -> torch.Tensor:
        """`LM.target_logits(batch)` computed from the recorded inputs of the layers from the memory's up."""
        decoder = self.lm.causal_lm.get_decoder()
        hidden = calls[0][0][0] if calls[0][0] else calls[0][1]["hidden_states"]
        for layer, (args, kwargs) in zip(self.lm.decoder_layers()[self.layer_index:], calls):
            kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            out = layer(hidden, *args[1:], **kwargs)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.lm._head(decoder.norm(hidden), batch.predicted_mask, batch.positions)

    def _logits_fn(self, batch: TokenBatch):
        """The edit's logits function: the replay when it reproduces the full forward on this model (checked
        on the first edit, memory included), else `LM.target_logits`."""
        if self.replay is False:
            return self.lm.target_logits
        calls = self._capture_upper_calls(batch)
        if calls is None or len(calls) != len(self.lm.decoder_layers()) - self.layer_index:
            self.replay = False
            return self.lm.target_logits
        if self.replay is None:
            with torch.no_grad():
                full, replayed = self.lm.target_logits(batch), self._replay_logits(batch, calls)
            gap = float((full - replayed).abs().max()) / max(1.0, float(full.abs().max()))
            low_precision = self.lm.causal_lm.dtype in (torch.float16, torch.bfloat16)
            self.replay = gap <= (2e-2 if low_precision else 1e-4)  # the tolerances of LM.check_internals
            if not self.replay:
                log.warning("memoir: replaying the layers from %d up differs from the full forward by %.1e; "
                            "training through the full forward", self.layer_index, gap)
        return (lambda b: self._replay_logits(b, calls)) if self.replay else self.lm.target_logits

    def _edit(self, edit_id: str, prompt: str, target: str, spec: EditSpec | None = None) -> None:
        mask = self.masks_of([prompt])[0]
        columns = mask.nonzero().squeeze(1)
        rows, n_loss = self.training_rows(prompt, target, len(self.edit_ids))
        batch = self.lm.collate(rows)
        lengths = batch.target_lengths[:n_loss]
        n_targets = sum(lengths)
        trainable = self.memory.weight.index_select(1, columns).clone().requires_grad_(True)
        optimizer = torch.optim.SGD([trainable], lr=self.lr, weight_decay=self.weight_decay)
        losses: list[float] = []
        steps = 0
        with self.memory.training(columns, trainable):
            logits_of = self._logits_fn(batch)
            for _ in progress(range(self.iterations), desc=f"memoir edit {len(self.edit_ids) + 1}"):
                logits = logits_of(batch)[:n_targets]  # rows are row-major: the loss rows come first
                token_loss = F.cross_entropy(logits, batch.target_ids[:n_targets].to(logits.device), reduction="none")
                # each row's mean over its target tokens, then the mean over rows (the reference's _cal_ft_loss)
                loss = torch.stack([row.mean() for row in token_loss.split(lengths)]).mean()
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise NonFiniteLossError(f"memoir: loss became {losses[-1]} on edit {edit_id!r}; lower method.lr")
                if self._stop(losses):
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if self.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_([trainable], self.max_grad_norm)
                optimizer.step()
                steps += 1
        with torch.no_grad():
            if self.weight_decay_scope == "memory" and self.weight_decay and steps:
                # the reference's SGD holds all of W_mem: every step decays the other columns too (their gradient is 0)
                self.memory.weight.mul_((1.0 - self.lr * self.weight_decay) ** steps)
            self.memory.weight[:, columns] = trainable.detach()
        self.masks = torch.cat([self.masks, mask[None]])
        self._overlap_seen = {}  # overlaps routed before this edit are stale
        self.edit_ids.append(edit_id)
        self.edit_meta.append({"prompt": prompt, "rephrase_prompts": spec.rephrase_prompts if spec else (),
                               "locality_prompts": spec.locality_prompts if spec else ()})
        self.edit_losses.append((losses[0], losses[-1], len(losses)))

    # ------------------------------------------------------------------ inference
    def _row_state(self, decisions: Sequence[tuple[int | None, float]]):
        """`LM.generate_until` / `LM.loglikelihood`'s per-batch hook: the rows' stored masks (None: memory off)."""
        masks = [None if edit is None else self.masks[edit] for edit, _ in decisions]
        return lambda rows: self.memory.rows([masks[i] for i in rows])

    def answer(self, queries: Sequence[Query], generation: GenerationSpec) -> list[Answer]:
        decisions = self.route(queries)
        texts = self.lm.generate_until([self.prompt_ids(q) for q in queries], generation, row_state=self._row_state(decisions))
        return [
            Answer(text, meta={RETRIEVED_KNOWLEDGE_IDS: [] if edit is None else [self.edit_ids[edit]], "overlap": round(overlap, 4)})
            for text, (edit, overlap) in zip(texts, decisions)
        ]

    def loglikelihood(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        decisions = self.route(queries)
        pairs = [(self.prompt_ids(q), self.lm.encode(t)) for q, t in zip(queries, targets)]
        return self.lm.loglikelihood(pairs, row_state=self._row_state(decisions))

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        with torch.no_grad():
            self.memory.weight.zero_()
        self.masks = self.masks[:0]
        self.edit_ids, self.edit_meta, self.edit_losses = [], [], []
        self._overlap_seen = {}

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
            "augment_prefixes": list(self._prefixes or []),
            "training_batch_rows": 1 + len(self._prefixes or []) + int(self.unrelated_in_batch and bool(self.unrelated_texts)),
            "replay_upper_layers": self.replay,
            "routed_queries": dict(self.routed),
            "mean_first_loss": sum(l[0] for l in losses) / len(losses) if losses else None,
            "mean_final_loss": sum(l[1] for l in losses) / len(losses) if losses else None,
            "mean_iterations": sum(l[2] for l in losses) / len(losses) if losses else None,
            "columns_used": int(self.masks.any(0).sum()) if len(self.masks) else 0,
        }

    # ------------------------------------------------------------------ diagnostics
    def overlaps(self) -> dict[str, list[float]]:
        """Best overlap with any stored mask of the stored edits' prompts, their rephrasings and their
        locality prompts (from each edit's structured meta), against the current memory."""
        if not len(self.masks):
            return {}
        kinds = {
            "edit": [m["prompt"] for m in self.edit_meta],
            "rephrase": [p for m in self.edit_meta for p in m.get("rephrase_prompts") or ()],
            "locality": [p for m in self.edit_meta for p in m.get("locality_prompts") or ()],
        }
        missing = sorted({p for prompts in kinds.values() for p in prompts} - set(self._overlap_seen))
        if missing:  # the probes routed after the last edit are known already; compute the others
            _, best = best_match(self.masks_of(missing), self.masks, self.k)
            self._overlap_seen.update(zip(missing, best.tolist()))
        return {kind: [round(self._overlap_seen[p], 4) for p in prompts] for kind, prompts in kinds.items() if prompts}

    def report(self, output_dir: Path) -> dict[str, Any]:
        """`memoir_overlap.png` (histogram of `overlaps()` per kind against the threshold) and
        `memoir_overlap.json` (the values); the record gets each kind's count, mean and routed-on rate."""
        values = self.overlaps()
        if not values:
            return {}
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(output_dir / OVERLAP_JSON, {"threshold": self.threshold, "k": self.k, "overlaps": values})
        plot_overlaps(values, self.threshold, output_dir / OVERLAP_PLOT,
                      title=f"MEMOIR mask overlap after {len(self.edit_ids)} edits (k = {self.k} of {self.dim})")
        summary = {
            kind: {"n": len(v), "mean": round(sum(v) / len(v), 4),
                   "routed_on": round(sum(x >= self.threshold for x in v) / len(v), 4)}
            for kind, v in values.items()
        }
        return {"overlap": summary, "threshold": self.threshold, "files": [OVERLAP_PLOT, OVERLAP_JSON]}


def plot_overlaps(values: dict[str, list[float]], threshold: float, path: Path, title: str = "") -> None:
    """One histogram per kind of prompt (edit, rephrase, locality) of the best mask overlap, with the threshold."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7.5, 4.2), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    bins = [i / 40 for i in range(41)]
    for kind, v in values.items():
        on = sum(x >= threshold for x in v) / len(v)
        ax.hist(v, bins=bins, alpha=0.5, label=f"{kind} (n={len(v)}, {on:.0%} ≥ threshold)")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    ax.set(xlabel="best overlap |m_q ∩ m_e| / k with any stored mask", ylabel="prompts", xlim=(0, 1.02), title=title)
    ax.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
