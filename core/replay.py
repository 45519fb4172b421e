"""Replaying the frozen decoder layers below an edited module, shared by the editors that train one
module's values against a fixed batch (GRACE, WISE): the layers below never see the edit, so their
output is computed once per edit and each training iteration runs only the layers from the module up.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from core.lm import relative_gap
from core.types import KBenchError

class FrozenPrefix:
    """Replays, for one fixed batch, the output of the decoder layers below `index`: they are frozen and do not
    see the edited module, so an edit's training loop computes them once (first `replay`) and afterwards runs
    only the layers from `index` up (the others return their input, the last of them the stored output).
    `check=True` compares the second pass with a full forward once and raises if they differ."""

    def __init__(self, layers: torch.nn.ModuleList, index: int, check: bool = False) -> None:
        self.layers, self.index, self.check = layers, index, check
        self.cached: torch.Tensor | None = None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        if self.index == 0:
            yield
            return
        last = self.layers[self.index - 1]
        if self.cached is None:
            def keep(module: torch.nn.Module, args: tuple, output: Any) -> None:
                self.cached = (output[0] if isinstance(output, tuple) else output).detach()
            handle = last.register_forward_hook(keep)
            try:
                yield
            finally:
                handle.remove()
            return
        passthrough = lambda *args, **kwargs: args[0] if args else kwargs["hidden_states"]  # noqa: E731
        for layer in self.layers[: self.index - 1]:
            layer.forward = passthrough
        last.forward = lambda *args, **kwargs: self.cached
        try:
            yield
        finally:
            for layer in self.layers[: self.index]:
                del layer.forward  # back to the class's forward

    def verified(self, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """`compute()` under `replay`; the first replayed pass is checked once against a full forward (run
        first, without gradients, so whatever hooks record during the replayed pass stays the last word)."""
        full = None
        if self.check and self.index and self.cached is not None:
            self.check = False
            with torch.no_grad():
                full = compute().float()
        with self.replay():
            result = compute()
        if full is not None:
            gap = relative_gap(result.detach().float(), full)
            if gap > 1e-3:
                raise KBenchError(f"replaying the frozen layers below {self.index} changes the logits by {gap:.2e} "
                                  f"(relative) on {type(self.layers[0]).__name__}: this model family's decoder layers "
                                  "do not take and return the hidden states as kbench assumes")
        return result


