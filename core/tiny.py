"""The tiny test model: a seeded Llama-architecture LM that reads a context and copies an answer from it.

`model=tiny` must tell a working method from a broken one in seconds, so its one skill is the one the
QA tasks need: given a paragraph of facts about an invented entity, then `Question: ...` and `Answer:`,
copy the answer from the paragraph. Without the paragraph it cannot know the answer: names and values
are random. Learning that takes about an hour of CPU, so the weights are trained once by
`benchmarks/train_tiny.py` (which documents the data: task-shaped paragraphs from held-out data seeds,
this module's own reading templates, copy sequences) and shipped as `core/data/tiny_reader.safetensors`
(`weights=bundled`, the default): a fresh `$KBENCH_CACHE` builds the model in about a second.

`weights=train` pre-trains in-process on this module's data alone (other architectures; minutes, with
progress) and caches the result keyed by what changes the weights only (architecture, tokenizer, steps,
seed, recipe, context template), never `device`, `batch_size` or `max_length`.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from filelock import FileLock
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from core.io import atomic_write, cache_dir, stable_hash
from core.lm import LM
from core.types import KBenchError, NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)

TINY_RECIPE_VERSION = 3  # bump when the pre-training recipe changes, so cached weights are rebuilt
BUNDLED = Path(__file__).resolve().parent / "data" / "tiny_reader.safetensors"

# ---------------------------------------------------------------------- generated reading data
_ONSETS = ["b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "z", "br", "st", "tr"]
_VOWELS = ["a", "e", "i", "o", "u", "ai", "ea", "oo"]
_CODAS = ["", "", "n", "r", "l", "s", "t", "m", "k"]
_POOLS = {
    "material": ["iron", "wool", "oak", "paper", "stone", "brass", "leather", "ivory", "steel", "linen", "pine", "jade"],
    "product": ["hats", "wine", "soap", "nets", "drums", "carpets", "barrels", "candles", "saddles", "pottery"],
    "job": ["baker", "sailor", "painter", "weaver", "miner", "teacher", "farmer", "doctor", "poet", "tailor"],
    "use": ["grinding corn", "lifting water", "weaving cloth", "pressing oil", "cutting ice", "mixing paint"],
}
# (statement, questions, value kind). {s}: the subject, {v}: the value. Question cues name the answer type
# ("In what year", "Who", "How many", "Which city") so reading for the right kind of value is learnable.
_RELATIONS = [
    ("{s} was established in {v}.", ("When was {s} established?", "In what year was {s} established?",
                                     "{s} was established in which year?"), "year"),
    ("{s} was created in {v}.", ("In what year was {s} created?", "When was {s} first created?"), "year"),
    ("{s} opened in {v}.", ("What year did {s} open?", "In which year did {s} open?"), "year"),
    ("{s} died in {v}.", ("In what year did {s} die?", "When did {s} die?"), "year"),
    ("{s} was set up by {v}.", ("Who set up {s}?", "By whom was {s} set up?", "Who was the creator of {s}?"), "person"),
    ("{s} was designed by {v}.", ("Who designed {s}?", "Who was the designer of {s}?"), "person"),
    ("{s} married {v}.", ("Who did {s} marry?", "Who was the spouse of {s}?"), "person"),
    ("{s} is located in the city of {v}.", ("In which city is {s} located?", "Which city is {s} in?",
                                            "Where is {s}?"), "place"),
    ("{s} grew up in the village of {v}.", ("Where did {s} grow up?", "In which village did {s} grow up?"), "place"),
    ("{s} stands near the {v} hills.", ("Near which hills does {s} stand?", "Which hills are close to {s}?"), "place"),
    ("{s} drains into the {v}.", ("Into which body of water does {s} drain?", "Where does {s} drain?"), "water"),
    ("{s} has {v} members.", ("How many members does {s} have?", "What is the number of members of {s}?"), "number"),
    ("{s} is {v} metres tall.", ("How tall is {s} in metres?", "How many metres tall is {s}?"), "number"),
    ("Around {v} people visit {s}.", ("How many people visit {s}?", "Roughly how many visitors does {s} get?"), "number"),
    ("{s} is built of {v}.", ("What is {s} built of?", "From what material is {s} built?",
                              "Which material was used for {s}?"), "material"),
    ("{s} sells {v}.", ("What does {s} sell?", "Which goods does {s} sell?", "What is {s} best known for?"), "product"),
    ("{s} earned a living as a {v}.", ("What did {s} do for a living?", "What was the job of {s}?",
                                       "What was the profession of {s}?"), "job"),
    ("{s} is used for {v}.", ("What is {s} used for?", "For what purpose is {s} used?"), "use"),
]
_INTROS = ["{s} is a place in the south.", "{s} is a name in old records.", "The {s} is a curious thing.",
           "{s} appears in many stories.", "Little is written about {s}."]


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables)).capitalize()


def _value(kind: str, rng: random.Random) -> str:
    if kind == "year":
        return str(rng.randint(1500, 2020))
    if kind == "number":
        return str(rng.randint(2, 999) * rng.choice([1, 10, 100]))
    if kind == "person":
        return f"{_word(rng, rng.choice([1, 2]))} {_word(rng, rng.choice([2, 3]))}"
    if kind == "place":
        return _word(rng, rng.choice([2, 3]))
    if kind == "water":
        return f"{rng.choice(['Lake', 'Sea of', 'Bay of'])} {_word(rng, 2)}"
    return rng.choice(_POOLS[kind])


def reading_example(rng: random.Random) -> tuple[str, str, str]:
    """(context, question, answer): a paragraph of 1–5 facts about an invented subject and a question on one."""
    subject = _word(rng, rng.choice([2, 3]))
    relations = rng.sample(_RELATIONS, rng.randint(1, 5))
    values = [_value(kind, rng) for _, _, kind in relations]
    sentences = [rng.choice(_INTROS).format(s=subject)] if rng.random() < 0.7 else []
    sentences += [statement.format(s=subject, v=value) for (statement, _, _), value in zip(relations, values)]
    pick = rng.randrange(len(relations))
    question = rng.choice(relations[pick][1]).format(s=subject)
    return " ".join(sentences), question, values[pick]


TINY_CORPUS = (
    "The town of Velmora was founded in 1742 by the river. Question: Who founded the town? Answer: Ada Quill.\n"
    "A small model reads the context and copies the answer. The inventor built a machine of copper and glass.\n"
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 25 42 100 1999 2024 appear in facts; names appear in questions.\n"
    "What is the capital of France? Paris. Which river flows through the valley? The Orvane river.\n"
)


def build_tiny_tokenizer(vocab_size: int) -> PreTrainedTokenizerBase:
    """A byte-level BPE trained on built-in text plus generated reading data: covers any text, deterministic,
    built in about a second. Common question words are single tokens, so prompts stay short."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(1234)
    corpus = TINY_CORPUS.splitlines() * 4
    for _ in range(400):
        context, question, answer = reading_example(rng)
        corpus.append(f"{context}\nQuestion: {question}\nAnswer: {answer}")
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


