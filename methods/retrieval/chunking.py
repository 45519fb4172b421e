"""Cutting a text's tokens into overlapping windows: the passages RAG stores (methods/rag.py)."""
from __future__ import annotations


def chunk_spans(n_tokens: int, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Token windows [start, end) of at most `chunk_tokens` covering `n_tokens`, consecutive windows
    sharing `overlap` tokens; one window when it all fits (`chunk_tokens` 0 = never split)."""
    if chunk_tokens < 0 or overlap < 0 or (chunk_tokens and overlap >= chunk_tokens):
        raise ValueError(f"need chunk_tokens >= 0 and 0 <= chunk_overlap < chunk_tokens, got {chunk_tokens}, {overlap}")
    if chunk_tokens == 0 or n_tokens <= chunk_tokens:
        return [(0, n_tokens)]
    stride, spans = chunk_tokens - overlap, []
    for start in range(0, n_tokens, stride):
        spans.append((start, min(start + chunk_tokens, n_tokens)))
        if start + chunk_tokens >= n_tokens:
            break
    return spans
