"""Fine-tuning baselines: FT(C) trains on the context text, FT(S) on target sentences about it.

Both minimise the causal-LM loss  L(θ') = − Σ_t log P_θ'(y_t | y_<t)  over the tokens y of their
training text, through a LoRA adapter (peft) or the full weights (`update.mode=full`); a step's loss is the
mean over its tokens (`loss_average: token`) or the mean of each sentence's token mean (`sentence`).
- FT(C) (`method=ft_context`): the context itself, split into chunks of at most `chunk_tokens`.
- FT(S) (`method=ft_sentences`): the target sentences ("Question: ...\\nAnswer: ...\\n") from the
  configured sentence source, each sequence = start tokens + sentence, loss on every sentence token.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from core.options import as_dict, validate
from core.training import UpdateOptions, WeightUpdate, reduce_loss, train
from core.types import Knowledge, NonNegativeFloat, PositiveFloat, PositiveInt
from methods.base import Method
from methods.sentences import SentenceSource

Pair = tuple[list[int], list[int]]


class FineTuneMethod(Method):
    """Shared machinery of every method that trains the LM on examples derived from the knowledge
    (FT(C), FT(S), SELF-PARAM): the weight update, the loop, merge, reset, storage and saved state.
    Subclasses say which examples to train on (`training_examples`) and with what loss (`loss`)."""

    def __init__(
        self,
        lm,
        update: UpdateOptions = UpdateOptions(),
        lr: PositiveFloat = 1e-3,
        epochs: PositiveInt = 5,  # 0 would "inject" nothing and still report an adapter's storage
        batch_size: PositiveInt = 4,
        grad_accum: PositiveInt = 1,
        weight_decay: NonNegativeFloat = 0.0,
        max_grad_norm: NonNegativeFloat = 1.0,  # 0 = no clipping
        merge: bool = False,
        seed: int = 0,
        loss_average: Literal["token", "sentence"] = "token",
    ) -> None:
        super().__init__(lm)
        # Hydra passes the option group as a dict, a direct caller may pass UpdateOptions: validated either
        # way, at every depth (a misspelled key is refused and named, never ignored)
        update = validate(UpdateOptions, as_dict(update), "method.update")
        self.weights = WeightUpdate(lm, mode=update.mode, lora=update.lora, seed=seed)
        self.lr, self.epochs, self.batch_size, self.grad_accum = lr, epochs, batch_size, grad_accum
        self.weight_decay, self.max_grad_norm, self.merge, self.seed = weight_decay, max_grad_norm, merge, seed
        self.loss_average = loss_average
        self.losses: list[float] = []

    def training_examples(self, knowledge: Sequence[Knowledge]) -> list[Any]:
        """What to train on; called before the update starts (the model is still as before injection)."""
        raise NotImplementedError

    def example_groups(self, examples: list[Any]) -> list[int] | None:
        """Examples that must be trained on back to back (`core.training.shuffled_batches`); None: none."""
        return None

    def loss(self, examples: list[Any]) -> tuple[torch.Tensor, int]:
        """Summed loss over a mini-batch of examples and what it is averaged over (`reduce_loss`).
        Default: the causal-LM cross-entropy on (prefix, target) id pairs."""
        batch = self.lm.collate(examples)
        logits = self.lm.target_logits(batch)  # on the output head's device, maybe not the inputs'
        targets = batch.target_ids.to(logits.device)
        return reduce_loss(F.cross_entropy(logits, targets, reduction="none"), batch.target_lengths, self.loss_average)

    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        examples = self.training_examples(knowledge)
        params = self.weights.begin()
        try:
            self.losses = train(
                params, examples, self.loss, epochs=self.epochs, lr=self.lr, batch_size=self.batch_size,
                grad_accum=self.grad_accum, weight_decay=self.weight_decay, max_grad_norm=self.max_grad_norm,
                seed=self.seed, desc=f"inject {self.name}", groups=self.example_groups(examples),
            )
        finally:
            self.weights.end()
        if self.merge:
            self.weights.merge()

    def reset(self) -> None:
        self.weights.reset()

    def extra_storage_bytes(self) -> int:
        return self.weights.extra_storage_bytes()

    def save_state(self, directory: Path) -> bool:
        self.weights.save(directory)
        (Path(directory) / "finetune.json").write_text(json.dumps({"losses": self.losses}) + "\n")
        return True

    def load_state(self, directory: Path) -> None:
        self.weights.load(directory)
        self.losses = json.loads((Path(directory) / "finetune.json").read_text())["losses"]

    def info(self) -> dict[str, Any]:
        return {
            "update_mode": self.weights.mode,
            "merged": self.weights.merged,
            "final_train_loss": self.losses[-1] if self.losses else None,
        }


class FineTuneContext(FineTuneMethod):
    """`method=ft_context`: FT(C), language modelling on the context."""

    name = "ft_context"

    def __init__(self, lm, chunk_tokens: PositiveInt = 256, **knobs) -> None:
        super().__init__(lm, **knobs)
        self.chunk_tokens = chunk_tokens

    def training_examples(self, knowledge: Sequence[Knowledge]) -> list[Pair]:
        pairs = []
        for item in knowledge:
            ids = self.lm.encode(item.context)
            pairs += [(self.lm.start_ids, ids[i : i + self.chunk_tokens]) for i in range(0, len(ids), self.chunk_tokens)]
        return pairs


class FineTuneSentences(FineTuneMethod):
    """`method=ft_sentences`: FT(S), language modelling on target sentences about the context."""

    name = "ft_sentences"

    def __init__(self, lm, sentences: SentenceSource, epochs: PositiveInt = 1, **knobs) -> None:
        # epochs 1: each unique pair once, as SELF-PARAM (conf/method/ft_sentences.yaml)
        super().__init__(lm, epochs=epochs, **knobs)
        self.sentences = sentences

    def training_examples(self, knowledge: Sequence[Knowledge]) -> list[Pair]:
        return [(self.lm.start_ids, self.lm.encode(s)) for item in knowledge for s in self.sentences(item, self.lm)]