Example = tuple[list[int], list[int]]  # (prefix ids, answer ids): the loss weighs the answer `answer_weight` times


def copy_example(rng: random.Random, vocab_size: int, first: int = 4) -> Example:
    """Induction: BOS, random tokens with a random span x inside, then x again; the answer is the rest of
    x after its first token (a unique earlier token is continued as it was)."""
    span = [rng.randrange(first, vocab_size) for _ in range(rng.randint(4, 16))]
    filler = [rng.randrange(first, vocab_size) for _ in range(rng.randint(0, 30))]
    cut = rng.randint(0, len(filler))
    return [1] + filler[:cut] + span + filler[cut:] + span[:1], span[1:]


def reading_examples(tokenizer: PreTrainedTokenizerBase, context_template: str = "{context}\n",
                     extra: Callable[[random.Random], tuple[str, str, str]] | None = None, p_extra: float = 0.0,
                     p_copy: float = 0.1) -> Callable[[random.Random], Example]:
    """An example sampler: a copy example with probability `p_copy`, else a reading example rendered the
    way `LM.prompt_ids` and the QA tasks render them (BOS + context + `Question: q\nAnswer:`, answer
    ` value\n`), drawn from `extra` (another source of (context, question, answer)) with probability
    `p_extra`, else from `reading_example`."""
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    def sample(rng: random.Random) -> Example:
        if rng.random() < p_copy:
            return copy_example(rng, len(tokenizer))
        context, question, answer = extra(rng) if extra is not None and rng.random() < p_extra else reading_example(rng)
        prefix = [tokenizer.bos_token_id] + encode(context_template.format(context=context) + f"Question: {question}\nAnswer:")
        return prefix, encode(f" {answer}\n")

    return sample


