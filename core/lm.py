"""The language-model wrapper: what methods need from a causal LM, and nothing more.

Token sequences are always built by concatenating separately tokenised pieces
(start tokens + context prefix + prompt + target), never by re-tokenising a joined string, so the
positions of a target are known exactly and are the same in training, scoring and generation.
Training and scoring batches are right-padded and apply the output head only at target positions
(Gemma's head is 262k wide); generation batches are left-padded.

Devices: inputs go where the input embeddings live (`LM.device`); every later op combines tensors on
the device of the tensor it meets (the hidden state's, the output head's), so a model split over
devices with `device_map` scores and trains like one on a single device. The positions and ids of the
targets are computed on the host while collating, so a step needs no device-to-host sync for them.

Continuous prompts (RECIPE-style methods): a `[k, hidden]` tensor of vectors can be spliced into a
sequence right after its start (BOS) token and fed through `inputs_embeds`; the `*_with_vectors`
functions train, score and generate that way. A row with k = 0 is the plain token sequence.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from core.progress import progress
from core.types import GenerationSpec, KBenchError, TargetScore

log = logging.getLogger(__name__)

# Per-batch state a method attaches to rows: called with the indices (into the caller's list) of the
# rows of one batch, in batch order, and entered around every forward pass of that batch (prefill and
# each decoding step alike). Methods that change the forward per row (MEMOIR's masks) get the row
# identities from here rather than by inspecting what `generate` passes to the model.
RowState = Callable[[list[int]], contextlib.AbstractContextManager]


def _no_row_state(rows: list[int]) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


@dataclass
class PrefixCache:
    """The attention keys/values of one token prefix, read once at batch size 1 (`LM.read_prefix`)."""

    ids: tuple[int, ...]
    cache: Any  # the model's cache object (a transformers `DynamicCache`)


def common_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix that every sequence starts with (0 for no sequences)."""
    if not sequences:
        return 0
    first, n = sequences[0], min(map(len, sequences))
    for other in sequences[1:]:
        n = next((i for i in range(n) if other[i] != first[i]), n)
    return n


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a − b| over max(1, max |b|), on a's device: how far a computation is from its reference."""
    return float((a - b.to(a.device)).abs().max()) / max(1.0, float(b.abs().max()))


class _Captured(Exception):
    """Raised by `LM.module_inputs`' hooks once everything asked for is captured: the layers above are not run."""


