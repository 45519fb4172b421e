"""The language-model wrapper: what methods need from a causal LM, and nothing more.

Token sequences are always built by concatenating separately tokenised pieces
(start tokens + context prefix + prompt + target), never by re-tokenising a joined string, so the
positions of a target are known exactly and are the same in training, scoring and generation.
Training and scoring batches are right-padded and apply the output head only at target positions
(Gemma's head is 262k wide); generation batches are left-padded.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from core.progress import progress
from core.types import GenerationSpec, TargetScore


@dataclass
class TokenBatch:
    """Right-padded (prefix + target) sequences; `target_mask` marks the target tokens."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_mask: torch.Tensor

    @property
    def predicted_mask(self) -> torch.Tensor:
        """Target tokens that have a preceding token to predict them from (all but a sequence-initial one)."""
        return self.target_mask[:, 1:]

    @property
    def target_ids(self) -> torch.Tensor:
        """The predicted target tokens, flattened in row-major order (aligned with `LM.target_logits`)."""
        return self.input_ids[:, 1:][self.predicted_mask]


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
        self.start_ids = [tokenizer.bos_token_id] if add_bos and tokenizer.bos_token_id is not None else []
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        model.eval()
        model.requires_grad_(False)  # methods switch on exactly the weights they train

    # ------------------------------------------------------------------ tokens and prompts
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

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
    def collate(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> TokenBatch:
        """Right-pad (prefix, target) id pairs into a batch; a too-long sequence loses its prefix start."""
        seqs, masks = [], []
        for prefix, target in pairs:
            if not target:
                raise ValueError("empty target sequence")
            seq = list(prefix) + list(target)
            mask = [False] * len(prefix) + [True] * len(target)
            if len(seq) > self.max_length:  # keep the target; drop the oldest prefix tokens
                seq, mask = seq[-self.max_length :], mask[-self.max_length :]
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
        device = self.device
        return TokenBatch(input_ids.to(device), attention.to(device), target.to(device))

    def target_logits(self, batch: TokenBatch) -> torch.Tensor:
        """fp32 logits predicting each target token, `[len(batch.target_ids), vocab]`, row-major.

        The head runs only on the positions that predict a target token, so memory scales with the
        number of target tokens rather than batch × length × vocab.
        """
        causal = self.causal_lm
        hidden = causal.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
        # position t predicts token t + 1
        logits = causal.get_output_embeddings()(hidden[:, :-1][batch.predicted_mask]).float()
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
    def score(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[TargetScore]:
        """Teacher-forced log-probability and greedy token accuracy of each target given its prefix."""
        results: list[TargetScore] = []
        for chunk in self.batches(list(pairs), desc="score"):
            batch = self.collate(chunk)
            results += target_scores(self.target_logits(batch), batch.target_ids, batch.predicted_mask.sum(1).tolist())
        return results

    @torch.inference_mode()
    def generate(self, prompts: Sequence[Sequence[int]], spec: GenerationSpec) -> list[str]:
        """Greedy continuations of tokenised prompts, cut at the first stop string and stripped."""
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        outputs: dict[int, str] = {}
        config = GenerationConfig(
            max_new_tokens=spec.max_new_tokens,
            do_sample=False,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
            stop_strings=list(spec.stop) or None,
        )
        for chunk in self.batches(order, desc="generate"):
            seqs = [list(prompts[i])[-self.max_length :] for i in chunk]
            width = max(map(len, seqs))
            input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            attention = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):  # left padding keeps every prompt's end at the same column
                input_ids[row, width - len(seq) :] = torch.tensor(seq)
                attention[row, width - len(seq) :] = 1
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
        input_ids = torch.tensor([list(prompt)[-self.max_length :]], device=self.device)
        generated = self.model.generate(input_ids=input_ids, generation_config=config, tokenizer=self.tokenizer)
        return [cut_at_stop(self.decode(row[input_ids.shape[1] :].tolist()), spec.stop) for row in generated]


def target_scores(logits: torch.Tensor, target_ids: torch.Tensor, lengths: Sequence[int]) -> list[TargetScore]:
    """One `TargetScore` per sequence from the logits predicting its target tokens (row-major, as
    `LM.target_logits` returns them) and the number of predicted target tokens of each sequence."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    token_lp = logprobs.gather(1, target_ids[:, None]).squeeze(1)
    predicted = logprobs.argmax(-1)
    results = []
    for lp, pred, target in zip(token_lp.split(lengths), predicted.split(lengths), target_ids.split(lengths)):
        hits = (pred == target).float()
        results.append(TargetScore(float(lp.sum()), len(lp), float(hits.mean()), tuple(pred.tolist())))
    return results


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """The text before the earliest stop string, stripped (leading whitespace too: answers follow ':')."""
    cut = len(text)
    for marker in stop:
        position = text.find(marker)
        if position != -1:
            cut = min(cut, position)
    return text[:cut].strip()
