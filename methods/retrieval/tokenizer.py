"""BM25's word tokeniser and its stop-word lists."""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

WORD = re.compile(r"\w+")


def stopword_list(stopwords: str | Sequence[str] | None) -> frozenset[str]:
    """`english`: bm25s's English list; a list: those words; `none` / null / []: keep every word."""
    if stopwords is None or (isinstance(stopwords, str) and stopwords.lower() == "none"):
        return frozenset()
    if isinstance(stopwords, str):
        if stopwords.lower() != "english":
            raise ValueError(f"method.stopwords must be 'english', 'none' or a list of words, got {stopwords!r}")
        from bm25s.stopwords import STOPWORDS_EN

        return frozenset(STOPWORDS_EN)
    return frozenset(word.lower() for word in stopwords)


class WordTokenizer:
    """BM25's tokeniser: lowercase, split into Unicode word characters (`\\w+`), drop stop words."""

    def __init__(self, stopwords: str | Sequence[str] | None = "english") -> None:
        self.stopwords = stopword_list(stopwords)

    def __call__(self, text: str) -> list[str]:
        return [word for word in WORD.findall(text.lower()) if word not in self.stopwords]

    def describe(self) -> dict[str, Any]:
        return {"rule": "lowercase, \\w+ words", "stopwords": sorted(self.stopwords)}