@dataclass
class TokenBatch:
    """Right-padded (prefix + target) sequences; `target_mask` marks the target tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    # filled by `LM.collate` on the host (no device sync later); derived from the tensors above when None
    positions: torch.Tensor | None = None  # flat indices into [B, T-1] of the predicting positions
    flat_target_ids: torch.Tensor | None = None
    lengths: list[int] | None = None  # predicted target tokens per row

    @property
    def predicted_mask(self) -> torch.Tensor:
        """Target tokens that have a preceding token to predict them from (all but a sequence-initial one)."""
        return self.target_mask[:, 1:]

    @property
    def target_ids(self) -> torch.Tensor:
        """The predicted target tokens, flattened in row-major order (aligned with `LM.target_logits`)."""
        if self.flat_target_ids is not None:
            return self.flat_target_ids
        return self.input_ids[:, 1:][self.predicted_mask]

    @property
    def target_lengths(self) -> list[int]:
        """Predicted target tokens of each row (a host list; computed while collating)."""
        return self.lengths if self.lengths is not None else self.predicted_mask.sum(1).tolist()


@dataclass
class VectorBatch:
    """Right-padded input embeddings of (prefix + vectors + target) rows; `target_mask` marks target
    positions and `target_ids` are the predicted target tokens, flattened row-major."""

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor
    target_ids: torch.Tensor

    @property
    def predicted_mask(self) -> torch.Tensor:
        return self.target_mask[:, 1:]


class LM:
    """A causal LM plus its tokenizer, prompt rendering, batched greedy generation and scoring."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        context_template: str = "{context}\n",
        prompt_format: str = "plain",
        add_bos: bool = True,
        batch_size: int = 8,
        max_length: int = 2048,
    ) -> None:
        if prompt_format not in ("plain", "chat"):
            raise ValueError(f"model.prompt_format must be 'plain' or 'chat', got {prompt_format!r}")
        if prompt_format == "chat" and not tokenizer.chat_template:
            raise ValueError(f"model {name!r} has no chat template; use model.prompt_format=plain")
        if "{context}" not in context_template:
            raise ValueError(f"model.context_template must contain '{{context}}', got {context_template!r}")
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.context_template = context_template
        self.prompt_format = prompt_format
        self.batch_size = batch_size
        self.max_length = max_length
        # sequences cut to fit max_length, and the tokens dropped; the experiment records them per phase
        self.truncation = {"sequences": 0, "tokens_dropped": 0}
        self.start_ids = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.eval()
        model.requires_grad_(False)  # methods switch on exactly the weights they train
        self.check_internals()

    # ------------------------------------------------------------------ what kbench assumes of the model
    @torch.no_grad()
    def check_internals(self, probe: Sequence[int] | None = None) -> None:
        """Check, on one short sequence, that the shortcuts this wrapper takes compute what the model's own
        forward computes, so a model family or a transformers release that does things differently fails
        here, by name, instead of scoring wrongly:
        - `target_logits` runs the decoder, then the output head (with Gemma's final-logit soft-cap) on the
          target positions only: its logits must equal `model(input_ids).logits` there (a head that also
          scales its logits, e.g. Cohere's `logit_scale`, would not);
        - `embed` + `inputs_embeds` (continuous prompts) must give the same hidden states as `input_ids`
          (the embedding module must carry any embedding scale, as Gemma's does in transformers >= 5).
        Raises KBenchError naming the model class and the difference."""
        ids = list(probe) if probe is not None else [i % max(2, self.causal_lm.config.vocab_size) for i in range(3, 9)]
        batch = self.collate([(ids[:2], ids[2:])])
        full = self.causal_lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
        expected = full[:, :-1][batch.predicted_mask.to(full.device)]
        ours = self.target_logits(batch).to(expected.device)
        decoder = self.causal_lm.get_decoder()
        by_ids = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state.float()
        by_embeds = decoder(
            inputs_embeds=self.embed(batch.input_ids[0].tolist())[None], attention_mask=batch.attention_mask
        ).last_hidden_state.float()
        for what, a, b in (("output-head logits", ours, expected), ("inputs_embeds hidden states", by_embeds, by_ids)):
            gap = relative_gap(a, b)
            if gap > self._check_tolerance():
                raise KBenchError(
                    f"kbench cannot score {type(self.causal_lm).__name__} ({self.name}) faithfully: its {what} "
                    f"differ from the model's own forward by {gap:.2e} (relative). core/lm.py computes them "
                    "through get_decoder() / get_output_embeddings() / get_input_embeddings(); this model "
                    "family (or this transformers release) does something else there."
                )
        self.prefix_cache_ok = self._check_prefix_cache(ids, ours)

    def _check_prefix_cache(self, ids: list[int], expected: torch.Tensor) -> bool:
        """Whether a cached prefix (`read_prefix`) gives the logits of reading it in the row; where it does
        not (a model family without a transformers cache), `fits_after_prefix` is False and callers read
        every prefix in full: slower, the same numbers."""
        try:
            cached = self.target_logits(self.collate([(ids[1:2], ids[2:])]), prefix=self.read_prefix(ids[:1]))
            gap = relative_gap(cached, expected)
        except (TypeError, AttributeError, ValueError, RuntimeError) as error:
            gap, why = float("inf"), f"{type(error).__name__}: {error}"
        else:
            why = f"logits differ by {gap:.2e} (relative)"
        if gap > self._check_tolerance():
            log.warning("%s (%s): a cached prefix does not reproduce reading it (%s); prefixes are re-read per row",
                        type(self.causal_lm).__name__, self.name, why)
            return False
        return True

    def _check_tolerance(self) -> float:
        """The largest relative gap the load-time checks accept: fp32 rounding, or half precision's."""
        low_precision = next(self.causal_lm.parameters()).dtype in (torch.float16, torch.bfloat16)
        return 2e-2 if low_precision else 1e-4

    def decoder_layers(self) -> torch.nn.ModuleList:
        """The decoder's stack of layers (`model.model.layers` in Llama/Gemma/Mistral/Qwen); methods that
        hook one layer (MEMOIR, the editors) find it here. Raises KBenchError for other layouts."""
        layers = getattr(self.causal_lm.get_decoder(), "layers", None)
        if not isinstance(layers, torch.nn.ModuleList):
            raise KBenchError(
                f"{type(self.causal_lm).__name__} keeps its decoder layers elsewhere than get_decoder().layers; "
                "layer-editing methods support Llama-style decoders (Llama, Gemma, Mistral, Qwen, SmolLM)"
            )
        return layers

    def linear_at(self, layer: int | float, module: str) -> tuple[int, torch.nn.Linear]:
        """(index, Linear module) of `module` (a path inside a decoder layer, e.g. "mlp.down_proj") in decoder
        layer `layer`: an int is an index (negative from the top), a float a fraction of the depth
        (round(layer · n), at most the top layer: one default fits every model). Raises ValueError for a
        fraction outside [0, 1], an index out of range, or a module that is not a Linear layer."""
        layers = self.decoder_layers()
        if isinstance(layer, float):
            if not 0.0 <= layer <= 1.0:
                raise ValueError(f"method.layer={layer}: a float is a fraction of the depth and must be in [0, 1]")
            layer = min(round(layer * len(layers)), len(layers) - 1)
        if not -len(layers) <= layer < len(layers):
            raise ValueError(f"method.layer={layer} is out of range: the model has {len(layers)} layers")
        index = layer % len(layers)
        target = layers[index].get_submodule(module)
        if not isinstance(target, torch.nn.Linear):
            raise ValueError(f"method.module={module!r} is a {type(target).__name__}, not a Linear layer")
        return index, target

    @torch.no_grad()
    def module_inputs(
        self,
        modules: Sequence[torch.nn.Module],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        outputs_of: Sequence[torch.nn.Module] = (),
    ) -> list[torch.Tensor]:
        """What the editors read inside one forward of the decoder (no output head) over `input_ids` `[B, T]`:
        the input of each of `modules` (`[B, T, D_in]`: the first positional argument, or `input`), then the
        output of each of `outputs_of` (a decoder layer's hidden states `[B, T, H]`), detached, each on its
        module's device. The forward stops once all are captured, so the layers above are not run. Hooks on
        `modules` themselves do not run (the capture happens before them). Raises KBenchError naming a
        module that the forward never reached."""
        captured: dict[int, torch.Tensor] = {}
        wanted = len(modules) + len(outputs_of)

        def keep(slot: int, value: torch.Tensor) -> None:
            captured[slot] = value.detach()
            if len(captured) == wanted:
                raise _Captured

        handles = [m.register_forward_pre_hook(lambda _m, args, kwargs, slot=slot: keep(slot, args[0] if args else kwargs["input"]),
                                               with_kwargs=True) for slot, m in enumerate(modules)]
        handles += [m.register_forward_hook(lambda _m, _a, out, slot=slot: keep(slot, out[0] if isinstance(out, tuple) else out))
                    for slot, m in enumerate(outputs_of, start=len(modules))]
        try:
            self.causal_lm.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
        except _Captured:
            pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [type(m).__name__ for slot, m in enumerate([*modules, *outputs_of]) if slot not in captured]
        if missing:
            raise KBenchError(f"the forward of {type(self.causal_lm).__name__} never reached {missing}: is the "
                              "module on the decoder's forward path?")
        return [captured[slot] for slot in range(wanted)]

    # ------------------------------------------------------------------ tokens and prompts
    @property
    def device(self) -> torch.device:
        """Where inputs go: the input embeddings' device (with `device_map` the first layers' GPU).
        Not "the first parameter's": with a split model, later ops use the device of what they meet."""
        return self.causal_lm.get_input_embeddings().weight.device

    @property
    def causal_lm(self) -> PreTrainedModel:
        """The underlying HF model, also when a peft wrapper sits around it (adapters live inside it)."""
        model = self.model
        return model.get_base_model() if hasattr(model, "get_base_model") else model

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def context_ids(self, context: str) -> list[int]:
        """Tokens that put `context` in front of whatever follows (the rendered context prefix)."""
        return self.encode(self.context_template.format(context=context))

    def prompt_ids(self, prompt: str, context: str | None = None) -> list[int]:
        """Start tokens + optional context prefix + prompt; with a chat model, the chat-rendered turn."""
        if self.prompt_format == "chat":
            content = (self.context_template.format(context=context) if context else "") + prompt
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
            )
            return self.encode(text)
        ids = list(self.start_ids)
        if context:
            ids += self.context_ids(context)
        return ids + self.encode(prompt)

    # ------------------------------------------------------------------ batching
    def _kept_start(self, ids: Sequence[int]) -> int:
        """How many leading tokens a cut keeps: the start tokens (BOS), when the sequence begins with them."""
        start = self.start_ids
        return len(start) if start and list(ids[: len(start)]) == start else 0

    def fit(self, ids: Sequence[int], room: int) -> list[int]:
        """`ids` cut to at most `room` tokens (at least the start tokens + 1) and counted in `truncation`:
        the start tokens stay, the oldest tokens after them go, so the model still sees a well-formed
        input (BOS, the end of the context, the whole question) rather than one without its BOS."""
        ids = list(ids)
        keep = self._kept_start(ids)
        room = max(room, keep + 1)
        if len(ids) <= room:
            return ids
        self.truncation["sequences"] += 1
        self.truncation["tokens_dropped"] += len(ids) - room
        return ids[:keep] + ids[len(ids) - (room - keep):]

    def collate(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> TokenBatch:
        """Right-pad (prefix, target) id pairs into a batch; a too-long sequence loses its prefix start."""
        seqs, masks = [], []
        for prefix, target in pairs:
            if not target:
                raise ValueError("empty target sequence")
            seq = list(prefix) + list(target)
            mask = [False] * len(prefix) + [True] * len(target)
            if len(seq) > self.max_length:  # keep the start tokens and the target; drop the oldest prefix tokens
                keep, cut = self._kept_start(seq), self.fit(seq, self.max_length)
                seq, mask = cut, mask[:keep] + mask[len(mask) - (len(cut) - keep) :]
            seqs.append(seq)
            masks.append(mask)
        width = max(map(len, seqs))
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        target = torch.zeros((len(seqs), width), dtype=torch.bool)
        for row, (seq, mask) in enumerate(zip(seqs, masks)):
            input_ids[row, : len(seq)] = torch.tensor(seq)
            attention[row, : len(seq)] = 1
            target[row, : len(seq)] = torch.tensor(mask)
        predicted = target[:, 1:]  # on the host: positions, ids and lengths cost no device sync later
        positions = predicted.flatten().nonzero().squeeze(1)
        target_ids = input_ids[:, 1:][predicted]
        lengths = predicted.sum(1).tolist()
        device = self.device
        return TokenBatch(
            input_ids.to(device), attention.to(device), target.to(device), positions, target_ids.to(device), lengths
        )

    def target_logits(self, batch: TokenBatch, prefix: PrefixCache | None = None) -> torch.Tensor:
        """fp32 logits predicting each target token, `[len(batch.target_ids), vocab]`, row-major.

        The head runs only on the positions that predict a target token, so memory scales with the
        number of target tokens rather than batch × length × vocab. With `prefix` every row reads
        `prefix.ids` first, from its cached keys/values (`read_prefix`): the same logits as collating
        `prefix.ids + row` (the attention sees the same keys; float rounding aside), for the tokens of
        the rows only. The caller checks `fits_after_prefix` first; a row's target must not start it.
        """
        decoder = self.causal_lm.get_decoder()
        if prefix is None:
            hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
            return self._head(hidden, batch.predicted_mask, batch.positions)
        rows = batch.input_ids.shape[0]
        cache = copy.deepcopy(prefix.cache)  # the forward appends the rows' keys to it
        cache.batch_repeat_interleave(rows)
        seen = batch.attention_mask.new_ones((rows, len(prefix.ids)))
        hidden = decoder(input_ids=batch.input_ids, attention_mask=torch.cat([seen, batch.attention_mask], 1),
                         use_cache=False, **{self._cache_argument(decoder): cache}).last_hidden_state
        return self._head(hidden, batch.predicted_mask, batch.positions)

    @staticmethod
    def _cache_argument(decoder: torch.nn.Module) -> str:
        """transformers renamed `past_key_values` to `cache` (deprecated in 5.x); accept either release."""
        return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def read_prefix(self, ids: Sequence[int]) -> PrefixCache:
        """Run the decoder once over `ids` (batch 1) and keep its keys/values for `target_logits(prefix=)`.

        Only valid for the weights it was read with: a caller keeps it within one pass over fixed weights.
        """
        decoder = self.causal_lm.get_decoder()
        input_ids = torch.tensor([list(ids)], dtype=torch.long, device=self.device)
        output = decoder(input_ids=input_ids, use_cache=True)
        cache = getattr(output, "cache", None) or output.past_key_values
        return PrefixCache(tuple(ids), cache)

    def fits_after_prefix(self, prefix_length: int, width: int) -> bool:
        """Whether rows of `width` tokens after a shared prefix fit without the cuts `collate` makes
        (`max_length`) and inside the model's sliding attention window, when it has one (there a cached
        prefix is exact only when every row still sees all of it)."""
        window = getattr(self.causal_lm.config, "sliding_window", None)
        total = prefix_length + width
        return self.prefix_cache_ok and total <= self.max_length and (not window or total <= window)

    def _head(
        self, hidden: torch.Tensor, predicted_mask: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """fp32 logits of the output head at the positions that predict a target (t predicts t + 1).

        The positions are picked on the hidden state's device, and the picked rows go to the head's
        device (they differ when `device_map` puts the last layers and the head on other GPUs); the
        logits stay on the head's device.
        """
        causal = self.causal_lm
        head = causal.get_output_embeddings()
        states = hidden[:, :-1]
        if positions is not None:  # host-computed indices: no sync (a boolean mask needs one)
            picked = states.reshape(-1, states.shape[-1]).index_select(0, positions.to(hidden.device))
        else:
            picked = states[predicted_mask.to(hidden.device)]
        logits = head(picked.to(head.weight.device)).float()
        softcap = getattr(causal.config, "final_logit_softcapping", None)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        return logits

    def batches(self, items: Sequence, desc: str, size: int | None = None):
        size = size or self.batch_size
        starts = range(0, len(items), size)
        for start in progress(starts, desc=desc, total=len(starts)):
            yield items[start : start + size]

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def loglikelihood(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], row_state: RowState | None = None
    ) -> list[TargetScore]:
        """Teacher-forced log-probability and greedy token accuracy of each target given its prefix
        (lm-evaluation-harness's `loglikelihood`).
        `row_state(rows)` (optional) is entered around each batch's forward with that batch's row indices."""
        row_state = row_state or _no_row_state
        results: list[TargetScore] = []
        for rows in self.batches(list(range(len(pairs))), desc="score"):
            batch = self.collate([pairs[i] for i in rows])
            with row_state(list(rows)):
                logits = self.target_logits(batch)
            results += target_scores(logits, batch.target_ids, batch.target_lengths)
        return results

    def _greedy_config(self, spec: GenerationSpec) -> GenerationConfig:
        return GenerationConfig(
            max_new_tokens=spec.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
            stop_strings=list(spec.stop) or None,
        )

    @torch.inference_mode()
    def generate_until(
        self, prompts: Sequence[Sequence[int]], spec: GenerationSpec, row_state: RowState | None = None
    ) -> list[str]:
        """Greedy continuations of tokenised prompts, cut at the first stop string and stripped
        (lm-evaluation-harness's `generate_until`).
        `row_state(rows)` (optional) is entered around each batch's whole `model.generate` call (prefill and
        every decoding step) with the indices of that batch's prompts, in batch row order."""
        row_state = row_state or _no_row_state
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        outputs: dict[int, str] = {}
        config = self._greedy_config(spec)
        for chunk in self.batches(order, desc="generate"):
            seqs = [self.fit(prompts[i], self.max_length - spec.max_new_tokens) for i in chunk]
            width = max(map(len, seqs))
            input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):  # left padding keeps every prompt's end at the same column
                input_ids[row, width - len(seq) :] = torch.tensor(seq)
                attention[row, width - len(seq) :] = 1
            with row_state(list(chunk)):
                generated = self.model.generate(
                    input_ids=input_ids.to(self.device),
                    attention_mask=attention.to(self.device),
                    generation_config=config,
                    tokenizer=self.tokenizer,
                )
            for row, index in enumerate(chunk):
                outputs[index] = cut_at_stop(self.decode(generated[row, width:].tolist()), spec.stop)
        return [outputs[i] for i in range(len(prompts))]


    @torch.inference_mode()
    def sample(
        self,
        prompt: Sequence[int],
        n: int,
        spec: GenerationSpec,
        temperature: float,
        top_p: float,
        seed: int,
    ) -> list[str]:
        """`n` seeded samples continuing one prompt, cut at the first stop string (to generate sentences)."""
        torch.manual_seed(seed)
        config = GenerationConfig(
            max_new_tokens=spec.max_new_tokens,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            num_return_sequences=n,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
            stop_strings=list(spec.stop) or None,
        )
        input_ids = torch.tensor([self.fit(prompt, self.max_length - spec.max_new_tokens)], device=self.device)
        generated = self.model.generate(input_ids=input_ids, generation_config=config, tokenizer=self.tokenizer)
        return [cut_at_stop(self.decode(row[input_ids.shape[1] :].tolist()), spec.stop) for row in generated]

    def sample_texts(self, n: int, max_new_tokens: int, temperature: float, seed: int, batch_size: int = 16) -> list[str]:
        """`n` texts the model writes from its start tokens alone (no stop string, top-p 1): the model's own
        text, for regularisation and background rows (SELF-PARAM, MEMOIR, WISE). Sampled in batches of
        `batch_size`; the batch starting at sample i is seeded `seed + i`. Empty texts are kept."""
        spec = GenerationSpec(max_new_tokens=max_new_tokens, stop=())
        texts: list[str] = []
        for start in progress(range(0, n, batch_size), desc="model text", disable=n <= batch_size or None):
            texts += self.sample(self.start_ids, min(batch_size, n - start), spec, temperature, 1.0, seed=seed + start)
        return texts

    # ------------------------------------------------------------------ continuous prompts (inputs_embeds)
    @property
    def hidden_size(self) -> int:
        return self.causal_lm.get_input_embeddings().embedding_dim

    def embed(self, ids: Sequence[int]) -> torch.Tensor:
        """Input embeddings `[len(ids), hidden]` exactly as the model computes them (Gemma's scale included)."""
        return self.causal_lm.get_input_embeddings()(torch.tensor(list(ids), dtype=torch.long, device=self.device))

    def vector_slot(self, ids: Sequence[int]) -> int:
        """Where vectors go in `ids`: after a leading start token, which stays first (Gemma needs BOS at 0)."""
        bos = self.tokenizer.bos_token_id
        return 1 if bos is not None and len(ids) > 0 and ids[0] == bos else 0

    def _splice(self, ids: Sequence[int], vectors: torch.Tensor, keep_last: int) -> torch.Tensor:
        """Embeddings of `ids` with `vectors` inserted at the slot; too long rows lose their oldest
        tokens after the slot (never the start token, the vectors or the last `keep_last` tokens)."""
        if vectors.dim() != 2 or vectors.shape[1] != self.hidden_size:
            raise ValueError(f"vectors must be [k, {self.hidden_size}], got {tuple(vectors.shape)}")
        slot = self.vector_slot(ids)
        head, tail = list(ids[:slot]), list(ids[slot:])
        overflow = len(head) + len(vectors) + len(tail) - self.max_length
        if overflow > 0:
            if overflow > len(tail) - keep_last:
                raise ValueError(f"a row of {len(ids)} tokens + {len(vectors)} vectors exceeds max_length={self.max_length}")
            tail = tail[overflow:]
        embeds = self.embed(head + tail)
        vectors = vectors.to(device=embeds.device, dtype=embeds.dtype)
        return torch.cat([embeds[:slot], vectors, embeds[slot:]], dim=0)

    def collate_with_vectors(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], vectors: Sequence[torch.Tensor]
    ) -> VectorBatch:
        """Right-padded (prefix + target) rows with `vectors[i]` (`[k_i, hidden]`, k_i may be 0) spliced
        into row i after its start token; gradients flow into the vectors."""
        if len(pairs) != len(vectors):
            raise ValueError(f"{len(pairs)} rows but {len(vectors)} vector tensors")
        rows, n_targets = [], []
        for (prefix, target), vecs in zip(pairs, vectors):
            if not target:
                raise ValueError("empty target sequence")
            rows.append(self._splice(list(prefix) + list(target), vecs, keep_last=len(target)))
            n_targets.append(len(target))
        width, hidden = max(len(r) for r in rows), rows[0].shape[1]
        embeds = rows[0].new_zeros((len(rows), width, hidden))
        attention = torch.zeros((len(rows), width), dtype=torch.long, device=self.device)
        target = torch.zeros((len(rows), width), dtype=torch.bool, device=self.device)
        target_ids = []
        for i, ((_, ids), row, n) in enumerate(zip(pairs, rows, n_targets)):
            embeds[i, : len(row)] = row
            attention[i, : len(row)] = 1
            target[i, len(row) - n : len(row)] = True
            target_ids += list(ids)[1:] if len(row) == n else list(ids)  # a row-initial token is not predicted
        return VectorBatch(embeds, attention, target, torch.tensor(target_ids, dtype=torch.long, device=self.device))

    def target_logits_with_vectors(self, batch: VectorBatch) -> torch.Tensor:
        """Like `target_logits`, for a `VectorBatch` (differentiable in the spliced vectors)."""
        decoder = self.causal_lm.get_decoder()
        hidden = decoder(inputs_embeds=batch.inputs_embeds, attention_mask=batch.attention_mask).last_hidden_state
        return self._head(hidden, batch.predicted_mask)  # the mask goes to the hidden state's device there

    @torch.inference_mode()
    def loglikelihood_with_vectors(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], vectors: Sequence[torch.Tensor]
    ) -> list[TargetScore]:
        """`loglikelihood` with `vectors[i]` spliced into row i after its start token."""
        results: list[TargetScore] = []
        rows = list(zip(pairs, vectors))
        for chunk in self.batches(rows, desc="score"):
            batch = self.collate_with_vectors([p for p, _ in chunk], [v for _, v in chunk])
            logits = self.target_logits_with_vectors(batch)
            results += target_scores(logits, batch.target_ids, batch.predicted_mask.sum(1).tolist())
        return results

    @torch.inference_mode()
    def generate_until_with_vectors(
        self, prompts: Sequence[Sequence[int]], vectors: Sequence[torch.Tensor], spec: GenerationSpec
    ) -> list[str]:
        """`generate_until` with `vectors[i]` spliced into prompt i after its start token (left-padded batches)."""
        if len(prompts) != len(vectors):
            raise ValueError(f"{len(prompts)} prompts but {len(vectors)} vector tensors")
        rows = [self._splice(p, v, keep_last=1) for p, v in zip(prompts, vectors)]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        outputs: dict[int, str] = {}
        config = self._greedy_config(spec)
        for chunk in self.batches(order, desc="generate"):
            width = max(len(rows[i]) for i in chunk)
            embeds = rows[chunk[0]].new_zeros((len(chunk), width, rows[chunk[0]].shape[1]))
            attention = torch.zeros((len(chunk), width), dtype=torch.long, device=self.device)
            for r, index in enumerate(chunk):  # left padding, as in `generate_until`
                embeds[r, width - len(rows[index]) :] = rows[index]
                attention[r, width - len(rows[index]) :] = 1
            generated = self.model.generate(
                inputs_embeds=embeds, attention_mask=attention, generation_config=config, tokenizer=self.tokenizer
            )  # with inputs_embeds only, generate returns the new tokens alone (decoder-only models)
            if generated.shape[1] > config.max_new_tokens:
                raise KBenchError(
                    f"generate(inputs_embeds=...) returned {generated.shape[1]} tokens for max_new_tokens="
                    f"{config.max_new_tokens}: this transformers release returns the prompt too; core/lm.py "
                    "generate_until_with_vectors must cut it"
                )
            for r, index in enumerate(chunk):
                outputs[index] = cut_at_stop(self.decode(generated[r].tolist()), spec.stop)
        return [outputs[i] for i in range(len(rows))]