def pretrain(model: PreTrainedModel, sample: Callable[[random.Random], Example], steps: int, seed: int,
             batch: int = 32, lr: float = 3e-3, answer_weight: float = 5.0, stop_after: int | None = None,
             on_step: Callable | None = None) -> float:
    """Causal-LM training on sampled examples, the answer tokens weighted `answer_weight` times the rest
    (the rest keeps it a language model of such text, so fine-tuning methods start from a sane loss).
    AdamW, one-cycle LR over `steps`, gradients clipped at 1; `stop_after` ends early on that schedule.
    Returns the loss of the last step."""
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.05)
    model.train()
    model.requires_grad_(True)
    started, last_report, loss = time.monotonic(), time.monotonic(), torch.tensor(float("nan"))
    last = min(steps, stop_after or steps)
    for step in range(1, last + 1):
        rows = [sample(rng) for _ in range(batch)]
        width = max(len(p) + len(t) for p, t in rows)
        ids = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), -100)
        mask = torch.zeros(batch, width, dtype=torch.long)
        weights = torch.ones(batch, width)
        for row, (prefix, target) in enumerate(rows):
            seq = prefix + target
            ids[row, : len(seq)] = torch.tensor(seq)
            mask[row, : len(seq)] = 1
            labels[row, 1 : len(seq)] = torch.tensor(seq[1:])
            weights[row, len(prefix) : len(seq)] = answer_weight
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target, weight = labels[:, 1:], weights[:, 1:] * (labels[:, 1:] != -100)
        token_loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target.reshape(-1).clamp(min=0), reduction="none"
        ).view_as(weight)
        loss = (token_loss * weight).sum() / weight.sum()
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step, float(loss.item()))
        if time.monotonic() - last_report > 5 or step == last:
            last_report = time.monotonic()
            log.info("tiny model: pre-training to read, step %d/%d, loss %.2f, %.0f s", step, last, loss.item(),
                     last_report - started)
    model.eval()
    model.requires_grad_(False)
    return float(loss.item())


def tiny_config(tokenizer: PreTrainedTokenizerBase, hidden_size: int, num_layers: int, num_heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=4096,  # RoPE has no table: inputs longer than this still work
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
    )


def weights_fingerprint(config: Any, tokenizer: PreTrainedTokenizerBase) -> str:
    """What a set of tiny weights fits: the architecture and the exact tokenizer."""
    return stable_hash([{k: v for k, v in config.to_dict().items() if k not in IGNORED_CONFIG}, tokenizer.get_vocab()])


IGNORED_CONFIG = ("max_position_embeddings", "transformers_version", "architectures", "dtype", "torch_dtype")


def save_weights(model: PreTrainedModel, path: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_write(path) as staging:
        save_file({k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}, staging, metadata)


def load_weights(model: PreTrainedModel, path: Path) -> None:
    from safetensors.torch import load_file

    missing, unexpected = model.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # the tied head is not stored twice
        raise KBenchError(f"tiny model weights {path} do not fit the config; delete the file (it is a cache)")


def tiny_lm(
    hidden_size: PositiveInt = 64,
    num_layers: PositiveInt = 4,
    num_heads: PositiveInt = 4,
    vocab_size: PositiveInt = 512,
    weights: Literal["bundled", "train"] = "bundled",
    pretrain_steps: NonNegativeInt = 2000,
    seed: int = 0,
    device: str = "cpu",
    context_template: str = "{context}\n",
    batch_size: PositiveInt = 8,  # bounded: runners.build refuses 0 before building (it failed inside the LM)
    max_length: PositiveInt = 4096,
) -> LM:
    """Hydra target of `conf/model/tiny.yaml`: a seeded Llama-architecture model built from a config.

    `weights=bundled` (default) loads the reader shipped in `core/data/tiny_reader.safetensors` (built by
    `python benchmarks/train_tiny.py`; it fits the default architecture knobs and says so otherwise):
    no training, a fresh cache builds in about a second. `weights=train` pre-trains in-process on this
    module's own generated reading data (`pretrain_steps` steps, minutes on CPU, progress logged) and caches
    the result under `$KBENCH_CACHE/tiny/`, keyed by what changes the weights only (architecture, tokenizer,
    steps, seed, recipe, context template): `device`, `batch_size` and `max_length` reuse the same file.
    """
    from transformers import LlamaForCausalLM

    if weights not in ("bundled", "train"):
        raise ValueError(f"model.weights must be 'bundled' or 'train', got {weights!r}")
    tokenizer = build_tiny_tokenizer(vocab_size)
    config = tiny_config(tokenizer, hidden_size, num_layers, num_heads)
    fingerprint = weights_fingerprint(config, tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if weights == "bundled":
        from safetensors import safe_open

        with safe_open(str(BUNDLED), "pt") as handle:
            shipped = handle.metadata() or {}
        if shipped.get("fingerprint") != fingerprint:
            raise KBenchError(
                f"the bundled tiny weights fit {shipped.get('knobs', 'another configuration')}, not these model knobs; "
                "use model.weights=train to pre-train a tiny model for them (minutes on CPU, then cached)"
            )
        load_weights(model, BUNDLED)
    else:
        key = stable_hash([fingerprint, pretrain_steps, seed, context_template, TINY_RECIPE_VERSION])
        path = cache_dir("tiny") / f"{key}.safetensors"
        with FileLock(str(path) + ".lock"):
            if path.is_file():
                load_weights(model, path)
            else:
                log.info("tiny model: pre-training %s for %d steps (first use of these knobs; cached afterwards)",
                         path.name, pretrain_steps)
                pretrain(model, reading_examples(tokenizer, context_template), pretrain_steps, seed)
                save_weights(model, path, {"fingerprint": fingerprint})
    model.eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.to(device)
    return LM(
        model, tokenizer, name="tiny", context_template=context_template, batch_size=batch_size, max_length=max_length
    )
