"""Conversational-recommendation metrics: a title extractor, nearest-catalogue-title matching, and
Recall / NDCG / MRR @k per gold item with mean and standard error, per condition.

The protocol is He et al. (CIKM'23, "LLMs as Zero-Shot Conversational Recommenders"), which
SELF-PARAM used unchanged:
1. Parse the generation into list items (`extract_titles`, parser `he2023`): split once at the first
   "1." (no "1.": turn commas into line breaks), split into lines, and per line remove
   parenthesised text, collapse whitespace and strip a leading number ("3.", "3)", "3 -").
   Every line counts, blank ones and trailing prose included.
2. Map each item to the nearest catalogue title by Levenshtein distance on lowercased strings
   (`TitleMatcher`, rapidfuzz). Ties are broken deterministically: the catalogue is sorted
   (case-insensitive, then case-sensitive) and the first tied title wins. The reference took the
   first of a Python `set` (arbitrary, hash-seed dependent), so one tie can flip one hit.
3. Optionally keep only items within `oov_threshold` edits (reference: 2) and drop titles already
   mentioned in the dialogue (`exclude_seen`); the ranked list keeps its order and duplicates.
4. For each gold item: Recall@k = 1 if it is among the first k; NDCG@k = 1/log2(rank + 1) and
   MRR@k = 1/rank at its first position within the first k, else 0. The unit of averaging is a
   (turn, gold item) pair. Condition `discussion`: the gold title was mentioned before in the dialogue
   (`seen`); `recommendation`: it was not; `all`: both. Mean and standard error (sample standard
   deviation / sqrt(n), as pandas `sem`) per condition.

Parser `robust` copes with what small base models write (HTML/markdown, quotes, "1997: Title",
descriptions after " - ", preambles, trailing prose, repeats): see `extract_titles_robust`. It is a
different protocol and is named in every metric's protocol string.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from metrics.uncertainty import mean_se

PARSERS = ("he2023", "robust")
CONDITIONS = ("recommendation", "discussion", "all")
METRIC_FAMILIES = ("recall", "ndcg", "mrr")
DEFAULT_KS = (1, 5, 10, 20)

_PARENTHESES = re.compile(r"\([^()]*\)")  # innermost (...) only, as the reference
_SPACES = re.compile(r"\s+")
_LEADING_NUMBER = re.compile(r"^(?:\d+[\.\)、]?\s*[\-\—\–]?\s*)?")


def strip_parentheses(text: str) -> str:
    return _PARENTHESES.sub("", text)


def collapse_spaces(text: str) -> str:
    return _SPACES.sub(" ", text).strip()


def strip_numbering(text: str) -> str:
    return _LEADING_NUMBER.sub("", text, count=1)


def clean_item(line: str) -> str:
    """One list line as the reference cleans it: parentheses, then whitespace, then the leading number."""
    return strip_numbering(collapse_spaces(strip_parentheses(line.strip())))


def extract_titles_he2023(text: str) -> list[str]:
    """The reference's list items, exactly (blank lines and prose lines included)."""
    if "1." in text:
        text = text.split("1.", 1)[1]  # everything before the first "1." is preamble
    else:
        text = text.replace(",", "\n")
    return [clean_item(line) for line in text.split("\n")]


# ---------------------------------------------------------------- robust parser
_INLINE_FIRST_ITEM = re.compile(r"(?<![\w.])(1[.)]\s)")  # "... [/INST] 1. Title": a list starting mid-line
_MARKED_LINE = re.compile(r"^\s*(?:\d{1,3}\s*[.)、:]|[-*•·]|#{1,6})\s*")
_MARKUP = re.compile(r"<[^>]*>|\*\*|__|[*`]")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_QUOTES = "\"'“”‘’«»"
_LEADING_YEAR = re.compile(r"^(?:19|20)\d\d\s*[:\-–—.,]\s*")
_TRAILING_YEAR = re.compile(r"\s*[,\-–—:/]\s*(?:19|20)\d\d\s*$")
_DESCRIPTION_DASH = re.compile(r"\s+[-–—]\s+")
_MAX_TITLE_WORDS_AFTER_DASH = 4  # more words after " - " than this: a description, not a subtitle