def target_scores(logits: torch.Tensor, target_ids: torch.Tensor, lengths: Sequence[int]) -> list[TargetScore]:
    """One `TargetScore` per sequence from the logits predicting its target tokens (row-major, as
    `LM.target_logits` returns them) and the number of predicted target tokens of each sequence."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    target_ids = target_ids.to(logits.device)  # the ids were collated where the inputs go, maybe not the head's device
    token_lp = logprobs.gather(1, target_ids[:, None]).squeeze(1)
    predicted = logprobs.argmax(-1)
    hits = (predicted == target_ids).float()
    # one transfer to the host for the whole batch, not one per row
    sums = torch.stack([lp.sum() for lp in token_lp.split(list(lengths))]).tolist() if len(lengths) else []
    accuracy = torch.stack([h.mean() for h in hits.split(list(lengths))]).tolist() if len(lengths) else []
    tokens = predicted.tolist()
    results, start = [], 0
    for n, lp, acc in zip(lengths, sums, accuracy):
        results.append(TargetScore(float(lp), n, float(acc), tuple(tokens[start : start + n])))
        start += n
    return results


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string, stripped (leading whitespace too: answers follow ':')."""
    cut = len(text)
    for marker in stop:
        position = text.find(marker)
        if position != -1:
            cut = min(cut, position)
    return text[:cut].strip()
