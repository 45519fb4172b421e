"""Score raw conversational-recommendation generations from anywhere (an API model, another harness).

    python -m runners.rescore_crs --generations FILE.jsonl --dataset-dir DIR \\
        [--oov-threshold N] [--exclude-seen] [--out FILE.json] [--parser he2023|robust] \\
        [--catalogue entities|items] [--dedupe]

Each line of FILE.jsonl is `{"generation": str, "gold": [titles], "seen": [titles]}` (`seen`: titles
mentioned earlier in the dialogue); lines with an empty `gold` are not evaluated. The catalogue is
read from DIR (`entity2id.json`, `item_ids.json`). Without `--oov-threshold` every parsed item
counts; with it, only items within N edits of a catalogue title (the reference used 2). Prints the
per-condition table; `--out` writes `{condition: {"recall@1": {"mean", "se", "n"}, ...}}` for
`recommendation`, `discussion` and `all`. The protocol is `metrics/ranking.py`'s.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.io import atomic_write_json, read_jsonl_numbered
from core.types import DataError, KBenchError
from metrics import ranking
from tasks.crs_catalogue import CATALOGUES, load_catalogue

GENERATIONS_FORMAT = 'JSON lines {"generation": str, "gold": [titles], "seen": [titles]}'

# one matcher per (dataset dir, catalogue) in a process: its cache is shared by repeated calls of `main`
_MATCHERS: dict[tuple[str, str], ranking.TitleMatcher] = {}


def matcher_for(dataset_dir: str | Path, catalogue: str) -> ranking.TitleMatcher:
    key = (str(Path(dataset_dir).resolve()), catalogue)
    if key not in _MATCHERS:
        _MATCHERS[key] = ranking.TitleMatcher(load_catalogue(dataset_dir).titles(catalogue))
    return _MATCHERS[key]


def _titles(row: dict, key: str, where: str) -> list[str]:
    value = row.get(key, [])
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise DataError(f"{where}: {key!r} must be a list of title strings, got {value!r}. Expected {GENERATIONS_FORMAT}.")
    return value


def read_generations(path: str | Path) -> list[dict[str, Any]]:
    """The lines of a generations file; any malformed line raises `DataError` naming file:line."""
    rows = []
    for where, row in read_jsonl_numbered(path, ("generation", "gold"), GENERATIONS_FORMAT):
        if not isinstance(row["generation"], str):
            raise DataError(f"{where}: 'generation' must be a string, got {type(row['generation']).__name__}.")
        rows.append({"generation": row["generation"], "gold": _titles(row, "gold", where),
                     "seen": _titles(row, "seen", where), "line": int(where.rsplit(":", 1)[1])})
    if not rows:
        raise DataError(f"{path}: no generations. Expected {GENERATIONS_FORMAT}.")
    return rows


def rescore(
    rows: Sequence[dict[str, Any]],
    matcher: ranking.TitleMatcher,
    oov_threshold: int | None = None,
    exclude_seen: bool = False,
    parser: str = "he2023",
    dedupe: bool = False,
    ks: Sequence[int] = ranking.DEFAULT_KS,
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """The per-condition table of a list of {generation, gold, seen} rows."""
    golds: list[ranking.GoldResult] = []
    for row in rows:
        if not row["gold"]:
            continue  # only turns with a gold recommendation are evaluated
        matches = matcher.match_all(ranking.extract_titles(row["generation"], parser))
        ranked = ranking.ranked_titles(matches, row["seen"], oov_threshold, exclude_seen, dedupe)
        golds += ranking.score_turn(ranked, row["gold"], row["seen"], ks)
    if not golds:
        raise DataError("no line has a gold title: nothing to evaluate")
    return ranking.summarize_by_condition(golds, ks)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m runners.rescore_crs", description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", required=True, help=GENERATIONS_FORMAT)
    parser.add_argument("--dataset-dir", required=True, help="folder with entity2id.json and item_ids.json")
    parser.add_argument("--oov-threshold", type=int, default=None, metavar="N",
                        help="keep only items within N edits of a catalogue title (reference: 2); default: keep all")
    parser.add_argument("--exclude-seen", action="store_true", help="drop titles already mentioned in the dialogue")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    parser.add_argument("--parser", choices=ranking.PARSERS, default="he2023", help="list extractor (default: the reference's)")
    parser.add_argument("--catalogue", choices=CATALOGUES, default="entities",
                        help="candidate titles: every entity (reference) or only recommendable items")
    parser.add_argument("--dedupe", action="store_true", help="drop repeated titles from the ranking (not the reference)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, dict[str, float | int | None]]]:
    args = build_parser().parse_args(argv)
    if args.oov_threshold is not None and args.oov_threshold < 0:
        raise SystemExit("--oov-threshold must be >= 0")
    try:
        rows = read_generations(args.generations)
        matcher = matcher_for(args.dataset_dir, args.catalogue)
        unknown = sorted({g for row in rows for g in row["gold"] if g not in matcher})
        if unknown:
            print(f"warning: {len(unknown)} gold title(s) are not catalogue titles and can never be hit, "
                  f"e.g. {unknown[:3]}", file=sys.stderr)
        table = rescore(rows, matcher, args.oov_threshold, args.exclude_seen, args.parser, args.dedupe)
    except KBenchError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    setting = (f"parser={args.parser}, catalogue={args.catalogue}, oov-threshold={args.oov_threshold}, "
               f"exclude-seen={args.exclude_seen}, dedupe={args.dedupe}")
    print(f"{args.generations} ({len(rows)} lines; {setting})")
    print(ranking.format_table(table))
    if args.out:
        atomic_write_json(args.out, table)
        print(f"wrote {args.out}")
    return table


if __name__ == "__main__":
    main()
