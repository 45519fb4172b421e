"""RECIPE lifelong editing: retrieval-augmented continuous prompts with a knowledge sentinel.

After Chen et al. 2024, "Lifelong Knowledge Editing for LLMs with Retrieval-Augmented Continuous Prompt
Learning" (reference code: qizhou000/RECIPE, `editors/recipe/recipe.py`, `editors/recipe/models.py`,
`train_recipe.py`; read, not copied). The LM is never changed; every edit becomes a short continuous
prompt that is put in front of the queries that retrieve it.

Pieces (trained once in `prepare`, frozen afterwards):
- a sentence encoder E (MiniLM-L6 by default; the reference fine-tunes RoBERTa-base) gives text features
  f(x) = [sentence embedding, mean, max, min of the token states] (4 × width), trained with the rest
  when `train_encoder` (reference);
- a knowledge head K and a query head Q map features to representations (`rep_dim`), each
  h(f) = W₁f + ReLU(W₂W₁f) (linear + residual ReLU layer, as in the reference);
- the knowledge sentinel s: `sentinel_tokens` learned token states run through the encoder's
  transformer layers (reference), whose knowledge representation K(f(s)) is row 0 of the knowledge base;
- the prompt generator P maps a knowledge representation r to `prompt_tokens` vectors of the LM's
  hidden size: P(r) = W₄(r + ReLU(W₃r)) reshaped to [prompt_tokens, hidden].
sim(q, k) = Q(f(q))·K(f(k)) / √rep_dim (`similarity=dot`, reference) or their cosine.

Editing (`inject`): encode the edit statement (`Knowledge.context`: "prompt target"), store K(f(k))
and P(K(f(k))). No gradient step. Answering (`answer` / `score`): j* = argmax_j sim(q, k_j) over the
stored edits; if sim(q, k_j*) > sim(q, s) the prompt P_j* is spliced in after the start token through
`inputs_embeds`, otherwise the query goes through the untouched model's plain token path (bit-identical
outputs). The retrieval query q (`retrieval_query`) is, as in the reference's forward hook, the whole
text the LM's forward reads (`forward_input`): for a teacher-forced score that is prompt + target
without its last token, for generation the prompt; `prompt` retrieves on the prompt alone.

Training (`prepare`, on the task's held-out edits: prompt x, target y, rephrases x', locality prompts l
with their continuations; each training batch of B edits, statement k_i, p_i = P(K(f(k_i)))):
    L = λ_rel L_rel + λ_gen L_gen + λ_loc L_loc + λ_con (L_q2k + L_q2s + L_loc2s)
    L_rel   = − mean_t log p(y_t | BOS, p_i, x_i, y_<t)         over target tokens not yet won by margin
    L_gen   = the same for a random rephrase x'_i of edit i      (a token is "won" once p(y_t) ≥ h_e · max_other p)
    L_loc   = KL(p_LM(· | l_i) ‖ p(· | BOS, p_i, l_i)) on the locality continuation's positions
    L_q2k   = − log softmax_c(τ sim(q_i, c))[k_i],  c ∈ {s, k_1..k_M}: a query (prompt or rephrase at random)
              is pulled to its own statement, against the sentinel and the batch's statements
    L_q2s   = − log softmax_c(τ sim(q'_i, c))[s],   c ∈ {s} ∪ candidates without k_i: with its own
              knowledge absent, the other query must fall back to the sentinel
    L_loc2s = − log softmax_c(τ sim(l_i, c))[s],    c ∈ {s, k_1..k_M}: unrelated queries stay below the sentinel
The last two are hinged like the reference: only rows where p(s) < h_c · max_other p contribute. All
terms train everything (encoder, heads, sentinel, prompt generator) from the first step with one Adam
learning rate, as in the reference; `edit_gradients=prompt_generator`, `retrieval_epochs`,
`contrastive_negatives`, `standardise`, `head_init=shared_projection`, `sentinel=feature_vector` and a
frozen encoder are the earlier CPU-budget variant's knobs (docs/recipe.md lists each with its reference value).

Deviations that are not knobs: prompts are spliced after the start token (the reference prepends them
before it; Gemma needs BOS at position 0); the first feature is the encoder's sentence embedding (the
reference reads RoBERTa's pooler output).

The trained module (and the fine-tuned encoder) is saved as safetensors under
$KBENCH_CACHE/recipe/<hash>.safetensors, with the training curves beside it (<hash>.png, <hash>.json);
it is reused when the model, encoder, knobs and training data are identical (`cache`), or loaded from
`checkpoint`.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from safetensors.torch import load_file, save_file
from torch import nn

from core.encoder import load_sentence_encoder
from core.io import atomic_write_json, cache_dir, default_modes, note_input, read_json, stable_hash
from core.lm import LM
from core.options import ConfigError, checked
from core.progress import progress
from core.training import train
from core.types import (
    Answer, GenerationSpec, KBenchError, Knowledge, NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, Query,
    TargetScore,
)
from methods.base import Method

log = logging.getLogger(__name__)

FORMAT = "kbench-recipe-2"  # bump when the saved module's layout changes
RETRIEVED_KNOWLEDGE_IDS = "retrieved_knowledge_ids"  # the answer-meta key retrieval metrics read
EDIT_KEYS = ("prompt", "target", "rephrase_prompts", "locality_prompts", "locality_answers")
REFERENCE_ENCODER = "roberta-base"
PROBE_EDITS = 100  # training edits the per-epoch retrieval diagnostics look at


@dataclass(frozen=True)
class TrainingEdit:
    """One held-out edit in the form RECIPE trains on (rendered exactly as the task's probes ask)."""

    statement: str
    prompt: str
    target: str
    rephrases: tuple[str, ...]
    locality: tuple[tuple[str, str], ...]  # (prompt, continuation as scored)


def training_edits(knowledge: Sequence[Knowledge]) -> list[TrainingEdit]:
    """Edits from `Knowledge` following the editing contract (tasks/editing.py): `context` is the edit
    statement, `meta` holds `prompt`, `target`, `rephrase_prompts`, `locality_prompts`, `locality_answers`.
    A locality answer is scored after the same separator as the target (target = separator + target_new)."""
    edits = []
    for item in knowledge:
        missing = [key for key in EDIT_KEYS if key not in item.meta]
        if missing:
            raise KBenchError(
                f"method=recipe trains on edits, but training knowledge {item.id!r} has no {missing} in its meta; "
                "use a task whose training_knowledge() follows the editing contract (task=editing, task=synthetic)"
            )
        meta = item.meta
        separator = meta["target"][: len(meta["target"]) - len(meta.get("target_new") or meta["target"].lstrip())]
        edits.append(TrainingEdit(
            statement=item.context,
            prompt=meta["prompt"],
            target=meta["target"],
            rephrases=tuple(meta["rephrase_prompts"]),
            locality=tuple((p, separator + a) for p, a in zip(meta["locality_prompts"], meta["locality_answers"])),
        ))
    return edits


def is_reference_encoder(name: str) -> bool:
    """True for the reference's encoder: RoBERTa-base by hub id or as a local folder of that name."""
    return name.rstrip("/").split("/")[-1].lower() == REFERENCE_ENCODER


class ResidualHead(nn.Module):
    """x ↦ W₁x + ReLU(W₂W₁x): the reference's representation transform."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, out_dim)
        self.refine = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        return x + F.relu(self.refine(x))


class RecipeModule(nn.Module):
    """What RECIPE trains beside the encoder: feature standardisation, the two heads, the sentinel, the
    prompt generator. `sentinel` is `[sentinel_tokens, token_dim]` token states (`encoder_tokens`) or
    one standardised feature vector (`feature_vector`)."""

    def __init__(self, feature_dim: int, token_dim: int, rep_dim: int, hidden_size: int, prompt_tokens: int, *,
                 cosine: bool, sentinel: str, sentinel_tokens: int, head_init: str) -> None:
        super().__init__()
        self.rep_dim, self.hidden_size, self.prompt_tokens, self.cosine = rep_dim, hidden_size, prompt_tokens, cosine
        self.sentinel_mode = sentinel
        # identity unless `standardise`: then the training split's statistics (the earlier CPU variant)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.knowledge_head = ResidualHead(feature_dim, rep_dim)
        self.query_head = ResidualHead(feature_dim, rep_dim)
        if sentinel == "encoder_tokens":  # the reference's initialisation: uniform in ±0.05
            self.sentinel = nn.Parameter((torch.rand(sentinel_tokens, token_dim) - 0.5) * 0.1)
        else:  # the average text, in standardised features
            self.sentinel = nn.Parameter(torch.zeros(feature_dim))
        self.prompt_body = nn.Linear(rep_dim, rep_dim)
        self.prompt_out = nn.Linear(rep_dim, prompt_tokens * hidden_size)
        if head_init == "shared_projection":
            # Both heads start as the same random projection with a silent residual layer: sim(q, k) is
            # then close to the encoder's own inner product of q and k, so a short training departs from
            # a retriever that already works (the reference initialises both heads at random).
            with torch.no_grad():
                for head in (self.knowledge_head, self.query_head):
                    nn.init.zeros_(head.refine.weight)
                    nn.init.zeros_(head.refine.bias)
                    nn.init.zeros_(head.project.bias)
                nn.init.normal_(self.knowledge_head.project.weight, std=feature_dim ** -0.5)
                self.query_head.project.weight.copy_(self.knowledge_head.project.weight)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std

    def knowledge(self, features: torch.Tensor) -> torch.Tensor:
        return self.knowledge_head(self.standardise(features))

    def query(self, features: torch.Tensor) -> torch.Tensor:
        return self.query_head(self.standardise(features))

    def prompts(self, reps: torch.Tensor) -> torch.Tensor:
        """`[n, prompt_tokens, hidden]` continuous prompts of knowledge representations."""
        x = reps + F.relu(self.prompt_body(reps))
        return self.prompt_out(x).view(len(reps), self.prompt_tokens, self.hidden_size)

    def similarity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
        return queries @ keys.T / math.sqrt(self.rep_dim)


def hinged_nll(logits: torch.Tensor, target: torch.Tensor, scale: float) -> tuple[torch.Tensor, int]:
    """Summed −log p(target) over the rows whose target has not yet won by the margin
    p(target) ≥ scale · max_{other} p, and the number of such rows (the reference's hinge)."""
    logprobs = torch.log_softmax(logits, dim=-1)
    target_lp = logprobs.gather(1, target[:, None]).squeeze(1)
    others = logprobs.scatter(1, target[:, None], float("-inf")).max(dim=1).values
    active = target_lp.detach() < others.detach() + math.log(scale)
    return -(target_lp[active]).sum(), int(active.sum())


def _mean(total: torch.Tensor, count: int) -> torch.Tensor:
    return total / count if count else total * 0.0


def _pooled(tokens: torch.Tensor, mask: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
    """`[n, 4 × width]`: [sentence embedding, mean, max, min] of the token states under `mask`."""
    mask = mask.unsqueeze(-1).bool()
    mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
    high = tokens.masked_fill(~mask, float("-inf")).max(1).values
    low = tokens.masked_fill(~mask, float("inf")).min(1).values
    return torch.cat([sentence, mean, high, low], dim=1)


class _TrainingData:
    """Training edits, and the encoder features of their texts: computed once when the encoder is
    frozen (`cached`), with gradients at every request when it trains."""

    def __init__(self, edits: Sequence[TrainingEdit], encode, rng: random.Random, cached: bool) -> None:
        self.statements = sorted({e.statement for e in edits})
        self.statement_index = {s: i for i, s in enumerate(self.statements)}
        self.encode, self.rng = encode, rng
        self.cache: torch.Tensor | None = None
        if cached:
            texts = sorted({t for e in edits for t in (e.statement, e.prompt, *e.rephrases, *(p for p, _ in e.locality))})
            self.row = {t: i for i, t in enumerate(texts)}
            self.cache = encode(texts)

    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        if self.cache is not None:
            return self.cache[[self.row[t] for t in texts]]
        return self.encode(list(texts), grad=torch.is_grad_enabled())

    def locality_sample(self, batch: Sequence[TrainingEdit], per_edit: int) -> list[tuple[int, str, str]]:
        """Up to `per_edit` random locality (prompt, continuation) pairs per edit, with the edit's batch index."""
        return [(i, p, c) for i, e in enumerate(batch) for p, c in self.rng.sample(e.locality, min(per_edit, len(e.locality)))]


class Recipe(Method):
    """`method=recipe`: a knowledge base of continuous prompts, retrieved per query above a learned sentinel."""

    name = "recipe"

    #: qizhou000/RECIPE: configs/recipe/*.yaml (rep 4096, 10 sentinel tokens, 3 prompt tokens, lr 1e-5,
    #: λ = 1, temperatures 1, hinges 1.2), train_recipe.py (batch 8, 1000 epochs), recipe.py (Adam over
    #: the encoder, heads and prompt generator, no clipping; retrieval on the decoded forward input).
    reference: ClassVar[dict[str, Any]] = {
        "encoder": REFERENCE_ENCODER, "train_encoder": True, "prompt_tokens": 3, "rep_dim": 4096,
        "sentinel": "encoder_tokens", "sentinel_tokens": 10, "head_init": "random", "standardise": False,
        "lr": 1e-5, "epochs": 1000, "retrieval_epochs": 0, "batch_size": 8, "weight_decay": 0.0,
        "max_grad_norm": 0.0, "reliability_weight": 1.0, "generality_weight": 1.0, "locality_weight": 1.0,
        "contrastive_weight": 1.0, "similarity": "dot", "temperature": 1.0, "contrastive_hinge": 1.2,
        "edit_hinge": 1.2, "contrastive_negatives": 0, "max_locality_per_edit": 1, "edit_gradients": "all",
        "retrieval_query": "forward_input",
    }

    @checked("method")
    def __init__(
        self,
        lm: LM,
        encoder: str = "embedded:all-minilm-l6-v2",
        train_encoder: bool = True,
        encoder_batch_size: PositiveInt = 64,
        prompt_tokens: PositiveInt = 3,
        rep_dim: PositiveInt = 4096,
        sentinel: Literal["encoder_tokens", "feature_vector"] = "encoder_tokens",
        sentinel_tokens: PositiveInt = 10,
        head_init: Literal["random", "shared_projection"] = "random",
        standardise: bool = False,
        lr: PositiveFloat = 1e-5,
        epochs: NonNegativeInt = 1000,
        retrieval_epochs: NonNegativeInt = 0,
        batch_size: PositiveInt = 8,
        weight_decay: NonNegativeFloat = 0.0,
        max_grad_norm: NonNegativeFloat = 0.0,
        reliability_weight: NonNegativeFloat = 1.0,
        generality_weight: NonNegativeFloat = 1.0,
        locality_weight: NonNegativeFloat = 1.0,
        contrastive_weight: NonNegativeFloat = 1.0,
        similarity: Literal["cosine", "dot"] = "dot",
        temperature: PositiveFloat = 1.0,
        contrastive_hinge: Annotated[float, Field(ge=1)] = 1.2,  # a large value = no hinge
        edit_hinge: Annotated[float, Field(ge=1)] = 1.2,
        contrastive_negatives: NonNegativeInt = 0,
        max_locality_per_edit: NonNegativeInt = 1,
        edit_gradients: Literal["all", "prompt_generator"] = "all",
        retrieval_query: Literal["forward_input", "prompt"] = "forward_input",
        checkpoint: str | None = None,
        cache: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(lm)
        if not epochs + retrieval_epochs:
            raise ConfigError("method.epochs, method.retrieval_epochs: not both 0 (nothing would be trained)")
        self.encoder_name = encoder
        self.encoder = load_sentence_encoder(encoder, device=str(lm.device))
        self.encoder.eval()
        self.encoder.requires_grad_(False)
        self.encoder_batch_size = encoder_batch_size
        self.knobs = dict(
            train_encoder=train_encoder, prompt_tokens=prompt_tokens, rep_dim=rep_dim, sentinel=sentinel,
            sentinel_tokens=sentinel_tokens, head_init=head_init, standardise=standardise, lr=lr, epochs=epochs,
            retrieval_epochs=retrieval_epochs, batch_size=batch_size, weight_decay=weight_decay,
            max_grad_norm=max_grad_norm, reliability_weight=reliability_weight, generality_weight=generality_weight,
            locality_weight=locality_weight, contrastive_weight=contrastive_weight, similarity=similarity,
            temperature=temperature, contrastive_hinge=contrastive_hinge, edit_hinge=edit_hinge,
            contrastive_negatives=contrastive_negatives, max_locality_per_edit=max_locality_per_edit,
            edit_gradients=edit_gradients, seed=seed,
        )
        self.retrieval_query = retrieval_query  # not in knobs: inference only, so not part of the cache hash
        self.checkpoint, self.cache, self.seed = checkpoint, cache, seed
        width = self.encoder.get_embedding_dimension()
        torch.manual_seed(seed)
        self.module = RecipeModule(
            4 * width, width, rep_dim, lm.hidden_size, prompt_tokens, cosine=similarity == "cosine",
            sentinel=sentinel, sentinel_tokens=sentinel_tokens, head_init=head_init,
        ).to(lm.device)
        self.module.requires_grad_(False)
        self.trained = False
        self.prepare_info: dict[str, Any] = {}
        self.curves: dict[str, list[dict[str, Any]]] = {"steps": [], "epochs": []}
        self.decisions = {"queries": 0, "accepted": 0, "empty_store": 0}  # over the whole run, across resets
        self.reset()

    def reference_deviations(self) -> dict[str, str]:
        """Knobs set off the reference (`reference`); any RoBERTa-base folder counts as its encoder."""
        current = self.knobs | {"encoder": self.encoder_name, "retrieval_query": self.retrieval_query}
        return {
            knob: f"{current[knob]!r} (reference: {ref!r})"
            for knob, ref in self.reference.items()
            if not (is_reference_encoder(current[knob]) if knob == "encoder" else current[knob] == ref)
        }

    # ------------------------------------------------------------------ features
    def features(self, texts: Sequence[str], grad: bool = False) -> torch.Tensor:
        """`[n, 4 × width]`: sentence embedding and mean / max / min of the token states of each text;
        with `grad`, differentiable in the encoder's weights."""
        rows = []
        starts = range(0, len(texts), self.encoder_batch_size)
        with torch.set_grad_enabled(grad):
            for start in progress(starts, desc="encode", total=len(starts), disable=len(starts) < 4 or None):
                batch = self.encoder.preprocess(list(texts[start : start + self.encoder_batch_size]))
                batch = {k: v.to(self.encoder.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                out = self.encoder(batch)
                rows.append(_pooled(out["token_embeddings"], out["attention_mask"], out["sentence_embedding"]))
            return torch.cat(rows).float().to(self.lm.device)

    def sentinel_rep(self) -> torch.Tensor:
        """`[1, rep_dim]`: the sentinel's knowledge representation (row 0 of the knowledge base)."""
        module = self.module
        if module.sentinel_mode == "feature_vector":
            return module.knowledge_head(module.sentinel[None])  # already in standardised feature space
        # the reference runs its encoder's layers (not the embedding layer) over the learned token states
        transformer = getattr(self.encoder[0], "auto_model", None)
        if not hasattr(transformer, "encoder"):
            raise KBenchError(f"method.sentinel=encoder_tokens needs a BERT-like encoder with .encoder layers; "
                              f"{self.encoder_name} has none: use method.sentinel=feature_vector")
        states = transformer.encoder(module.sentinel[None].to(self.encoder.device)).last_hidden_state
        mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
        pooled = {"token_embeddings": states, "attention_mask": mask}
        for step in list(self.encoder)[1:]:  # the encoder's own pooling (and normalisation)
            pooled = step(pooled)
        return module.knowledge(_pooled(states, mask, pooled["sentence_embedding"]).float().to(self.lm.device))

    # ------------------------------------------------------------------ training (once)
    def prepare(self, training_knowledge: Sequence[Knowledge]) -> None:
        started = time.perf_counter()
        if self.checkpoint:
            self.load(self.checkpoint)
            self.prepare_info = {"source": "checkpoint", "path": str(self.checkpoint)} | self._saved_facts
            return
        edits = training_edits(training_knowledge)
        if not edits:
            raise KBenchError(
                "method=recipe trains once before any edit, but the task gave no training split "
                "(training_knowledge() is empty). Use a task with held-out edits (task=editing with "
                "task.n_train > 0, task=synthetic with task.n_train_contexts > 0) or pass method.checkpoint=FILE."
            )
        path = cache_dir("recipe") / f"{self.identity(edits)}.safetensors"
        if self.cache and path.is_file():
            self.load(path)
            self.prepare_info = {"source": "cache", "path": str(path)} | self._saved_facts
            log.info("recipe: loaded the module trained earlier on the same data and knobs from %s", path)
            return
        losses = self.fit(edits)
        first_last = lambda values: [round(values[0], 4), round(values[-1], 4)] if values else None  # noqa: E731
        self.prepare_info = {
            "source": "trained", "train_seconds": round(time.perf_counter() - started, 3),
            "train_edits": len(edits), "statements": len({e.statement for e in edits}),
            "retrieval_steps": len(self.retrieval_losses), "retrieval_loss_first_last": first_last(self.retrieval_losses),
            "joint_steps": len(losses), "joint_loss_first_last": first_last(losses),
            "final_loss_components": self.last_components,
            "epochs": self.curves["epochs"],
        }
        if self.cache:
            self.save(path)
            self.prepare_info["path"] = str(path)
            self.prepare_info["curves"] = str(self.save_curves(path.with_suffix("")))
            note_input(path)  # later runs load this file instead of training: it is part of their inputs

    def identity(self, edits: Sequence[TrainingEdit]) -> str:
        """Hash of everything that determines the trained module."""
        return stable_hash({
            "format": FORMAT, "model": self.lm.name, "hidden": self.lm.hidden_size, "encoder": self.encoder_name,
            "knobs": self.knobs, "edits": [vars(e) for e in edits],
        })

    def trained_parameters(self, retrieval_only: bool) -> list[nn.Parameter]:
        """What the optimiser moves: the encoder (when trained), the heads and the sentinel; and, jointly,
        the prompt generator."""
        module = self.module
        params = [*module.knowledge_head.parameters(), *module.query_head.parameters(), module.sentinel]
        if not retrieval_only:
            params += [*module.prompt_body.parameters(), *module.prompt_out.parameters()]
        if self.knobs["train_encoder"]:
            params += list(self.encoder.parameters())
        return params

    def fit(self, edits: Sequence[TrainingEdit]) -> list[float]:
        """Train on held-out edits (the objective in the module docstring); returns the joint losses.
        Per step and per epoch diagnostics go to `self.curves` (edit losses, retrieval accuracy, sentinel
        rejection)."""
        k = self.knobs
        data = _TrainingData(edits, self.features, random.Random(k["seed"]), cached=not k["train_encoder"])
        if k["standardise"]:
            with torch.no_grad():
                sample = data.cache if data.cache is not None else data.text_features(
                    sorted({t for e in edits[:512] for t in (e.statement, e.prompt)}))
            self.module.feature_mean.copy_(sample.mean(0))
            self.module.feature_std.copy_(sample.std(0).clamp(min=1e-4))
        probe = list(edits[:PROBE_EDITS])
        steps_per_epoch = math.ceil(len(edits) / k["batch_size"])
        self.last_components: dict[str, float] = {}
        self.curves = {"steps": [], "epochs": []}
        weights = {"reliability": k["reliability_weight"], "generality": k["generality_weight"],
                   "locality_kl": k["locality_weight"]}

        def run(epochs: int, with_lm: bool, desc: str) -> list[float]:
            if not epochs:
                return []
            phase = "joint" if with_lm else "retrieval"
            self.curves["epochs"].append(self.probe_retrieval(probe, data) | {"phase": phase, "epoch": 0})
            done = [0]

            def loss_fn(batch: list[TrainingEdit]) -> tuple[torch.Tensor, int]:
                epoch = done[0] // steps_per_epoch + 1
                if done[0] and done[0] % steps_per_epoch == 0:  # the state after the previous epoch
                    self.curves["epochs"].append(self.probe_retrieval(probe, data) | {"phase": phase, "epoch": epoch - 1})
                done[0] += 1
                keys = self.module.knowledge(data.text_features([e.statement for e in batch]))
                parts, rates = self.contrastive_losses(batch, keys, data)
                if with_lm:
                    parts |= self.edit_losses(batch, keys, data)
                self.last_components = {name: round(float(v.detach()), 4) for name, v in parts.items()}
                self.curves["steps"].append({"phase": phase, "epoch": epoch} | self.last_components | rates)
                return sum(weights.get(name, k["contrastive_weight"]) * value for name, value in parts.items()), 1

            losses = train(self.trained_parameters(not with_lm), list(edits), loss_fn, epochs=epochs, lr=k["lr"],
                           batch_size=k["batch_size"], weight_decay=k["weight_decay"],
                           max_grad_norm=k["max_grad_norm"], seed=k["seed"], desc=desc)
            self.curves["epochs"].append(self.probe_retrieval(probe, data) | {"phase": phase, "epoch": epochs})
            return losses

        self.module.requires_grad_(True)
        if k["train_encoder"]:
            self.encoder.requires_grad_(True)
            self.encoder.train()  # dropout on while training, as the reference's train mode
        try:
            # the contrastive terms alone need no LM forward (the earlier CPU variant runs many epochs of them first)
            self.retrieval_losses = run(k["retrieval_epochs"], False, "recipe prepare: retrieval")
            losses = run(k["epochs"], any(weights.values()), "recipe prepare: joint")
        finally:
            self.module.requires_grad_(False)
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        self.trained = True
        self.reset()  # representations computed before training are stale
        return losses

    def contrastive_losses(self, batch: Sequence[TrainingEdit], keys: torch.Tensor,
                           data: _TrainingData) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """L_q2k, L_q2s and L_loc2s of one batch (module docstring), given the batch's knowledge
        representations `keys`; and the batch's retrieval rates (argmax over the same candidates)."""
        k, module, rng = self.knobs, self.module, data.rng
        own = [e.statement for e in batch]
        taken = {data.statement_index[s] for s in own}
        negatives: list[str] = []
        if k["contrastive_negatives"]:
            others = [i for i in range(len(data.statements)) if i not in taken]
            negatives = [data.statements[i] for i in rng.sample(others, min(k["contrastive_negatives"], len(others)))]
        parts = [self.sentinel_rep(), keys]
        if negatives:
            parts.append(module.knowledge(data.text_features(negatives)))
        candidates = torch.cat(parts)
        columns = own + negatives  # candidate j + 1; column 0 is the sentinel
        device = candidates.device
        same = torch.tensor([[False] + [c == s for c in columns] for s in own], device=device)
        own_column = torch.arange(1, len(batch) + 1, device=device)
        twins = same.clone()
        twins[torch.arange(len(batch)), own_column] = False  # another batch edit with the same statement

        def logits(texts: Sequence[str]) -> torch.Tensor:
            return k["temperature"] * module.similarity(module.query(data.text_features(texts)), candidates)

        sentinel = torch.zeros(len(batch), dtype=torch.long, device=device)
        # two different queries of each edit (its prompt and a rephrase), assigned at random
        picks = [rng.sample(q, 2) if len(q) > 1 else q * 2 for q in ([e.prompt, *e.rephrases] for e in batch)]
        first = logits([p[0] for p in picks]).masked_fill(twins, -1e4)
        q2k = F.cross_entropy(first, own_column)
        hidden_own = logits([p[1] for p in picks]).masked_fill(same, -1e4)
        q2s = _mean(*hinged_nll(hidden_own, sentinel, k["contrastive_hinge"]))
        rates = {"batch_retrieval": float((first.argmax(1) == own_column).float().mean()),
                 "batch_fallback": float((hidden_own.argmax(1) == 0).float().mean())}
        locality = data.locality_sample(batch, k["max_locality_per_edit"])
        loc2s = candidates.new_zeros(())
        if locality:
            rows = logits([p for _, p, _ in locality])
            loc2s = _mean(*hinged_nll(rows, sentinel.new_zeros(len(locality)), k["contrastive_hinge"]))
            rates["batch_rejection"] = float((rows.argmax(1) == 0).float().mean())
        return {"query_to_knowledge": q2k, "query_to_sentinel": q2s, "locality_to_sentinel": loc2s}, rates

    def edit_losses(self, batch: Sequence[TrainingEdit], keys: torch.Tensor, data: _TrainingData) -> dict[str, torch.Tensor]:
        """L_rel, L_gen and L_loc of one batch: each edit's own prompt on its edit prompt, one rephrase
        and its locality prompts, in one LM forward. With `edit_gradients=all` (reference) they train the
        representations and the encoder too; `prompt_generator` stops them at the prompt generator."""
        k, lm, rng = self.knobs, self.lm, data.rng
        prompts = self.module.prompts(keys if k["edit_gradients"] == "all" else keys.detach())
        rel = [(lm.prompt_ids(e.prompt), lm.encode(e.target), i) for i, e in enumerate(batch)]
        gen = [(lm.prompt_ids(rng.choice(e.rephrases)), lm.encode(e.target), i) for i, e in enumerate(batch) if e.rephrases]
        loc = [(lm.prompt_ids(p), lm.encode(c), i) for i, p, c in data.locality_sample(batch, k["max_locality_per_edit"])]
        rows = rel + gen + loc
        vbatch = lm.collate_with_vectors([(x, y) for x, y, _ in rows], [prompts[i] for _, _, i in rows])
        logits = lm.target_logits_with_vectors(vbatch)
        lengths = vbatch.predicted_mask.sum(1).tolist()
        n_rel, n_gen = sum(lengths[: len(rel)]), sum(lengths[len(rel) : len(rel) + len(gen)])
        targets = vbatch.target_ids.to(logits.device)  # logits live on the output head's device
        parts = {
            "reliability": _mean(*hinged_nll(logits[:n_rel], targets[:n_rel], k["edit_hinge"])),
            "generality": _mean(*hinged_nll(logits[n_rel : n_rel + n_gen], targets[n_rel : n_rel + n_gen], k["edit_hinge"])),
            "locality_kl": logits.new_zeros(()),
        }
        if loc:
            with torch.no_grad():  # the untouched model's distribution on the locality continuation
                base = torch.log_softmax(lm.target_logits(lm.collate([(x, y) for x, y, _ in loc])), dim=-1)
            edited = torch.log_softmax(logits[n_rel + n_gen :], dim=-1)
            parts["locality_kl"] = F.kl_div(edited, base, log_target=True, reduction="batchmean")
        return parts

    @torch.no_grad()
    def probe_retrieval(self, edits: Sequence[TrainingEdit], data: _TrainingData) -> dict[str, float]:
        """Retrieval over a knowledge base of `edits`' statements, as after training: the share of their
        prompts and first rephrases that retrieve their own statement above the sentinel, and of their
        locality prompts the sentinel rejects (a training-split diagnostic, queries on the prompt)."""
        training = self.encoder.training
        self.encoder.eval()
        try:
            statements = sorted({e.statement for e in edits})
            keys = self.module.knowledge(data.text_features(statements))
            sentinel = self.sentinel_rep()

            def decide(texts: list[str]) -> tuple[list[int], list[bool]]:
                reps = self.module.query(data.text_features(texts))
                best, index = self.module.similarity(reps, keys).max(dim=1)
                return index.tolist(), (best > self.module.similarity(reps, sentinel)[:, 0]).tolist()

            own = [statements.index(e.statement) for e in edits]
            rates = {}
            for name, texts in (("prompt", [e.prompt for e in edits]),
                                ("rephrase", [e.rephrases[0] if e.rephrases else e.prompt for e in edits])):
                index, accepted = decide(texts)
                rates[f"retrieval_{name}"] = round(sum(i == o and a for i, o, a in zip(index, own, accepted)) / len(edits), 4)
            locality = [p for e in edits for p, _ in e.locality]
            if locality:
                rates["sentinel_rejection"] = round(sum(not a for a in decide(locality)[1]) / len(locality), 4)
            return rates
        finally:
            self.encoder.train(training)

    def save_curves(self, stem: Path) -> Path:
        """The training curves as `<stem>.json` and `<stem>.png` (`plot_curves`); returns the PNG's path."""
        atomic_write_json(stem.with_suffix(".json"), self.curves)
        return plot_curves(self.curves, stem.with_suffix(".png"))

    # ------------------------------------------------------------------ saving the trained module
    def save(self, path: str | Path) -> None:
        """The trained module (and the encoder, when trained) as safetensors; the metadata records what
        it was trained for."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.module.state_dict().items()}
        if self.knobs["train_encoder"]:
            tensors |= {f"encoder.{n}": t.detach().to("cpu").contiguous() for n, t in self.encoder.state_dict().items()}
        metadata = {"format": FORMAT, "model": self.lm.name, "encoder": self.encoder_name,
                    "shapes": json.dumps(self._shapes()), "knobs": json.dumps(self.knobs),
                    "prepare": json.dumps({k: v for k, v in self.prepare_info.items() if k != "epochs"})}
        staging = path.with_suffix(".tmp")
        save_file(tensors, str(staging), metadata=metadata)
        default_modes(staging)  # safetensors writes 0600
        staging.replace(path)

    def load(self, path: str | Path) -> None:
        """Load a module saved by `save`; it must fit this LM's hidden size and these knobs' shapes."""
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise KBenchError(f"method.checkpoint: no trained RECIPE module at {path}")
        note_input(path)  # a trained module read from disk is an input of the run, like its data
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise KBenchError(f"{path} is not a kbench RECIPE module (format {metadata.get('format')!r}, expected {FORMAT})")
        if json.loads(metadata["shapes"]) != self._shapes():
            raise KBenchError(
                f"{path} was trained for {metadata['shapes']} (model {metadata.get('model')}, encoder "
                f"{metadata.get('encoder')}), but this run needs {json.dumps(self._shapes())}"
            )
        tensors = load_file(str(path))
        encoder = {n.removeprefix("encoder."): t for n, t in tensors.items() if n.startswith("encoder.")}
        self.module.load_state_dict({n: t.to(self.lm.device) for n, t in tensors.items() if not n.startswith("encoder.")})
        if encoder:
            self.encoder.load_state_dict({n: t.to(self.encoder.device) for n, t in encoder.items()})
        self._saved_facts = {"trained_for": {"model": metadata.get("model"), "encoder": metadata.get("encoder")},
                             "training": json.loads(metadata.get("prepare", "{}"))}
        self.trained = True
        self.reset()

    def _shapes(self) -> dict[str, Any]:
        m = self.module
        return {"feature_dim": m.feature_mean.numel(), "rep_dim": m.rep_dim, "hidden": m.hidden_size,
                "prompt_tokens": m.prompt_tokens, "sentinel": list(m.sentinel.shape),
                "trained_encoder": bool(self.knobs["train_encoder"])}

    # ------------------------------------------------------------------ the knowledge base
    def reset(self) -> None:
        """Empty the knowledge base (the trained module stays)."""
        device = self.lm.device
        self.ids: list[str] = []
        self.keys = torch.zeros(0, self.module.rep_dim, device=device)
        self.prompts = torch.zeros(0, self.module.prompt_tokens, self.module.hidden_size, device=device)
        with torch.no_grad():
            self.sentinel_key = self.sentinel_rep()

    @torch.no_grad()
    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        if not self.trained:
            raise KBenchError("method=recipe: inject() before prepare(); the module must be trained first")
        if not knowledge:
            return
        keys = self.module.knowledge(self.features([k.context for k in knowledge]))
        self.ids += [k.id for k in knowledge]
        self.keys = torch.cat([self.keys, keys])
        self.prompts = torch.cat([self.prompts, self.module.prompts(keys)])

    def query_texts(self, queries: Sequence[Query], targets: Sequence[str] | None = None) -> list[str]:
        """What retrieval reads per query (`retrieval_query`): the prompt, or the decoded forward input as
        in the reference's hook (special tokens dropped): prompt + target without its last token when
        scoring a target, the prompt's tokens when generating."""
        if self.retrieval_query == "prompt":
            return [q.prompt for q in queries]
        if targets is None:
            return [self.lm.decode(self.prompt_ids(q)) for q in queries]
        return [self.lm.decode(self.prompt_ids(q) + self.lm.encode(t)[:-1]) for q, t in zip(queries, targets)]

    @torch.no_grad()
    def retrieve(self, queries: Sequence[Query], targets: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Per query: the stored edit used (or none) with its similarity and the sentinel's; `targets`
        (teacher-forced scoring) enter the query text with `retrieval_query=forward_input`."""
        if not queries:
            return []
        reps = self.module.query(self.features(self.query_texts(queries, targets)))
        sentinel = self.module.similarity(reps, self.sentinel_key)[:, 0]
        decisions = []
        if len(self.ids):
            best, index = self.module.similarity(reps, self.keys).max(dim=1)
            best, index = best.tolist(), index.tolist()  # one transfer per batch of queries, not one per query
        sentinel = sentinel.tolist()
        for i in range(len(queries)):
            decision = {"sentinel": float(sentinel[i]), "similarity": None, "index": None}
            if len(self.ids):
                decision["similarity"] = float(best[i])
                if best[i] > sentinel[i]:
                    decision["index"] = int(index[i])
            decisions.append(decision)
        self.decisions["queries"] += len(decisions)
        self.decisions["accepted"] += sum(d["index"] is not None for d in decisions)
        self.decisions["empty_store"] += 0 if len(self.ids) else len(decisions)
        return decisions

    def _meta(self, decision: dict[str, Any]) -> dict[str, Any]:
        index = decision["index"]
        return {
            RETRIEVED_KNOWLEDGE_IDS: [] if index is None else [self.ids[index]],
            "recipe_similarity": None if decision["similarity"] is None else round(decision["similarity"], 4),
            "recipe_sentinel": round(decision["sentinel"], 4),
        }

    def answer(self, queries: Sequence[Query], generation: GenerationSpec) -> list[Answer]:
        decisions = self.retrieve(queries)
        texts: list[str | None] = [None] * len(queries)
        plain = [i for i, d in enumerate(decisions) if d["index"] is None]
        edited = [i for i, d in enumerate(decisions) if d["index"] is not None]
        if plain:  # no prompt: exactly the untouched model's path
            for i, text in zip(plain, self.lm.generate([self.prompt_ids(queries[i]) for i in plain], generation)):
                texts[i] = text
        if edited:
            vectors = [self.prompts[decisions[i]["index"]] for i in edited]
            out = self.lm.generate_with_vectors([self.prompt_ids(queries[i]) for i in edited], vectors, generation)
            for i, text in zip(edited, out):
                texts[i] = text
        return [Answer(text, meta=self._meta(d)) for text, d in zip(texts, decisions)]

    def score(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        decisions = self.retrieve(queries, targets)
        pairs = [(self.prompt_ids(q), self.lm.encode(t)) for q, t in zip(queries, targets)]
        scores: list[TargetScore | None] = [None] * len(queries)
        plain = [i for i, d in enumerate(decisions) if d["index"] is None]
        edited = [i for i, d in enumerate(decisions) if d["index"] is not None]
        if plain:
            for i, s in zip(plain, self.lm.score([pairs[i] for i in plain])):
                scores[i] = s
        if edited:
            vectors = [self.prompts[decisions[i]["index"]] for i in edited]
            for i, s in zip(edited, self.lm.score_with_vectors([pairs[i] for i in edited], vectors)):
                scores[i] = s
        for score, decision in zip(scores, decisions):
            score.meta = self._meta(decision)
        return scores

    # ------------------------------------------------------------------ resumable runs
    def save_state(self, directory: Path) -> bool:
        """The knowledge base; the trained module comes back through `prepare` (cache or checkpoint)."""
        directory = Path(directory)
        save_file({"keys": self.keys.detach().cpu().contiguous(), "prompts": self.prompts.detach().cpu().contiguous()},
                  str(directory / "recipe_store.safetensors"))
        atomic_write_json(directory / "recipe_store.json", {"ids": self.ids, "decisions": self.decisions})
        return True

    def load_state(self, directory: Path) -> None:
        directory = Path(directory)
        state = read_json(directory / "recipe_store.json", "a RECIPE knowledge base (recipe_store.json)")
        tensors = load_file(str(directory / "recipe_store.safetensors"))
        if tensors["prompts"].shape[1:] != self.prompts.shape[1:] or len(state["ids"]) != len(tensors["keys"]):
            raise KBenchError(f"{directory}: the saved RECIPE knowledge base does not fit this configuration")
        self.ids, self.decisions = list(state["ids"]), dict(state["decisions"])
        self.keys, self.prompts = tensors["keys"].to(self.lm.device), tensors["prompts"].to(self.lm.device)
        with torch.no_grad():  # of the module as restored now, whatever it was when this object was built
            self.sentinel_key = self.sentinel_rep()

    # ------------------------------------------------------------------ accounting
    def extra_storage_bytes(self) -> int:
        """The knowledge base (keys + prompts), the trained module and, when RECIPE fine-tuned it, the
        encoder (its own copy); a frozen encoder, shared with dense retrieval, is not counted."""
        stored = sum(t.numel() * t.element_size() for t in (self.keys, self.prompts))
        module = sum(t.numel() * t.element_size() for t in self.module.state_dict().values())
        if self.knobs["train_encoder"]:
            module += sum(t.numel() * t.element_size() for t in self.encoder.state_dict().values())
        return stored + module

    def info(self) -> dict[str, Any]:
        queries, accepted = self.decisions["queries"], self.decisions["accepted"]
        searched = queries - self.decisions["empty_store"]  # queries that met a non-empty knowledge base
        return {
            "prepare": self.prepare_info,
            "knowledge_base_entries": len(self.ids),
            "retrieval_query": self.retrieval_query,
            "retrieval": {
                "queries": queries, "empty_store": self.decisions["empty_store"], "accepted": accepted,
                "rejected_by_sentinel": searched - accepted,
                "rejection_rate": round((searched - accepted) / searched, 4) if searched else None,
            },
        }


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
