"""The module RECIPE trains beside its encoder: the knowledge and query heads, the sentinel and the
prompt generator (Chen et al. 2024; qizhou000/RECIPE `editors/recipe/models.py`), and the text features
they read."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class ResidualHead(nn.Module):
    """x ↦ W₁x + ReLU(W₂W₁x): the reference's representation transform."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.project = nn.Linear(in_dim, out_dim)
        self.refine = nn.Linear(out_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.project(x)
        return x + F.relu(self.refine(x))


class RecipeModule(nn.Module):
    """What RECIPE trains beside the encoder: feature standardisation, the two heads, the sentinel, the
    prompt generator. `sentinel` is `[sentinel_tokens, token_dim]` token states (`encoder_tokens`) or
    one standardised feature vector (`feature_vector`)."""

    def __init__(self, feature_dim: int, token_dim: int, rep_dim: int, hidden_size: int, prompt_tokens: int, *,
                 cosine: bool, sentinel: str, sentinel_tokens: int, head_init: str) -> None:
        super().__init__()
        self.rep_dim, self.hidden_size, self.prompt_tokens, self.cosine = rep_dim, hidden_size, prompt_tokens, cosine
        self.sentinel_mode = sentinel
        # identity unless `standardise`: then the training split's statistics (the earlier CPU variant)
        self.register_buffer("feature_mean", torch.zeros(feature_dim))
        self.register_buffer("feature_std", torch.ones(feature_dim))
        self.knowledge_head = ResidualHead(feature_dim, rep_dim)
        self.query_head = ResidualHead(feature_dim, rep_dim)
        if sentinel == "encoder_tokens":  # the reference's initialisation: uniform in ±0.05
            self.sentinel = nn.Parameter((torch.rand(sentinel_tokens, token_dim) - 0.5) * 0.1)
        else:  # the average text, in standardised features
            self.sentinel = nn.Parameter(torch.zeros(feature_dim))
        self.prompt_body = nn.Linear(rep_dim, rep_dim)
        self.prompt_out = nn.Linear(rep_dim, prompt_tokens * hidden_size)
        if head_init == "shared_projection":
            # Both heads start as the same random projection with a silent residual layer: sim(q, k) is
            # then close to the encoder's own inner product of q and k, so a short training departs from
            # a retriever that already works (the reference initialises both heads at random).
            with torch.no_grad():
                for head in (self.knowledge_head, self.query_head):
                    nn.init.zeros_(head.refine.weight)
                    nn.init.zeros_(head.refine.bias)
                    nn.init.zeros_(head.project.bias)
                nn.init.normal_(self.knowledge_head.project.weight, std=feature_dim ** -0.5)
                self.query_head.project.weight.copy_(self.knowledge_head.project.weight)

    def standardise(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.feature_mean) / self.feature_std

    def knowledge(self, features: torch.Tensor) -> torch.Tensor:
        return self.knowledge_head(self.standardise(features))

    def query(self, features: torch.Tensor) -> torch.Tensor:
        return self.query_head(self.standardise(features))

    def prompts(self, reps: torch.Tensor) -> torch.Tensor:
        """`[n, prompt_tokens, hidden]` continuous prompts of knowledge representations."""
        x = reps + F.relu(self.prompt_body(reps))
        return self.prompt_out(x).view(len(reps), self.prompt_tokens, self.hidden_size)

    def similarity(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        if self.cosine:
            return F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
        return queries @ keys.T / math.sqrt(self.rep_dim)


def pooled_features(tokens: torch.Tensor, mask: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
    """`[n, 4 × width]`: [sentence embedding, mean, max, min] of the token states under `mask`."""
    mask = mask.unsqueeze(-1).bool()
    mean = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1)
    high = tokens.masked_fill(~mask, float("-inf")).max(1).values
    low = tokens.masked_fill(~mask, float("inf")).min(1).values
    return torch.cat([sentence, mean, high, low], dim=1)