def _clean_robust(item: str) -> str:
    item = _MARKUP.sub("", item)
    item = collapse_spaces(_BRACKETS.sub("", strip_parentheses(item)))
    parts = _DESCRIPTION_DASH.split(item, maxsplit=1)
    if len(parts) == 2 and len(parts[1].split()) > _MAX_TITLE_WORDS_AFTER_DASH:
        item = parts[0]
    item = _TRAILING_YEAR.sub("", _LEADING_YEAR.sub("", item.strip()))
    item = item.strip().strip(_QUOTES).strip().rstrip(".,;:!").strip().strip(_QUOTES).strip()
    return collapse_spaces(item)


def extract_titles_robust(text: str) -> list[str]:
    """List items of messy generations.

    A first item "1." after other text on its line (an echoed prompt, "Sure! 1. Heat") starts a new
    line. If any line starts with a list marker (a number with ".", ")" or ":", a bullet "-", "*", "•",
    or a markdown heading), only those lines are items: preambles and trailing prose are dropped. Otherwise
    every line, split at commas, is an item (the reference's fallback). Each item loses markup (HTML
    tags, ** and *, backticks), bracketed and parenthesised text, a description after " - " longer
    than four words, a year before ":"/"-" or after ","/"-", surrounding quotes and end punctuation.
    Empty items are dropped.
    """
    lines = _INLINE_FIRST_ITEM.sub(r"\n\1", text, count=1).split("\n")
    marked = [line for line in lines if _MARKED_LINE.match(line)]
    if marked:
        items = [_MARKED_LINE.sub("", line, count=1) for line in marked]
    else:
        items = [part for line in lines for part in line.split(",")]
    return [title for title in map(_clean_robust, items) if title]


def extract_titles(text: str, parser: str = "he2023") -> list[str]:
    """The list items of a generation, in order, by the named parser (see `PARSERS`)."""
    if parser == "he2023":
        return extract_titles_he2023(text)
    if parser == "robust":
        return extract_titles_robust(text)
    raise ValueError(f"unknown title parser {parser!r}; choose one of {PARSERS}")


# ---------------------------------------------------------------- catalogue matching
@dataclass(frozen=True)
class TitleMatch:
    """A parsed item, its nearest catalogue title, and their edit distance (lowercased)."""

    item: str
    title: str
    distance: int


class TitleMatcher:
    """Nearest catalogue title by Levenshtein distance on lowercased strings (rapidfuzz).

    Ties: the catalogue is sorted case-insensitively (then case-sensitively) and the first title at
    the minimal distance wins (numpy `argmin` returns the first minimum). Results are cached per item.
    """

    _CHUNK = 256  # items per distance matrix (256 x catalogue int32: ~18 MB for INSPIRED's 17k titles)

    def __init__(self, titles: Iterable[str]) -> None:
        self.titles = sorted(set(titles), key=lambda t: (t.lower(), t))
        if not self.titles:
            raise ValueError("the title catalogue is empty")
        self._lowered = [t.lower() for t in self.titles]
        self._known = set(self.titles)
        self._cache: dict[str, TitleMatch] = {}

    def __len__(self) -> int:
        return len(self.titles)

    def __contains__(self, title: str) -> bool:
        return title in self._known

    def nearest(self, item: str) -> TitleMatch:
        return self.match_all([item])[0]

    def match_all(self, items: Sequence[str]) -> list[TitleMatch]:
        """The nearest title of every item; new items are matched in chunks with `rapidfuzz.process.cdist`."""
        todo = list(dict.fromkeys(item for item in items if item not in self._cache))
        for start in range(0, len(todo), self._CHUNK):
            chunk = todo[start : start + self._CHUNK]
            distances = process.cdist([item.lower() for item in chunk], self._lowered,
                                      scorer=Levenshtein.distance, dtype=np.int32, workers=1)
            best = distances.argmin(axis=1)  # the first minimum: catalogue order breaks ties
            for item, index, row in zip(chunk, best, distances):
                self._cache[item] = TitleMatch(item, self.titles[index], int(row[index]))
        return [self._cache[item] for item in items]


