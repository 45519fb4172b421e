"""The method interface, and the two reference methods: `base` (no context) and `context` (upper bound).

A method gets knowledge through `inject`, answers queries (`answer`: generation; `loglikelihood`:
teacher-forced log-likelihood of a target), can be `reset` to the untouched model, and reports the
storage it needs beside the base model. Built by Hydra from `conf/method/<name>.yaml` with the
shared `LM` passed in at run time.

`loglikelihood_unaugmented` scores a target through the model *as served* (the weights with whatever adapters or
edits injection put into them) but without the method's prompt augmentation: no retrieved passages,
no gold context, no continuous prompt. Probe sets with `output_type="loglikelihood_bare"` use it (the
drift probes of docs/side_effects.md: perplexity of generic text), so a method that leaves the weights
alone scores exactly like the untouched model there. The default is the bare LM, which is right for
every method whose knowledge lives in the weights or outside the model; override it only if the model
a user is served differs from `self.lm` for plain text (say so in the method's docstring).

Optional, for resumable runs: `save_state(directory)` / `load_state(directory)` write and restore what
injection changed, so a run killed after step k continues at step k+1 (docs/sweeps.md). A method that
does not implement them still works; a killed run of it restarts from its first step.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

from core.lm import LM
from core.types import Answer, GenerationSpec, KBenchError, Knowledge, Query, TargetScore


def edit_pairs(item: Knowledge, answer_marker: str, method: str) -> list[tuple[str, str]]:
    """The (prompt, target) pairs an editor writes for one piece of knowledge: its structured edit
    (`Knowledge.edit`), else each QA training sentence split at its last `answer_marker`
    ("Question: q\nAnswer:" | " a"). Raises KBenchError naming the knowledge and sentence that have neither,
    and for an edit left in `meta["prompt"]` / `meta["target"]` (the contract before `EditSpec`)."""
    if item.edit is not None:
        return [(item.edit.prompt, item.edit.target)]
    if "prompt" in item.meta and "target" in item.meta:
        raise KBenchError(
            f"method={method}: knowledge {item.id!r} carries its edit in meta['prompt'] / meta['target']; a task "
            "now passes it as Knowledge(edit=EditSpec(prompt=..., target=..., ...)) (core/types.py)"
        )
    pairs = []
    for sentence in item.train_sentences:
        head, marker, tail = sentence.rpartition(answer_marker)
        if not marker or not tail.strip():
            raise KBenchError(
                f"method={method} edits (prompt, target) pairs: knowledge {item.id!r} has no structured edit in its meta "
                f"and its training sentence {sentence!r} has no answer after {answer_marker!r} "
                "(set method.answer_marker, or use task=editing)"
            )
        pairs.append((head + marker, tail.rstrip("\n")))
    if not pairs:
        raise KBenchError(f"method={method}: knowledge {item.id!r} carries neither a structured edit nor QA sentences")
    return pairs


#: methods of the earlier interface -> their names now (lm-evaluation-harness's words; docs/adding_a_method.md)
RENAMED = {"score": "loglikelihood", "score_bare": "loglikelihood_unaugmented"}


class Method:
    """Base class of every method plugin. Subclasses override what their idea changes."""

    name = "method"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """Refuse a subclass written to the earlier interface: its `score` would never be called (the runner
        calls `loglikelihood`), so its log-likelihood probes would silently measure the untouched model.
        Raises KBenchError naming the method to implement instead."""
        super().__init_subclass__(**kwargs)
        for old, new in RENAMED.items():
            if old in vars(cls):
                raise KBenchError(
                    f"{cls.__module__}.{cls.__qualname__} defines `{old}`, which kbench no longer calls: rename it "
                    f"to `{new}` (same arguments and return value; docs/adding_a_method.md)"
                )

    #: knob -> its value in the method's reference implementation (the paper's code). Every knob set
    #: otherwise is a deviation: `reference_deviations` lists it and the runner appends it to every
    #: metric's protocol, so a table never mixes a method with a variant of it silently.
    reference: ClassVar[dict[str, Any]] = {}

    def __init__(self, lm: LM) -> None:
        self.lm = lm

    def reference_deviations(self) -> dict[str, str]:
        """`{knob: "value (reference: r)"}` for every knob of `reference` whose value differs, read from
        `self.<knob>` (override when a knob lives elsewhere). Empty for a method run as its reference."""
        return {
            knob: f"{getattr(self, knob)!r} (reference: {ref!r})"
            for knob, ref in self.reference.items()
            if getattr(self, knob) != ref
        }

    def prepare(self, training_knowledge: Sequence[Knowledge]) -> None:
        """Train once before any injection on the task's held-out split (`Task.training_knowledge`).
        Called even when the split is empty. Default: nothing to prepare."""

    def inject(self, knowledge: Sequence[Knowledge]) -> None:
        """Take in new knowledge. Default: ignore it (the model is left untouched)."""

    def prompt_ids(self, query: Query) -> list[int]:
        """Tokens the model sees for `query`. Default: the prompt alone."""
        return self.lm.prompt_ids(query.prompt)

    def answer(self, queries: Sequence[Query], generation: GenerationSpec) -> list[Answer]:
        texts = self.lm.generate_until([self.prompt_ids(q) for q in queries], generation)
        return [Answer(text) for text in texts]

    def loglikelihood(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        """Log-probability and token accuracy of each target continuation (e.g. " Paris") of its query."""
        return self.lm.loglikelihood([(self.prompt_ids(q), self.lm.encode(t)) for q, t in zip(queries, targets)])

    def loglikelihood_unaugmented(self, queries: Sequence[Query], targets: Sequence[str]) -> list[TargetScore]:
        """Like `loglikelihood`, through the model as served but without the method's prompt augmentation (module
        docstring): start tokens + `query.prompt` + target, or start tokens + target for an empty prompt
        (plain text, also for chat models). `Query.context` is ignored."""
        return self.lm.loglikelihood([
            (self.lm.prompt_ids(q.prompt) if q.prompt else list(self.lm.start_ids), self.lm.encode(t))
            for q, t in zip(queries, targets)
        ])

    def reset(self) -> None:
        """Forget everything injected so far. Default: nothing to forget."""

    def extra_storage_bytes(self) -> int:
        """Bytes stored beside the base model to serve what was injected (adapters, indexes, text)."""
        return 0

    def info(self) -> dict[str, Any]:
        """Facts about the method's state worth recording (e.g. whether an adapter was merged). Called
        after every step (divergence checks): keep it cheap; heavier diagnostics go in `report`."""
        return {}

    def report(self, output_dir: Path) -> dict[str, Any]:
        """Diagnostics of the finished run written beside its record (plots, per-probe numbers), once
        after the last step; returns what to record (`method_info.report`, with the file names under
        `files`). Default: nothing."""
        return {}

    # ------------------------------------------------------------------ resumable runs (optional)
    def save_state(self, directory: Path) -> bool:
        """Write everything `inject` changed since the last `reset` into the empty folder `directory`,
        so a killed run can continue after its last complete step in a new process (`load_state`).
        Tensors as safetensors, the rest as JSON; never pickles. Return False when the method cannot
        (this default): a killed run then restarts from its first step, and its record says so.
        The runner asks only before a step without `reset_before`; after a reset nothing is needed."""
        return False

    def load_state(self, directory: Path) -> None:
        """Restore what `save_state` wrote, into a freshly built method whose `prepare` has already run."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore a saved state (its save_state returns False)")


class BaseMethod(Method):
    """`method=base`: the untouched model answering without any context (the floor)."""

    name = "base"

    def save_state(self, directory: Path) -> bool:
        return True  # injection changes nothing: there is no state to save

    def load_state(self, directory: Path) -> None:
        pass


class ContextMethod(Method):
    """`method=context`: the untouched model with the probe's own gold context in the prompt.

    The upper bound of every injection method: it reads the context at question time instead of
    storing it. It uses `Query.context`, which only reference methods may read.
    """

    name = "context"

    def save_state(self, directory: Path) -> bool:
        return True  # reads the gold context at question time: injection changes nothing

    def load_state(self, directory: Path) -> None:
        pass

    def prompt_ids(self, query: Query) -> list[int]:
        if query.context is None:
            raise ValueError(f"query {query.id!r} carries no context; method=context needs one per probe")
        return self.lm.prompt_ids(query.prompt, context=query.context)
