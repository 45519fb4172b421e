"""RECIPE's training objective and loop (the loss in the package docstring), run once in `prepare`.

`RecipeTraining` is the training half of `Recipe` (methods/recipe/method.py): it reads the method's `lm`,
`encoder`, `module`, `knobs`, `features` and `sentinel_rep`, and leaves the trained module in place.
After qizhou000/RECIPE `editors/recipe/recipe.py` (losses, hinges) and `train_recipe.py` (the loop).
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from core.training import train
from methods.recipe.edits import TrainingEdit

PROBE_EDITS = 100  # training edits the per-epoch retrieval diagnostics look at


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


class RecipeTraining:
    """The training methods of `Recipe` (a mixin: they share the method's encoder, module and knobs)."""

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
        """Train on held-out edits (the objective in the package docstring); returns the joint losses.
        Per step and per epoch diagnostics go to `self.curves` (edit losses, retrieval accuracy, sentinel
        rejection)."""
        knobs = self.knobs
        data = _TrainingData(edits, self.features, random.Random(knobs["seed"]), cached=not knobs["train_encoder"])
        if knobs["standardise"]:
            with torch.no_grad():
                sample = data.cache if data.cache is not None else data.text_features(
                    sorted({t for e in edits[:512] for t in (e.statement, e.prompt)}))
            self.module.feature_mean.copy_(sample.mean(0))
            self.module.feature_std.copy_(sample.std(0).clamp(min=1e-4))
        probe = list(edits[:PROBE_EDITS])
        steps_per_epoch = math.ceil(len(edits) / knobs["batch_size"])
        self.last_components: dict[str, float] = {}
        self.curves = {"steps": [], "epochs": []}
        weights = {"reliability": knobs["reliability_weight"], "generality": knobs["generality_weight"],
                   "locality_kl": knobs["locality_weight"]}

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
                return sum(weights.get(name, knobs["contrastive_weight"]) * value for name, value in parts.items()), 1

            losses = train(self.trained_parameters(not with_lm), list(edits), loss_fn, epochs=epochs, lr=knobs["lr"],
                           batch_size=knobs["batch_size"], weight_decay=knobs["weight_decay"],
                           max_grad_norm=knobs["max_grad_norm"], seed=knobs["seed"], desc=desc)
            self.curves["epochs"].append(self.probe_retrieval(probe, data) | {"phase": phase, "epoch": epochs})
            return losses

        self.module.requires_grad_(True)
        if knobs["train_encoder"]:
            self.encoder.requires_grad_(True)
            self.encoder.train()  # dropout on while training, as the reference's train mode
        try:
            # the contrastive terms alone need no LM forward (the earlier CPU variant runs many epochs of them first)
            self.retrieval_losses = run(knobs["retrieval_epochs"], False, "recipe prepare: retrieval")
            losses = run(knobs["epochs"], any(weights.values()), "recipe prepare: joint")
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
        knobs, module, rng = self.knobs, self.module, data.rng
        own = [e.statement for e in batch]
        taken = {data.statement_index[s] for s in own}
        negatives: list[str] = []
        if knobs["contrastive_negatives"]:
            others = [i for i in range(len(data.statements)) if i not in taken]
            negatives = [data.statements[i] for i in rng.sample(others, min(knobs["contrastive_negatives"], len(others)))]
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
            return knobs["temperature"] * module.similarity(module.query(data.text_features(texts)), candidates)

        sentinel = torch.zeros(len(batch), dtype=torch.long, device=device)
        # two different queries of each edit (its prompt and a rephrase), assigned at random
        picks = [rng.sample(q, 2) if len(q) > 1 else q * 2 for q in ([e.prompt, *e.rephrases] for e in batch)]
        first = logits([p[0] for p in picks]).masked_fill(twins, -1e4)
        q2k = F.cross_entropy(first, own_column)
        hidden_own = logits([p[1] for p in picks]).masked_fill(same, -1e4)
        q2s = _mean(*hinged_nll(hidden_own, sentinel, knobs["contrastive_hinge"]))
        rates = {"batch_retrieval": float((first.argmax(1) == own_column).float().mean()),
                 "batch_fallback": float((hidden_own.argmax(1) == 0).float().mean())}
        locality = data.locality_sample(batch, knobs["max_locality_per_edit"])
        loc2s = candidates.new_zeros(())
        if locality:
            rows = logits([p for _, p, _ in locality])
            loc2s = _mean(*hinged_nll(rows, sentinel.new_zeros(len(locality)), knobs["contrastive_hinge"]))
            rates["batch_rejection"] = float((rows.argmax(1) == 0).float().mean())
        return {"query_to_knowledge": q2k, "query_to_sentinel": q2s, "locality_to_sentinel": loc2s}, rates

    def edit_losses(self, batch: Sequence[TrainingEdit], keys: torch.Tensor, data: _TrainingData) -> dict[str, torch.Tensor]:
        """L_rel, L_gen and L_loc of one batch: each edit's own prompt on its edit prompt, one rephrase
        and its locality prompts, in one LM forward. With `edit_gradients=all` (reference) they train the
        representations and the encoder too; `prompt_generator` stops them at the prompt generator."""
        knobs, lm, rng = self.knobs, self.lm, data.rng
        prompts = self.module.prompts(keys if knobs["edit_gradients"] == "all" else keys.detach())
        rel = [(lm.prompt_ids(e.prompt), lm.encode(e.target), i) for i, e in enumerate(batch)]
        gen = [(lm.prompt_ids(rng.choice(e.rephrases)), lm.encode(e.target), i) for i, e in enumerate(batch) if e.rephrases]
        loc = [(lm.prompt_ids(p), lm.encode(c), i) for i, p, c in data.locality_sample(batch, knobs["max_locality_per_edit"])]
        rows = rel + gen + loc
        vbatch = lm.collate_with_vectors([(x, y) for x, y, _ in rows], [prompts[i] for _, _, i in rows])
        logits = lm.target_logits_with_vectors(vbatch)
        lengths = vbatch.predicted_mask.sum(1).tolist()
        n_rel, n_gen = sum(lengths[: len(rel)]), sum(lengths[len(rel) : len(rel) + len(gen)])
        targets = vbatch.target_ids.to(logits.device)  # logits live on the output head's device
        parts = {
            "reliability": _mean(*hinged_nll(logits[:n_rel], targets[:n_rel], knobs["edit_hinge"])),
            "generality": _mean(*hinged_nll(logits[n_rel : n_rel + n_gen], targets[n_rel : n_rel + n_gen], knobs["edit_hinge"])),
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
