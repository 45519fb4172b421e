"""Shared machinery of the mass editors `method=memit` and `method=alphaedit` (methods/memit.py,
methods/alphaedit.py): locate-then-edit of the MLP down-projections of a few early-middle layers.

Both follow MEMIT (Meng et al., ICLR 2023, `memit/memit_main.py`) and differ only in how one layer's
update is solved (`MassEditor.layer_update`). For a batch of n edits (prompt, target, subject):

1. **Value (z)**: for each edit, a vector δ is added to the residual stream leaving decoder layer
   L = the last edited layer, at the subject's last token, and optimised (Adam, `v_lr`,
   `v_num_grad_steps`) so the model predicts the target after the prompt, itself and behind
   `n_context_templates` short prefixes the model generated:
       loss(δ) = mean_prompts NLL(target) + kl_factor · KL(p₀ ‖ p_δ on "{subject} is a")
                 + v_weight_decay · ‖δ‖ / ‖h₀‖²,      ‖δ‖ ≤ clamp_norm_factor · ‖h₀‖ (projected)
   z = h₀ + δ, h₀ = the unedited residual at L (the reference's form, weight-decay term included).
2. **Keys**: k = the down-projection's input at the subject's last token, averaged over the plain
   prompt and over the prefixed prompts (mean of the two group means: the reference's `compute_ks`).
3. **Spread over layers** l₁ < … < L, in order: the residual still missing at layer L,
   R = z − h_L(current weights), is divided by the number of layers left (R / (L_count − i)) and
   written into layer l's down-projection W (D_out × D_in) by a least-squares update ΔW with
   ΔW K ≈ R, protecting the preserved keys (the second moment C = E[k kᵀ] of the layer's input over
   general text):
   - MEMIT:     ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹,           λ = mom2_update_weight
                (the normal equations of min ‖ΔW K − R‖² + λ tr(ΔW C ΔWᵀ));
   - AlphaEdit: ΔWᵀ = (P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ, α = L2,
                P = the projector onto the eigenvectors of C with eigenvalue < nullspace_threshold,
                K_p = the keys of the edits made before (kept as K_p K_pᵀ per layer).
                ΔWᵀ = P X lies in the null space of the preserved keys: ΔW k₀ ≈ 0 for every k₀ in C's
                span, so their outputs do not change.
4. After the batch, AlphaEdit adds the batch's (recomputed) keys to K_p K_pᵀ.

Architecture (the only departure forced by the model): in Gemma 2/3 the MLP's output passes through a
`post_feedforward_layernorm` (RMSNorm) before it joins the residual stream, so a residual R is not a
down-projection output. The residual is mapped through that norm's linearisation at the current output
y: Δy = R · rms(y) / g (g = the norm's per-channel gain); channels whose gain is under a tenth of the
median gain (Gemma 3 has gains of 0 and 0.0015 beside a median of ~5: dividing by them blew one layer's
update up 500-fold) and the component along y, which an RMSNorm cannot express, are left out (each layer
re-measures R, so the next layers see what is still missing). Llama-style models have no such
norm and get the reference's mapping exactly (Δy = R).

Preserved-key statistics: C per (model, layer) from general text (WikiText-2 from `../shared` by
default, or any text file: `stats_paths`), `stats_tokens` tokens in chunks of `stats_chunk_tokens`,
start tokens included as the reference's tokenizer adds them; computed once and cached under
`$KBENCH_CACHE/mass_editing/` as safetensors, keyed by the weights below and at the layer, the text
files' bytes and the knobs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from core import general_text
from core.cache import cache_entry, read_tensors, write_entry
from core.io import atomic_write_json, note_input, stable_hash
from core.lm import LM
from core.progress import progress
from core.types import Answer, GenerationSpec, KBenchError, Knowledge, NonFiniteLossError, Query, TargetScore
from methods.base import Method, edit_pairs

log = logging.getLogger(__name__)

#: WikiText-2 in the shared data folder, relative to the repository root (run.py's working directory)
DEFAULT_STATS_PATHS = list(general_text.WIKITEXT2)
#: the reference's prefix-generation words (`get_context_templates`)
TEMPLATE_WORDS = ("The", "Therefore", "Because", "I", "You")


@dataclass(frozen=True)
class EditRequest:
    """One edit as the editor uses it: prompt (rendered as probes ask it), target continuation, subject."""

    id: str
    prompt: str
    target: str
    subject: str | None = None


# ---------------------------------------------------------------------- pure linear algebra
def layer_indices(n_layers: int, layers: Sequence[int] | None, span: Sequence[float]) -> list[int]:
    """The edited decoder layers: `layers` as given (negative = from the top), else every index from
    round(span[0]·n) to round(span[1]·n) (halves up). MEMIT's 4–8 of Llama's 32 is span (0.125, 0.25):
    layers 2–5 of Gemma 3 270M's 18, layer 1 of the tiny model's 4."""
    if layers:
        picked = sorted({layer % n_layers for layer in layers})
        if any(not -n_layers <= layer < n_layers for layer in layers):
            raise KBenchError(f"method.layers={list(layers)}: the model has {n_layers} layers")
        return picked
    first, last = (min(n_layers - 1, math.floor(f * n_layers + 0.5)) for f in span)
    if last < first:
        raise KBenchError(f"method.layer_span={list(span)}: the first fraction must not exceed the last")
    return list(range(first, last + 1))


def memit_update(keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, mom2_update_weight: float) -> torch.Tensor:
    """MEMIT's ΔW = R Kᵀ (λ C + K Kᵀ)⁻¹, `[D_out, D_in]`, in float64.
    `keys` K `[D_in, n]`, `resid` R `[D_out, n]`, `cov` C `[D_in, D_in]`."""
    keys, resid = keys.double(), resid.double()
    adj = torch.linalg.solve(mom2_update_weight * cov.double() + keys @ keys.T, keys)  # [D_in, n]
    return resid @ adj.T


def nullspace_projector(cov: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """AlphaEdit's P = U_s U_sᵀ over the eigenvectors of C with eigenvalue < threshold (the reference takes
    the singular vectors of C; C is symmetric PSD, so they are its eigenvectors), and how many there are."""
    values, vectors = torch.linalg.eigh(cov.double())
    small = vectors[:, values < threshold]
    return small @ small.T, int(small.shape[1])


def alphaedit_update(keys: torch.Tensor, resid: torch.Tensor, projector: torch.Tensor, previous: torch.Tensor,
                     l2: float) -> torch.Tensor:
    """AlphaEdit's ΔW = [(P (K Kᵀ + K_p K_pᵀ) + α I)⁻¹ P K Rᵀ]ᵀ, `[D_out, D_in]`, in float64.
    `previous` = K_p K_pᵀ `[D_in, D_in]` of the edits made before."""
    keys, resid, projector = keys.double(), resid.double(), projector.double()
    eye = torch.eye(keys.shape[0], dtype=torch.float64, device=keys.device)
    lhs = projector @ (keys @ keys.T + previous.double()) + l2 * eye
    return torch.linalg.solve(lhs, projector @ keys @ resid.T).T


# ---------------------------------------------------------------------- the editor
class MassEditor(Method):
    """MEMIT-style locate-then-edit on the down-projections of `layers` (module docstring).

    Subclasses define `layer_update` (and, for state kept across batches, `after_batch`,
    `extra_state`). Edits come from `Knowledge.edit` (`prompt`, `target`, `subject`: task=editing) or,
    for QA tasks, from each training sentence split at its last `answer_marker` (no subject: the lookup
    token is then the prompt's last, the reference's `fact_token=last`)."""

    module = "mlp.down_proj"

    def __init__(
        self,
        lm: LM,
        *,
        layers: list[int] | None,
        layer_span: list[float],
        batch_size: int,
        v_num_grad_steps: int,
        v_lr: float,
        v_weight_decay: float,
        clamp_norm_factor: float,
        kl_factor: float,
        n_context_templates: int,
        context_template_tokens: int,
        target_suffix: str,
        answer_marker: str,
        stats_paths: list[str],
        stats_tokens: int,
        stats_chunk_tokens: int,
        stats_batch_size: int,
        seed: int,
    ) -> None:
        super().__init__(lm)
        decoder_layers = lm.decoder_layers()
        self.layer_ids = layer_indices(len(decoder_layers), layers, layer_span)
        self.layers, self.layer_span = layers, list(layer_span)
        self.decoder = decoder_layers
        self.modules = {l: lm.linear_at(l, self.module)[1] for l in self.layer_ids}
        self.z_layer = self.layer_ids[-1]
        self.batch_size = batch_size
        self.v_num_grad_steps, self.v_lr, self.v_weight_decay = v_num_grad_steps, v_lr, v_weight_decay
        self.clamp_norm_factor, self.kl_factor = clamp_norm_factor, kl_factor
        self.n_context_templates, self.context_template_tokens = n_context_templates, context_template_tokens
        self.target_suffix, self.answer_marker = target_suffix, answer_marker
        self.stats_paths, self.stats_tokens = list(stats_paths), stats_tokens
        self.stats_chunk_tokens, self.stats_batch_size = stats_chunk_tokens, stats_batch_size
        self.seed = seed
        # the untouched weights, for reset (a CPU copy: 5 MB per Gemma layer)
        self.original = {l: m.weight.detach().to("cpu", copy=True) for l, m in self.modules.items()}
        self.cov: dict[int, torch.Tensor] = {}
        self.stats_info: dict[str, Any] = {}
        self.templates: list[str] | None = None
        self.pending: list[EditRequest] = []
        self.applied: list[str] = []
        self.z_losses: list[tuple[float, float, int, float]] = []  # (first, last loss, steps, ‖δ‖/‖h₀‖) per edit
        self.subject_misses = 0  # edits whose subject was not found in the prompt (lookup: last prompt token)
        self.flushed_at_scoring = 0
        self.edit_seconds = 0.0

    # ------------------------------------------------------------------ reference bookkeeping
    def reference_deviations(self) -> dict[str, str]:
        deviations = super().reference_deviations()
        # the reference's statistics come from 100,000 Wikipedia samples: a different unit, always a deviation
        deviations["stats_tokens"] = (f"{self.stats_tokens} tokens of {', '.join(Path(p).name for p in self.stats_paths)} "
                                      "(reference: 100,000 Wikipedia samples)")
        return deviations

    # ------------------------------------------------------------------ preserved-key statistics
    def _fingerprint(self, layer: int) -> str:
        """Identity of the weights that determine layer `layer`'s down-projection input (embeddings and
        layers 0..layer), from strided samples of every tensor: cheap, and any change to them shows."""
        rows = [self.lm.name]
        params = list(self.lm.causal_lm.get_input_embeddings().named_parameters())
        for l in range(layer + 1):
            params += [(f"{l}.{n}", p) for n, p in self.decoder[l].named_parameters()]
        for name, p in params:
            flat = p.detach().reshape(-1)[::97].double()
            rows.append([name, list(p.shape), str(p.dtype), float(flat.sum()), float(flat.abs().sum())])
        return stable_hash(rows, 24)

    def _texts(self) -> tuple[list[list[str]], list[str]]:
        missing = [p for p in self.stats_paths if not Path(p).is_file()]
        if missing or not self.stats_paths:
            raise KBenchError(
                f"method={self.name} computes its preserved-key statistics from general text, and "
                f"{missing or 'no file'} was not found (the default is WikiText-2 in ../shared/data/wikitext2/). "
                "Point method.stats_paths at any English text file (one text per line, or WikiText), "
                "e.g. method.stats_paths=[/data/wiki.txt]"
            )
        digests = [hashlib.sha256(Path(p).read_bytes()).hexdigest()[:16] for p in self.stats_paths]
        documents = [doc for p in self.stats_paths for doc in general_text.read_texts(p)]
        return documents, digests

    def ensure_stats(self) -> None:
        """C = E[k kᵀ] of each edited layer's down-projection input over `stats_tokens` tokens of general
        text, from the cache or computed in one pass (the layers above the last edited one are skipped)."""
        if self.cov:
            return
        documents, digests = None, None
        todo: dict[int, Path] = {}
        for l in self.layer_ids:
            if documents is None:
                documents, digests = self._texts()
            key = stable_hash({"model": self._fingerprint(l), "layer": l, "module": self.module, "texts": digests,
                               "tokens": self.stats_tokens, "chunk": self.stats_chunk_tokens, "version": 1}, 24)
            # one pass computes every missing layer, so the entries are read and written one by one (core.cache)
            path = cache_entry("mass_editing", f"mom2-{key}", "safetensors")
            if path.is_file():
                self.cov[l] = read_tensors(path)[0]["mom2"].to(self.modules[l].weight.device)
                note_input(path)
                self.stats_info[str(l)] = json.loads((path.with_suffix(".json")).read_text()) | {"source": "cache"}
            else:
                todo[l] = path
        if todo:
            self._compute_stats(documents or [], todo, digests or [])

    @torch.no_grad()
    def _compute_stats(self, documents: list[list[str]], paths: dict[int, Path], digests: list[str]) -> None:
        start = time.perf_counter()
        room = self.stats_chunk_tokens - len(self.lm.start_ids)
        chunks = general_text.chunks(documents, self.lm.encode, room)
        sums = {l: torch.zeros(self.modules[l].in_features, self.modules[l].in_features, dtype=torch.float64) for l in paths}
        tokens, used = 0, 0
        bar = progress(range(0, len(chunks), self.stats_batch_size), desc=f"{self.name} key statistics")
        for begin in bar:
            batch = [list(self.lm.start_ids) + c for c in chunks[begin : begin + self.stats_batch_size]]
            ids, mask = self._pad(batch)
            captured = dict(zip(paths, self.lm.module_inputs([self.modules[l] for l in paths], ids, mask)))
            keep = mask.bool()
            for l in paths:
                x = captured[l][keep.to(captured[l].device)].float()
                sums[l] += (x.T @ x).double().cpu()
            tokens += int(keep.sum())
            used += len(batch)
            if tokens >= self.stats_tokens:
                break
        if tokens < self.stats_tokens:
            log.warning("%s: the general text gave %d tokens, fewer than method.stats_tokens=%d", self.name, tokens,
                        self.stats_tokens)
        seconds = time.perf_counter() - start
        for l, path in paths.items():
            mom2 = (sums[l] / max(tokens, 1)).float()
            meta = {"tokens": tokens, "chunks": used, "texts": [str(p) for p in self.stats_paths], "text_sha256": digests,
                    "seconds": round(seconds, 1), "model": self.lm.name, "layer": l, "module": self.module}
            atomic_write_json(path.with_suffix(".json"), meta)  # before the tensors: an entry is complete once they exist
            write_entry(path, ({"mom2": mom2}, None), "safetensors")
            self.cov[l] = mom2.to(self.modules[l].weight.device)
            self.stats_info[str(l)] = meta | {"source": "computed"}
        log.info("%s: key statistics of layers %s from %d tokens in %.0f s", self.name, list(paths), tokens, seconds)

    def prepare(self, training_knowledge: Sequence[Knowledge]) -> None:
        """Statistics of the preserved keys (before any edit: they describe the untouched model) and the
        context templates."""
        self.ensure_stats()
        self.ensure_templates()

    # ------------------------------------------------------------------ context templates
    @torch.no_grad()
    def ensure_templates(self) -> None:
        """"{}" plus `n_context_templates` prefixes "<sampled text>. {}" of `context_template_tokens` tokens,
        sampled (top-k 5, like the reference's `generate_fast`) after the words of TEMPLATE_WORDS, seeded."""
        if self.templates is not None:
            return
        templates = ["{}"]
        torch.manual_seed(self.seed)
        words = [TEMPLATE_WORDS[i % len(TEMPLATE_WORDS)] for i in range(self.n_context_templates)]
        for word in words:
            ids = torch.tensor([self.lm.prompt_ids(word)], device=self.lm.device)
            out = self.lm.causal_lm.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=5,
                max_new_tokens=self.context_template_tokens, min_new_tokens=self.context_template_tokens,
                pad_token_id=self.lm.pad_id,
            )
            text = word + self.lm.decode(out[0, ids.shape[1]:].tolist())
            templates.append(text.replace("{", " ").replace("}", " ").replace("\n", " ") + ". {}")
        self.templates = templates

    # ------------------------------------------------------------------ edits
    def edit_requests(self, item: Knowledge) -> list[EditRequest]:
        """The structured edit of task=editing, else QA sentences split at the answer marker."""
        if item.edit is not None:
            return [EditRequest(item.id, item.edit.prompt, item.edit.target, item.edit.subject)]
        return [EditRequest(item.id, prompt, target) for prompt, target in edit_pairs(item, self.answer_marker, self.name)]

    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        for item in knowledge:
            self.pending += self.edit_requests(item)
            while len(self.pending) >= self.batch_size:
                batch, self.pending = self.pending[: self.batch_size], self.pending[self.batch_size :]
                self.apply(batch)

    def flush(self, at_scoring: bool = True) -> None:
        """Apply the edits waiting for a full batch (before any answer: a partial last batch)."""
        if self.pending:
            batch, self.pending = self.pending, []
            self.flushed_at_scoring += len(batch) if at_scoring else 0
            self.apply(batch)

    # ------------------------------------------------------------------ forward helpers
    def _pad(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.lm.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, seq in enumerate(seqs):
            ids[row, : len(seq)] = torch.tensor(list(seq))
            mask[row, : len(seq)] = 1
        return ids.to(self.lm.device), mask.to(self.lm.device)

    def lookup(self, text: str, subject: str | None) -> tuple[list[int], int]:
        """Tokens of `text` as a prompt, and the index of the subject's last token (the reference's
        `fact_token=subject_last`, first occurrence); the last token when the subject is absent."""
        ids = self.lm.prompt_ids(text)
        if subject and subject in text:
            end = text.index(subject) + len(subject)
            return ids, min(len(self.lm.prompt_ids(text[:end])) - 1, len(ids) - 1)
        return ids, len(ids) - 1

    @torch.no_grad()
    def capture_at(self, texts: Sequence[tuple[str, str | None]], layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(down-projection input of `layer`, residual output of `z_layer`) at each text's lookup token,
        `[N, D_in]`, `[N, H]` (the second only when layer == z_layer, else empty). Layers above are skipped."""
        looked = [self.lookup(text, subject) for text, subject in texts]
        ids, mask = self._pad([s for s, _ in looked])
        rows = torch.arange(len(looked))
        index = torch.tensor([i for _, i in looked])
        outputs_of = [self.decoder[self.z_layer]] if layer == self.z_layer else []
        key, *z = self.lm.module_inputs([self.modules[layer]], ids, mask, outputs_of=outputs_of)
        k = key[rows.to(key.device), index.to(key.device)]
        if not z:
            return k.float(), torch.empty(0)
        return k.float(), z[0][rows.to(z[0].device), index.to(z[0].device)].float()

    @torch.no_grad()
    def residual_at(self, requests: Sequence[EditRequest]) -> torch.Tensor:
        """Residual stream leaving `z_layer` at each plain prompt's lookup token, `[n, H]`."""
        looked = [self.lookup(r.prompt, r.subject) for r in requests]
        ids, mask = self._pad([s for s, _ in looked])
        (hidden,) = self.lm.module_inputs([], ids, mask, outputs_of=[self.decoder[self.z_layer]])
        return hidden[torch.arange(len(looked)), torch.tensor([i for _, i in looked])].float()

    def keys(self, requests: Sequence[EditRequest], layer: int) -> torch.Tensor:
        """K `[D_in, n]`: per edit, the mean of (plain prompt's key, mean of the prefixed prompts' keys)."""
        self.ensure_templates()
        texts = [(t.format(r.prompt), r.subject) for r in requests for t in self.templates]
        k, _ = self.capture_at(texts, layer)
        k = k.reshape(len(requests), len(self.templates), -1)
        groups = [k[:, :1].mean(1)] + ([k[:, 1:].mean(1)] if len(self.templates) > 1 else [])
        return torch.stack(groups).mean(0).T

    # ------------------------------------------------------------------ value optimisation (z)
    def compute_z(self, request: EditRequest) -> torch.Tensor:
        """The residual at `z_layer`'s lookup token that makes the model predict the target (module docstring, 1)."""
        self.ensure_templates()
        target_ids = self.lm.encode(request.target + self.target_suffix)
        looked = [self.lookup(t.format(request.prompt), request.subject) for t in self.templates]
        batch = self.lm.collate([(ids, target_ids) for ids, _ in looked])
        rows = torch.arange(len(looked))
        index = torch.tensor([i for _, i in looked])
        kl_ids, kl_index = self.lookup(f"{request.subject} is a", request.subject) if request.subject else (None, None)
        device = self.decoder[self.z_layer].mlp.down_proj.weight.device
        delta = torch.zeros(self.lm.hidden_size, device=device, requires_grad=True)
        state: dict[str, Any] = {"init": None, "kl_rows": None, "kl_index": None}

        def edit_hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            r, i = (rows, index) if state["kl_rows"] is None else (state["kl_rows"], state["kl_index"])
            if state["init"] is None:
                state["init"] = hidden[0, int(index[0])].detach().float().clone()  # the plain prompt's h₀
            hidden = hidden.clone()
            hidden[r.to(hidden.device), i.to(hidden.device)] = hidden[r.to(hidden.device), i.to(hidden.device)] + delta.to(hidden.dtype)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        optimizer = torch.optim.Adam([delta], lr=self.v_lr)
        handle = self.decoder[self.z_layer].register_forward_hook(edit_hook)
        decoder = self.lm.causal_lm.get_decoder()
        kl_init, losses = None, []
        try:
            for step in range(self.v_num_grad_steps):
                optimizer.zero_grad(set_to_none=True)
                state["kl_rows"] = None
                nll = F.cross_entropy(self.lm.target_logits(batch), batch.target_ids)
                loss = nll
                if kl_ids is not None and self.kl_factor:
                    state["kl_rows"], state["kl_index"] = torch.tensor([0]), torch.tensor([kl_index])
                    ids = torch.tensor([kl_ids], device=self.lm.device)
                    hidden = decoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
                    at = torch.zeros((1, ids.shape[1] - 1), dtype=torch.bool)
                    if kl_index < ids.shape[1] - 1:
                        at[0, kl_index] = True
                        log_probs = F.log_softmax(self.lm._head(hidden, at), dim=-1)
                        kl_init = log_probs.detach() if kl_init is None else kl_init
                        loss = loss + self.kl_factor * F.kl_div(kl_init, log_probs, log_target=True, reduction="batchmean")
                init = state["init"]
                loss = loss + self.v_weight_decay * (delta.norm() / init.norm() ** 2)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise NonFiniteLossError(f"{self.name}: value loss became {value} on edit {request.id!r}; lower method.v_lr")
                losses.append(value)
                if value < 5e-2 or step == self.v_num_grad_steps - 1:  # the reference's stopping rule
                    break
                loss.backward()
                optimizer.step()
                max_norm = self.clamp_norm_factor * init.norm()
                if delta.norm() > max_norm:
                    with torch.no_grad():
                        delta.mul_(max_norm / delta.norm())
        finally:
            handle.remove()
        self.z_losses.append((losses[0], losses[-1], len(losses), float(delta.detach().norm() / state["init"].norm())))
        return (state["init"] + delta.detach().float()).to(device)

    # ------------------------------------------------------------------ the update
    def value_scale(self, layer: int, keys: torch.Tensor) -> torch.Tensor:
        """`[D_out, n]` factors mapping a residual R to a down-projection output change (module docstring):
        rms(y) / g behind a post-MLP RMSNorm (Gemma), 1 otherwise (Llama: the reference's mapping)."""
        norm = getattr(self.decoder[layer], "post_feedforward_layernorm", None)
        weight = self.modules[layer].weight
        if norm is None:
            return torch.ones(weight.shape[0], keys.shape[1], device=weight.device)
        with torch.no_grad():
            y = (weight.float() @ keys.to(weight.device)).float()  # [D_out, n]
            rms = y.pow(2).mean(0, keepdim=True).sqrt()
            gain = norm(torch.ones(1, weight.shape[0], device=weight.device, dtype=weight.dtype)).float()[0]
        # a channel whose gain is under a tenth of the median one cannot be written within the linearisation
        # (it would need a >10x typical change of y there, which rescales every channel through rms(y)); Gemma 3
        # has gains of exactly 0 and of 0.0015 (layer 4) beside a median of ~5: left out, not divided by
        reachable = gain.abs() >= 0.1 * gain.abs().median()
        inverse = torch.where(reachable, 1.0 / torch.where(reachable, gain, torch.ones_like(gain)), torch.zeros_like(gain))
        return rms * inverse[:, None]

    def layer_update(self, position: int, layer: int, keys: torch.Tensor, resid: torch.Tensor) -> torch.Tensor:
        """ΔW `[D_out, D_in]` of one layer for keys `[D_in, n]` and residual values `[D_out, n]`."""
        raise NotImplementedError

    def after_batch(self, requests: Sequence[EditRequest]) -> None:
        """Called once a batch is written (AlphaEdit records its keys)."""

    def apply(self, requests: Sequence[EditRequest]) -> None:
        """Write a batch of edits into the weights (module docstring, steps 1-4)."""
        start = time.perf_counter()
        self.ensure_stats()
        self.subject_misses += sum(1 for r in requests if not (r.subject and r.subject in r.prompt))
        zs = torch.stack([self.compute_z(r) for r in requests], dim=1)  # [H, n]
        for position, layer in enumerate(self.layer_ids):
            keys = self.keys(requests, layer)  # [D_in, n], with the layers below already updated
            targets = zs - self.residual_at(requests).T.to(zs.device)
            resid = targets / (len(self.layer_ids) - position)  # spread the rest over the layers left
            resid = resid.to(keys.device) * self.value_scale(layer, keys).to(keys.device)
            update = self.layer_update(position, layer, keys, resid)
            if not torch.isfinite(update).all():
                raise NonFiniteLossError(f"{self.name}: the update of layer {layer} is not finite (edits {[r.id for r in requests]})")
            weight = self.modules[layer].weight
            with torch.no_grad():
                weight.add_(update.to(device=weight.device, dtype=weight.dtype))
        self.after_batch(requests)
        self.applied += [r.id for r in requests]
        self.edit_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ inference: pending edits first
    def answer(self, queries: Sequence[Query], generation: GenerationSpec) -> list[Answer]:
        self.flush()
        return super().answer(queries, generation)

    def loglikelihood(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        self.flush()
        return super().loglikelihood(queries, targets)

    def loglikelihood_unaugmented(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        self.flush()
        return super().loglikelihood_unaugmented(queries, targets)

    # ------------------------------------------------------------------ bookkeeping
    def reset(self) -> None:
        with torch.no_grad():
            for l, m in self.modules.items():
                m.weight.copy_(self.original[l].to(m.weight.device))
        self.pending, self.applied, self.z_losses = [], [], []
        self.subject_misses, self.flushed_at_scoring, self.edit_seconds = 0, 0, 0.0

    def editor_state(self) -> dict[str, torch.Tensor]:
        """Matrices a sequential editor keeps between batches to make the next edit (counted as storage)."""
        return {f"mom2.{l}": c for l, c in self.cov.items()}

    def extra_storage_bytes(self) -> int:
        """The edited weights replace the originals in place (nothing beside the served model); what is
        stored beside it is the editor's state needed to make further edits (`editor_state`)."""
        return sum(t.numel() * t.element_size() for t in self.editor_state().values())

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors beyond the weights that `save_state` must keep (AlphaEdit: the earlier edits' keys)."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what `extra_state` returned."""

    def save_state(self, directory: Path) -> bool:
        tensors = {f"weight.{l}": m.weight.detach().to("cpu").contiguous() for l, m in self.modules.items()}
        tensors |= {k: v.detach().to("cpu").contiguous() for k, v in self.extra_state().items()}
        save_file(tensors, str(Path(directory) / "mass_editing.safetensors"))
        state = {"pending": [asdict(r) for r in self.pending], "applied": self.applied, "z_losses": self.z_losses,
                 "templates": self.templates, "subject_misses": self.subject_misses,
                 "flushed_at_scoring": self.flushed_at_scoring, "edit_seconds": self.edit_seconds}
        (Path(directory) / "mass_editing.json").write_text(json.dumps(state, ensure_ascii=False) + "\n")
        return True

    def load_state(self, directory: Path) -> None:
        tensors = load_file(str(Path(directory) / "mass_editing.safetensors"))
        state = json.loads((Path(directory) / "mass_editing.json").read_text())
        with torch.no_grad():
            for l, m in self.modules.items():
                m.weight.copy_(tensors.pop(f"weight.{l}").to(m.weight.device))
        self.load_extra_state(tensors)
        self.pending = [EditRequest(**r) for r in state["pending"]]
        self.applied, self.templates = state["applied"], state["templates"]
        self.z_losses = [tuple(x) for x in state["z_losses"]]
        self.subject_misses, self.flushed_at_scoring = state["subject_misses"], state["flushed_at_scoring"]
        self.edit_seconds = state["edit_seconds"]

    def info(self) -> dict[str, Any]:
        losses = self.z_losses
        norm = getattr(self.decoder[self.layer_ids[0]], "post_feedforward_layernorm", None)
        return {
            "layers": self.layer_ids,
            "edits_applied": len(self.applied),
            "edits_pending": len(self.pending),
            "edits_applied_at_scoring": self.flushed_at_scoring,
            "edit_seconds": round(self.edit_seconds, 1),
            "subject_not_in_prompt": self.subject_misses,
            "value_mapping": "post-MLP RMSNorm, linearised" if norm is not None else "identity (reference)",
            "key_statistics": self.stats_info,
            "context_templates": self.templates,
            "mean_first_z_loss": sum(l[0] for l in losses) / len(losses) if losses else None,
            "mean_final_z_loss": sum(l[1] for l in losses) / len(losses) if losses else None,
            "mean_z_steps": sum(l[2] for l in losses) / len(losses) if losses else None,
            "mean_delta_over_h0": sum(l[3] for l in losses) / len(losses) if losses else None,  # the clamp is 0.75
            "weight_change_norm": {str(l): float((m.weight.detach().cpu().float() - self.original[l].float()).norm())
                                   for l, m in self.modules.items()},
        }