# ---------------------------------------------------------------- ranking and metrics
def ranked_titles(
    matches: Sequence[TitleMatch],
    seen: Iterable[str] = (),
    oov_threshold: int | None = None,
    exclude_seen: bool = False,
    dedupe: bool = False,
) -> list[str]:
    """The ranked catalogue titles: optionally within `oov_threshold` edits, without `seen` titles,
    and without repeats (first occurrence kept). The reference keeps repeats (`dedupe=False`)."""
    seen = set(seen)
    ranked = [m.title for m in matches if oov_threshold is None or m.distance <= oov_threshold]
    if exclude_seen:
        ranked = [t for t in ranked if t not in seen]
    if dedupe:
        ranked = list(dict.fromkeys(ranked))
    return ranked


def gold_scores(ranked: Sequence[str], gold: str, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall@k, NDCG@k and MRR@k of one gold title in one ranked list (first occurrence counts)."""
    try:
        rank = ranked.index(gold) + 1
    except ValueError:
        rank = None
    scores: dict[str, float] = {}
    for k in ks:
        hit = rank is not None and rank <= k
        scores[f"recall@{k}"] = float(hit)
        scores[f"ndcg@{k}"] = 1.0 / math.log2(rank + 1) if hit else 0.0
        scores[f"mrr@{k}"] = 1.0 / rank if hit else 0.0
    return scores


def condition_of(gold: str, seen: Iterable[str]) -> str:
    """`discussion` if the gold title was already mentioned in the dialogue, else `recommendation`."""
    return "discussion" if gold in set(seen) else "recommendation"


def metric_names(ks: Sequence[int] = DEFAULT_KS) -> list[str]:
    """Names in the reference's column order: for each k, recall, ndcg, mrr."""
    return [f"{family}@{k}" for k in ks for family in METRIC_FAMILIES]


@dataclass(frozen=True)
class GoldResult:
    """The metrics of one (turn, gold item) pair and its condition."""

    gold: str
    condition: str
    scores: dict[str, float]


def score_turn(
    ranked: Sequence[str], golds: Sequence[str], seen: Iterable[str], ks: Sequence[int] = DEFAULT_KS
) -> list[GoldResult]:
    """One `GoldResult` per gold title of a turn (a turn with k gold items counts k times)."""
    seen = set(seen)
    return [GoldResult(g, condition_of(g, seen), gold_scores(ranked, g, ks)) for g in golds]


def summarize_by_condition(
    results: Sequence[GoldResult], ks: Sequence[int] = DEFAULT_KS
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """`{condition: {"recall@1": {"mean", "se", "n"}, ...}}` for recommendation, discussion and all."""
    table: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for condition in CONDITIONS:
        chosen = [r for r in results if condition == "all" or r.condition == condition]
        table[condition] = {name: mean_se([r.scores[name] for r in chosen]) for name in metric_names(ks)}
    return table


def format_table(table: dict[str, dict[str, dict[str, float | int | None]]]) -> str:
    """A plain-text table: one row per condition, one column per metric, `mean ± se`, and n."""
    import pandas as pd

    def cell(entry: dict) -> str:
        if entry["mean"] is None:
            return "-"
        return f"{entry['mean']:.4f}" + ("" if entry["se"] is None else f" ± {entry['se']:.4f}")

    rows = []
    for condition, metrics in table.items():
        n = next(iter(metrics.values()))["n"] if metrics else 0
        rows.append({"condition": condition, "n": n, **{name: cell(v) for name, v in metrics.items()}})
    return pd.DataFrame(rows).set_index("condition").to_string()
