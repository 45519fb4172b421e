"""General English text (WikiText-2 by default): regularisation chunks, unrelated prompts, drift text.

The SELF-PARAM reference regularises with SlimPajama documents cut to their first 256 tokens, a new
one for every QA step (SELF-PARAM `slimpajama.py`: `max_length=256`; `self_param.py`:
`next(self.pretrained_data_iter)`). No package ships SlimPajama; `../shared/data/wikitext2/` holds
WikiText-2 in its *tokenised* release, which this module reads:

- `detokenise(line)`: undo the release's tokenisation (` @-@ ` → `-`, ` @,@ ` → `,`, ` @.@ ` → `.`,
  no space before `, . ; : ) '` or after `(`);
- `read_sentences(path)`: one article's paragraphs split into sentences, in file order; headings
  (` = Title = `) are dropped and so is every sentence containing `<unk>` (training on the literal
  placeholder would teach it); sentences shorter than `min_words` (fragments of lists, captions) too;
- `chunks(sentences, encode, max_tokens)`: consecutive sentences of one article packed into chunks of
  at most `max_tokens` tokens (the reference's "document cut at 256 tokens").

Plain text files (one text per line) and JSONL (`{"text": ...}`) are read as they are.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

from core.io import note_input, read_jsonl_numbered, read_lines, text_field

log = logging.getLogger(__name__)

#: where the shared data folder keeps WikiText-2, relative to the repository root (the working directory
#: of `run.py`); KBENCH_DATA points elsewhere in the YAML (`${oc.env:KBENCH_DATA,../shared/data}`)
WIKITEXT2 = ("../shared/data/wikitext2/valid.txt", "../shared/data/wikitext2/test.txt")

_JOINS = [(" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")]
_SPACE_BEFORE = re.compile(r" ([,.;:)'])")  # "film , television" -> "film, television"; "it 's" -> "it's"
_SPACE_AFTER = re.compile(r"\( ")
_HEADING = re.compile(r"^\s*=(?: =)*\s.*\s=(?: =)*\s*$")
_SENTENCE_END = re.compile(r"(?<=[.!?]) (?=[A-Z0-9\"])")


def detokenise(line: str) -> str:
    """WikiText's tokenised form back to ordinary text (see the module docstring)."""
    text = line.strip()
    for marked, plain in _JOINS:
        text = text.replace(marked, plain)
    text = _SPACE_BEFORE.sub(r"\1", text)
    text = _SPACE_AFTER.sub("(", text)
    return " ".join(text.split())


def is_heading(line: str) -> bool:
    """` = Title = `, ` = = Section = = `: WikiText's article and section headings."""
    return bool(_HEADING.match(line))


def read_sentences(path: str | Path, min_words: int = 8) -> list[list[str]]:
    """Sentences of a WikiText file grouped by article (file order), detokenised, `<unk>` ones dropped."""
    articles: list[list[str]] = []
    for _, line in read_lines(path, "WikiText: one paragraph per line, ' = Title = ' headings"):
        if is_heading(line):
            if re.match(r"^\s*= [^=]", line):  # a top-level title starts a new article
                articles.append([])
            continue
        if not articles:
            articles.append([])
        # split on the tokenised text (sentence ends are " . " there), then detokenise each sentence
        for raw in re.split(r"(?<= [.!?]) (?=[A-Z0-9\"])", line.strip()):
            if "<unk>" in raw or len(raw.split()) < min_words:
                continue
            articles[-1].append(detokenise(raw))
    return [article for article in articles if article]


def read_texts(path: str | Path, min_words: int = 8) -> list[list[str]]:
    """Texts of a general-text file, grouped into documents: WikiText (`*.txt` with ` = Title = ` headings)
    by article and sentence; other `.txt` one document per line; `.jsonl` one per `{"text": ...}` row."""
    path = Path(path)
    note_input(path)
    if path.suffix == ".jsonl":
        fmt = 'JSON lines {"text": <string>}'
        rows = read_jsonl_numbered(path, required=("text",), expected_format=fmt)
        return [[text] for text in (text_field(row, "text", where, fmt) for where, row in rows) if text.strip()]
    lines = read_lines(path, "one text per line")
    if any(is_heading(line) for _, line in lines[:50]):
        return read_sentences(path, min_words)
    return [[line] for _, line in lines if line.strip()]  # an empty line is no text: skipped


def chunks(documents: Sequence[Sequence[str]], encode: Callable[[str], list[int]], max_tokens: int) -> list[list[int]]:
    """Token chunks of at most `max_tokens`: consecutive sentences of one document, a long one cut."""
    out: list[list[int]] = []
    for document in documents:
        current: list[int] = []
        for sentence in document:
            ids = encode(sentence if not current else " " + sentence)
            if current and len(current) + len(ids) > max_tokens:
                out.append(current)
                current, ids = [], encode(sentence)
            current += ids[: max_tokens - len(current)]
        if current:
            out.append(current)
    return out


def available(paths: Sequence[str | Path]) -> list[Path]:
    """The paths that exist; logs a warning naming each missing one."""
    found = [Path(p) for p in paths if Path(p).is_file()]
    for missing in (p for p in paths if not Path(p).is_file()):
        log.warning("general text %s is missing (the shared data folder is not at ../shared?)", missing)
    return found
