"""Weight-update plumbing shared by every method that trains the LM (FT(C), FT(S), SELF-PARAM, ...).

`WeightUpdate` owns *which* weights change (a peft LoRA adapter or the full model), how they are
restored on `reset()`, merged, counted as extra storage, and saved / loaded (`save` / `load`: safetensors,
for resumable runs). `train()` is the one optimisation loop:
seeded shuffling, mini-batches, gradient accumulation, clipping, and a hard stop on a non-finite loss.
A method supplies only its examples and its loss.
"""
from __future__ import annotations

import contextlib
import json
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from pydantic import Field
from safetensors.torch import load_file, save_file

from core.lm import LM
from core.options import as_dict, validate
from core.progress import progress
from core.types import NonEmptyStr, NonFiniteLossError, Options, PositiveInt

T = TypeVar("T")

# peft calls a transformers API deprecated in v5; the warning is not actionable for kbench users
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)


class LoraOptions(Options):
    """`method.update.lora`: the LoRA adapter (peft's names: r, lora_alpha, lora_dropout, target_modules).

    `target_modules` takes every form peft accepts: module names (`q_proj`), dotted suffixes
    (`self_attn.q_proj`), full names, a regex string matched against the full name, or `all-linear`."""

    r: PositiveInt = 8
    alpha: PositiveInt = 32
    # SELF-PARAM's reference adapter, shared by FT(C) / FT(S) / SELF-PARAM so they compare like for like
    # (the values conf/method/{ft_context,ft_sentences,selfparam}.yaml give; tests/test_configs.py checks)
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1
    target_modules: Annotated[list[NonEmptyStr], Field(min_length=1)] | NonEmptyStr = [
        "q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


class UpdateOptions(Options):
    """`method.update`: which weights an injection trains."""

    mode: Literal["lora", "full"] = "lora"
    lora: LoraOptions = LoraOptions()


class WeightUpdate:
    """The trainable part of an LM: a LoRA adapter (`mode="lora"`) or every weight (`mode="full"`).

    The adapter is attached lazily on the first `begin()` and kept across injections until `reset()`,
    so sequential injection continues from the current weights. `merge()` folds the adapter into the
    base weights (extra storage 0); `reset()` restores the original weights in every mode.
    """

    def __init__(self, lm: LM, mode: str = "lora", lora: dict[str, Any] | LoraOptions | None = None, seed: int = 0) -> None:
        options = validate(UpdateOptions, {"mode": mode, "lora": as_dict(lora)}, "method.update")
        self.lm, self.mode, self.seed = lm, options.mode, seed
        self.lora = options.lora.model_dump()  # a plain dict: saved in update.json and compared on load
        self._original: dict[str, torch.Tensor] | None = None  # snapshot for reset when base weights change
        self.merged = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def has_adapter(self) -> bool:
        return hasattr(self.lm.model, "peft_config")

    def begin(self) -> list[torch.nn.Parameter]:
        """Make the update's weights trainable and return them."""
        if self.mode == "full":
            self._snapshot(lambda name, param: True)
            for param in self.lm.model.parameters():
                param.requires_grad_(True)
            self.lm.model.train()
            return list(self.lm.model.parameters())
        if not self.has_adapter:
            self._attach_adapter()
        self.lm.model.train()  # LoRA dropout is active only in training mode
        return [p for p in self.lm.model.parameters() if p.requires_grad]

    def _attach_adapter(self) -> None:
        torch.manual_seed(self.seed)  # LoRA's A is random; B starts at zero so the model is unchanged
        config = LoraConfig(
            r=self.lora["r"],
            lora_alpha=self.lora["alpha"],
            lora_dropout=self.lora["dropout"],
            target_modules=_peft_targets(self.lora["target_modules"]),
            task_type="CAUSAL_LM",
        )
        self.lm.model = get_peft_model(self.lm.model, config)
        # the adapter trains in fp32 whatever the base weights' dtype (bf16 on GPU): AdamW's small steps
        # would round away in bf16 (peft already upcasts by default; this makes it a guarantee)
        for name, param in self.lm.model.named_parameters():
            if "lora_" in name and param.dtype != torch.float32:
                param.data = param.data.float()

    def end(self) -> None:
        self.lm.model.eval()
        if self.mode == "full":
            for param in self.lm.model.parameters():
                param.requires_grad_(False)

    def merge(self) -> None:
        """Fold the adapter into the base weights; the next `begin()` starts a fresh adapter on top."""
        if self.mode != "lora" or not self.has_adapter:
            return
        # Snapshot exactly the layers peft wrapped, whatever form `target_modules` took (a suffix such as
        # `self_attn.q_proj`, a regex, `all-linear`): matching the config's names here again missed
        # suffix forms, and reset() then left merged weights in place.
        base = self.lm.model.get_base_model()
        # By tensor, not by name: a tied weight (lm_head = embed_tokens) is listed once, under either name.
        wrapped = {id(p) for module in base.modules() if isinstance(module, BaseTunerLayer)
                   for p in module.get_base_layer().parameters()}
        self._snapshot(lambda name, param: id(param) in wrapped, source=base)
        self.lm.model = self.lm.model.merge_and_unload()
        self.merged = True

    def reset(self) -> None:
        """Back to the original weights: drop the adapter and restore anything that was overwritten."""
        if self.has_adapter:
            self.lm.model = self.lm.model.unload()
        if self._original is not None:
            params = dict(self.lm.model.named_parameters(remove_duplicate=False))  # tied weights by every name
            with torch.no_grad():
                for name, value in self._original.items():
                    params[name].copy_(value)
        self.merged = False
        self.lm.model.eval()

    def extra_storage_bytes(self) -> int:
        """Bytes that must be stored beside the base model to serve it: the unmerged adapter, else 0."""
        if not self.has_adapter:
            return 0
        return sum(p.numel() * p.element_size() for n, p in self.lm.model.named_parameters() if "lora_" in n)

    # ------------------------------------------------------------------ saving (resumable runs)
    def save(self, directory: Path) -> None:
        """Write what differs from the original model into `directory`: the base weights that training
        or a merge may have changed (`base_weights.safetensors`), the live adapter (`adapter.safetensors`)
        and the flags (`update.json`). `load` on a fresh `WeightUpdate` of the same LM restores them."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if self._original is not None:
            current = self._base_parameters()
            save_file({name: current[name].detach().to("cpu").contiguous() for name in self._original},
                      str(directory / "base_weights.safetensors"))
        if self.has_adapter:
            adapter = {n: p.detach().to("cpu").contiguous() for n, p in self.lm.model.named_parameters() if "lora_" in n}
            save_file(adapter, str(directory / "adapter.safetensors"))
        flags = {"mode": self.mode, "merged": self.merged, "lora": self.lora, "adapter": self.has_adapter}
        (directory / "update.json").write_text(json.dumps(flags, indent=2) + "\n")

    def load(self, directory: Path) -> None:
        """Restore what `save` wrote; `reset()` still returns to the original weights afterwards."""
        directory = Path(directory)
        flags = json.loads((directory / "update.json").read_text())
        if flags["mode"] != self.mode or (flags["adapter"] and flags["lora"] != self.lora):
            raise ValueError(f"saved weight update in {directory} was made with mode={flags['mode']!r}, "
                             f"lora={flags['lora']}; this run has mode={self.mode!r}, lora={self.lora}")
        if self.has_adapter:
            raise RuntimeError("load() needs an LM without an adapter: call it on a freshly built method")
        base_file = directory / "base_weights.safetensors"
        if base_file.is_file():
            saved = load_file(str(base_file))
            self._snapshot(lambda name, param: name in saved)  # so reset() can undo the loaded change
            params = self._base_parameters()
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
        if flags["adapter"]:
            self._attach_adapter()
            saved = load_file(str(directory / "adapter.safetensors"))
            params = {n: p for n, p in self.lm.model.named_parameters() if "lora_" in n}
            if set(saved) != set(params):
                raise ValueError(f"saved adapter in {directory} does not fit this model's LoRA layers")
            with torch.no_grad():
                for name, value in saved.items():
                    params[name].copy_(value)
        self.merged = flags["merged"]
        self.lm.model.eval()

    def _base_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The model's own (non-adapter) weights, named as without an adapter."""
        module = self.lm.model.get_base_model() if self.has_adapter else self.lm.model
        return {n.replace(".base_layer", ""): p for n, p in module.named_parameters(remove_duplicate=False) if "lora_" not in n}

    def teacher_mode(self, use_base: bool) -> contextlib.AbstractContextManager:
        """Context in which the LM acts as teacher: the base weights (adapter off) or the current model."""
        if use_base and self.has_adapter:
            return self.lm.model.disable_adapter()
        return contextlib.nullcontext()

    def _snapshot(self, keep: Callable[[str, torch.nn.Parameter], bool], source: torch.nn.Module | None = None) -> None:
        """Add the original value of every kept weight not saved yet. Additive, not first-call-only: a
        later merge may touch layers an earlier one did not; a weight already saved keeps its first
        (original) value, and one not saved yet was untouched until now."""
        module = source if source is not None else self.lm.model
        saved = self._original if self._original is not None else {}
        for name, p in module.named_parameters():
            plain = name.replace(".base_layer", "")
            if "lora_" not in name and plain not in saved and keep(plain, p):
                saved[plain] = p.detach().to("cpu", copy=True)
        self._original = saved


def _peft_targets(targets: list[str] | str) -> list[str] | str:
    """peft's own forms: a list of names / suffixes, or one string (a regex, or `all-linear`)."""
    return targets if isinstance(targets, str) else list(targets)


def fp32_masters(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor | None]:
    """An fp32 master copy of every trainable parameter stored in lower precision (full fine-tuning of
    a bf16 model), None for fp32 ones: the optimiser updates the masters, and the model's weights get
    the rounded result after each step, so updates far below bf16's resolution still accumulate."""
    return [None if p.dtype == torch.float32 else p.detach().float().clone().requires_grad_(True) for p in params]


def shuffled_batches(
    items: Sequence[T], batch_size: int, generator: torch.Generator, groups: Sequence[int] | None = None
) -> Iterator[list[T]]:
    """Mini-batches of `items` in a seeded random order. With `groups` (one id per item) the *groups* are
    shuffled and the items of one group stay adjacent, in their given order (SELF-PARAM's reference takes
    a QA step, then its continuation step, then a regularisation step)."""
    if groups is None:
        order = torch.randperm(len(items), generator=generator).tolist()
    else:
        members: dict[int, list[int]] = {}
        for index, group in enumerate(groups):
            members.setdefault(group, []).append(index)
        keys = list(members)
        order = [i for g in torch.randperm(len(keys), generator=generator).tolist() for i in members[keys[g]]]
    for start in range(0, len(order), batch_size):
        yield [items[i] for i in order[start : start + batch_size]]


def reduce_loss(per_token: torch.Tensor, lengths: Sequence[int], per: Literal["token", "sentence"]) -> tuple[torch.Tensor, int]:
    """(summed loss, count) for `train`, which divides the one by the other over a step: `token` pools
    every target token of the step; `sentence` averages within each sentence first, so a long text and a
    short one weigh the same (the SELF-PARAM reference: one sentence per step, mean over its tokens)."""
    if per == "token":
        return per_token.sum(), per_token.numel()
    means = torch.stack([part.mean() for part in per_token.split(list(lengths))])
    return means.sum(), len(lengths)


def train(
    params: Sequence[torch.nn.Parameter],
    examples: Sequence[T],
    loss_fn: Callable[[list[T]], tuple[torch.Tensor, int]],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    grad_accum: int = 1,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = 1.0,
    seed: int = 0,
    desc: str = "train",
    groups: Sequence[int] | None = None,
) -> list[float]:
    """Minimise the per-token mean of `loss_fn` over `examples`; returns the loss of every optimiser step.

    `loss_fn(batch)` returns (summed loss over the batch's target tokens, number of target tokens), so
    accumulation over `grad_accum` mini-batches averages over tokens exactly as one big batch would
    (or summed per-sentence means and the sentence count: `reduce_loss`). `groups`: see `shuffled_batches`.
    """
    if not examples:
        raise ValueError("nothing to train on: the example list is empty")
    # dropout draws from torch's global generators: seeded here (inside a fork, so nothing outside sees it),
    # its masks depend on `seed` alone, not on what ran before, and a run resumed after step k trains
    # exactly like the uninterrupted one
    devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return _train(params, examples, loss_fn, epochs=epochs, lr=lr, batch_size=batch_size, grad_accum=grad_accum,
                      weight_decay=weight_decay, max_grad_norm=max_grad_norm, seed=seed, desc=desc, groups=groups)


def _train(params, examples, loss_fn, *, epochs, lr, batch_size, grad_accum, weight_decay, max_grad_norm, seed, desc,
           groups) -> list[float]:
    masters = fp32_masters(params)  # optimiser state and updates in fp32 (trainable pieces are fp32 already)
    optimised = [p if m is None else m for p, m in zip(params, masters)]
    optimizer = torch.optim.AdamW(optimised, lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(math.ceil(len(examples) / batch_size) / grad_accum)
    history: list[float] = []
    bar = progress(total=epochs * steps_per_epoch, desc=desc)
    for _ in range(epochs):
        batches = list(shuffled_batches(examples, batch_size, generator, groups))
        for start in range(0, len(batches), grad_accum):
            total, n_tokens = 0.0, 0
            for batch in batches[start : start + grad_accum]:
                loss, n = loss_fn(batch)
                loss.backward()  # summed loss: dividing the gradients by the token count below is exact
                total = total + loss.detach()  # stays on the device: no host sync per micro-batch
                n_tokens += n
            mean = float(total) / max(n_tokens, 1)  # the one sync of a step: the value logged for it
            if not math.isfinite(mean):
                optimizer.zero_grad(set_to_none=True)
                for param in params:
                    param.grad = None
                raise NonFiniteLossError(
                    f"{desc}: loss became {mean} at optimiser step {len(history) + 1}; injection stopped. "
                    "Lower the learning rate or check the data."
                )
            for param, master in zip(params, masters):
                if param.grad is None:
                    continue
                if master is None:
                    param.grad /= n_tokens
                else:  # the gradient moves to the fp32 master
                    master.grad, param.grad = param.grad.float() / n_tokens, None
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_(optimised, max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            with torch.no_grad():
                for param, master in zip(params, masters):
                    if master is not None:
                        param.copy_(master)
            history.append(mean)
            bar.update(1)
            bar.set_postfix(loss=f"{mean:.4f}")
    bar.close()
    return history
