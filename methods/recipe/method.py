"""`Recipe`: the method as the runner sees it: the knowledge base of continuous prompts, retrieval above
the sentinel, answering and scoring through the LM (the package docstring has the paper and the reference)."""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from core.encoder import load_sentence_encoder
from core.cache import Tensors, cache_entry, disk_cached, write_tensors
from core.io import atomic_write_json, read_json, stable_hash
from core.lm import LM
from core.options import ConfigError, checked
from core.progress import progress
from core.types import (
    RETRIEVED_KNOWLEDGE_IDS, Answer, GenerationSpec, KBenchError, Knowledge, NonNegativeFloat, NonNegativeInt,
    PositiveFloat, PositiveInt, Query, TargetScore,
)
from methods.base import Method
from methods.recipe.curves import save_curves
from methods.recipe.edits import TrainingEdit, training_edits
from methods.recipe.module import RecipeModule, pooled_features
from methods.recipe.storage import FORMAT, module_file, read_module, split_module
from methods.recipe.training import RecipeTraining

log = logging.getLogger(__name__)

REFERENCE_ENCODER = "roberta-base"


def is_reference_encoder(name: str) -> bool:
    """True for the reference's encoder: RoBERTa-base by hub id or as a local folder of that name."""
    return name.rstrip("/").split("/")[-1].lower() == REFERENCE_ENCODER



class Recipe(RecipeTraining, Method):
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
        lr: PositiveFloat = 1e-4,  # the CPU default (conf/method/recipe.yaml); `reference`: 1e-5
        epochs: NonNegativeInt = 1,  # reference: 1000
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
                rows.append(pooled_features(out["token_embeddings"], out["attention_mask"], out["sentence_embedding"]))
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
        return module.knowledge(pooled_features(states, mask, pooled["sentence_embedding"]).float().to(self.lm.device))

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
        key, trained_now = self.identity(edits), []

        def train_module() -> Tensors:
            trained_now.append(True)
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
            return self.saved_module()

        saved = disk_cached("recipe", key, train_module, what="a trained RECIPE module", format="safetensors",
                            enabled=self.cache)
        path = cache_entry("recipe", key, "safetensors")
        if not trained_now:
            self.restore(path, saved)
            self.prepare_info = {"source": "cache", "path": str(path)} | self._saved_facts
            log.info("recipe: loaded the module trained earlier on the same data and knobs from %s", path)
        elif self.cache:
            self.prepare_info["path"] = str(path)
            self.prepare_info["curves"] = str(save_curves(self.curves, path.with_suffix("")))

    def identity(self, edits: Sequence[TrainingEdit]) -> str:
        """Hash of everything that determines the trained module."""
        return stable_hash({
            "format": FORMAT, "model": self.lm.name, "hidden": self.lm.hidden_size, "encoder": self.encoder_name,
            "knobs": self.knobs, "edits": [vars(e) for e in edits],
        })


    # ------------------------------------------------------------------ saving the trained module
    def saved_module(self) -> Tensors:
        """The trained module (and the encoder, when trained) with metadata recording what it was trained for."""
        tensors = dict(self.module.state_dict())
        if self.knobs["train_encoder"]:
            tensors |= {f"encoder.{n}": t for n, t in self.encoder.state_dict().items()}
        return module_file(tensors, {
            "model": self.lm.name, "encoder": self.encoder_name, "shapes": json.dumps(self._shapes()),
            "knobs": json.dumps(self.knobs), "prepare": json.dumps({k: v for k, v in self.prepare_info.items() if k != "epochs"}),
        })

    def save(self, path: str | Path) -> None:
        """Write the trained module as safetensors (`saved_module`), for `method.checkpoint`."""
        write_tensors(path, *self.saved_module())

    def load(self, path: str | Path) -> None:
        """Load a module saved by `save`; it must fit this LM's hidden size and these knobs' shapes."""
        self.restore(path, read_module(path))

    def restore(self, path: str | Path, saved: Tensors) -> None:
        """Put a module read from `path` in place (see `split_module` for what is refused)."""
        module, encoder = split_module(path, saved, self._shapes())
        self.module.load_state_dict({n: t.to(self.lm.device) for n, t in module.items()})
        if encoder:
            self.encoder.load_state_dict({n: t.to(self.encoder.device) for n, t in encoder.items()})
        metadata = saved[1]
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
            for i, text in zip(plain, self.lm.generate_until([self.prompt_ids(queries[i]) for i in plain], generation)):
                texts[i] = text
        if edited:
            vectors = [self.prompts[decisions[i]["index"]] for i in edited]
            out = self.lm.generate_until_with_vectors([self.prompt_ids(queries[i]) for i in edited], vectors, generation)
            for i, text in zip(edited, out):
                texts[i] = text
        return [Answer(text, meta=self._meta(d)) for text, d in zip(texts, decisions)]

    def loglikelihood(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        decisions = self.retrieve(queries, targets)
        pairs = [(self.prompt_ids(q), self.lm.encode(t)) for q, t in zip(queries, targets)]
        scores: list[TargetScore | None] = [None] * len(queries)
        plain = [i for i, d in enumerate(decisions) if d["index"] is None]
        edited = [i for i, d in enumerate(decisions) if d["index"] is not None]
        if plain:
            for i, s in zip(plain, self.lm.loglikelihood([pairs[i] for i in plain])):
                scores[i] = s
        if edited:
            vectors = [self.prompts[decisions[i]["index"]] for i in edited]
            for i, s in zip(edited, self.lm.loglikelihood_with_vectors([pairs[i] for i in edited], vectors)):
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
