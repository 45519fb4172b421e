"""The few value types that cross the method / task boundary.

A task turns its data into `Knowledge` (what gets injected) and `ProbeSet`s (what gets asked after an
injection step). A method consumes `Knowledge` and answers `Query`s. Nothing else is shared.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Bounded config knobs. `runners.build` checks every parameter hinted with these before anything is
# built and names the key and the bound when a value falls outside (task.limit=-1, method.epochs=0).
PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]
NonEmptyStr = Annotated[str, Field(min_length=1)]


class Options(BaseModel):
    """A nested option group of a config node (`method.update`, `method.update.lora`, ...).

    Unknown keys are refused rather than ignored: a misspelled `+method.update.lora.rank=2` must fail
    before the model loads, not run with the default rank while the record claims 2."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# The answer-meta key under which a method that looks knowledge up (RAG's passages, RECIPE's prompt, MEMOIR's
# mask, GRACE's codebook entry) reports the ids of the knowledge it used for a query, best first; [] when it
# used none. metrics/retrieval.py turns it into retrieval recall against the probe's knowledge id.
RETRIEVED_KNOWLEDGE_IDS = "retrieved_knowledge_ids"


class KBenchError(Exception):
    """An error the user can fix: the message says what is wrong and how to fix it."""


class DataError(KBenchError):
    """A data file is missing or malformed."""


class NonFiniteLossError(KBenchError):
    """Training produced a NaN/inf loss; the injection is stopped rather than silently corrupted."""


@dataclass(frozen=True)
class EditSpec:
    """A structured edit (task=editing, task=synthetic's training split): what editors (MEMOIR, GRACE, WISE,
    MEMIT, AlphaEdit) write and RECIPE trains on. Every prompt is rendered exactly as the task's probes ask
    it, so an editor trains on the text it is tested on.

    `target` is the continuation as scored, separator included (" English"); `target_new` the bare new
    object ("English"; None when the task does not say, then `target.lstrip()` stands for it). Locality
    prompts pair with `locality_answers` (bare, scored after the same separator as the target). `subject`
    is the edited subject as it appears in `prompt` (the mass editors' lookup token), `ground_truth` the
    pre-edit answer; None when unknown."""

    prompt: str
    target: str
    target_new: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality_prompts: tuple[str, ...] = ()
    locality_answers: tuple[str, ...] = ()
    subject: str | None = None
    ground_truth: str | None = None

    def __post_init__(self) -> None:
        if len(self.locality_prompts) != len(self.locality_answers):
            raise DataError(f"edit {self.prompt!r}: {len(self.locality_prompts)} locality prompts but "
                            f"{len(self.locality_answers)} answers; each prompt needs its answer")

    @property
    def separator(self) -> str:
        """What precedes `target_new` in `target` (" " for " English")."""
        return self.target[: len(self.target) - len(self.target_new or self.target.lstrip())]


@dataclass(frozen=True)
class Knowledge:
    """One unit of knowledge to inject: a context paragraph (PwC, synthetic, a dialogue, an edit).

    `train_sentences` are task-provided target sentences ("Question: ...\\nAnswer: ...\\n"); methods that
    train on sentences (FT(S), SELF-PARAM) use them when their sentence source is `task`. `edit` is the
    structured edit when the knowledge is one (`EditSpec`); editors fall back to `train_sentences` split at
    their answer marker when it is None. `meta` is free-form, for the task's own use.
    """

    id: str
    context: str
    train_sentences: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
    edit: EditSpec | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if not self.context.strip():
            raise DataError(f"knowledge {self.id!r} has an empty context; every injected item needs text")


@dataclass(frozen=True)
class Query:
    """A question put to a method. `prompt` is already formatted by the task's template.

    `context` is the probe's own gold context. Only the reference method `context` (the upper bound)
    reads it; every other method must answer from what it was given through `inject`.
    """

    id: str
    prompt: str
    context: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Probe:
    """A query with its gold answers (generate) or its target continuation (log-likelihood)."""

    query: Query
    answers: tuple[str, ...] = ()
    knowledge_id: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class GenerationSpec:
    """How to decode for one probe set: greedy, at most `max_new_tokens`, cut at the first stop string."""

    max_new_tokens: int = 32
    stop: tuple[str, ...] = ("\n",)


@dataclass
class ProbeSet:
    """Probes asked together after an injection step, scored the same way.

    `output_type` is the explicit choice between generating an answer and scoring a target
    continuation by log-likelihood (teacher forcing); `loglikelihood_bare` scores it through the model
    as served without the method's prompt augmentation (`Method.loglikelihood_unaugmented`: no retrieved passages, no
    gold context). `scorer` is the task's name for its metric family.
    """

    name: str
    probes: list[Probe]
    output_type: Literal["generate", "loglikelihood", "loglikelihood_bare"] = "generate"
    generation: GenerationSpec = field(default_factory=GenerationSpec)
    scorer: str = "qa"


@dataclass
class Step:
    """One injection step: optionally reset the method, inject `knowledge`, then ask `probe_sets`."""

    index: int
    knowledge: list[Knowledge]
    probe_sets: list[ProbeSet]
    reset_before: bool = False
    label: str = ""


@dataclass
class Answer:
    """A method's answer to one query, with whatever it wants a reader of the predictions to see."""

    text: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class TargetScore:
    """Teacher-forced score of a target continuation: summed log-probability and token accuracy.

    `predicted_ids` are the argmax tokens at the target positions (what the model would predict under
    teacher forcing); editing locality compares them before and after an edit. Methods that compute
    their own logits should fill them (`core.lm.target_scores` does). `meta` is what the method wants
    a reader of the predictions to see (e.g. what it retrieved), as in `Answer.meta`; it is not compared.
    """

    logprob: float
    n_tokens: int
    token_accuracy: float
    predicted_ids: tuple[int, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict, compare=False)
