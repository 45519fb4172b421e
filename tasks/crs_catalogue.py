"""A CRS dataset's catalogue: `entity2id.json` (DBpedia URI -> id; titles derived from the URIs exactly as
the He et al. CIKM'23 reference does) and `item_ids.json` (the recommendable items) of one dataset folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.io import read_json
from core.types import DataError
from metrics import ranking

ENTITY_FORMAT = 'a JSON object {"<http://dbpedia.org/resource/Title_(film)>": item id, ...}'
ITEMS_FORMAT = "a JSON list of recommendable item ids"
CATALOGUES = ("entities", "items")


def entity_title(uri: str) -> str:
    """A title from a DBpedia URI as the reference derives it: the last path segment, with "_", "-"
    and ">" as spaces, parenthesised parts removed, whitespace collapsed ("<.../Hoffa_(film)>" -> "Hoffa")."""
    segment = uri.split("/")[-1].replace("_", " ").replace("-", " ").replace(">", " ")
    return ranking.collapse_spaces(ranking.strip_parentheses(segment))


@dataclass(frozen=True)
class Catalogue:
    """Titles of a dataset's entities; `item_ids` are the recommendable ones."""

    id_to_title: dict[int, str]
    item_ids: frozenset[int]

    def titles(self, which: str) -> list[str]:
        """`entities`: every entity title (the reference's candidate set: movies, people, genres);
        `items`: only recommendable items."""
        if which == "entities":
            return sorted(set(self.id_to_title.values()))
        if which == "items":
            return sorted({self.id_to_title[i] for i in self.item_ids})
        raise ValueError(f"catalogue must be one of {CATALOGUES}, got {which!r}")

    def title(self, entity_id: int, where: str) -> str:
        try:
            return self.id_to_title[int(entity_id)]
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: entity id {entity_id!r} is not in entity2id.json") from None


def load_catalogue(dataset_dir: str | Path) -> Catalogue:
    """`entity2id.json` and `item_ids.json` of a CRS dataset folder."""
    folder = Path(dataset_dir)
    entities = read_json(folder / "entity2id.json", ENTITY_FORMAT)
    items = read_json(folder / "item_ids.json", ITEMS_FORMAT)
    if not isinstance(entities, dict) or not entities:
        raise DataError(f"{folder / 'entity2id.json'}: expected {ENTITY_FORMAT}")
    if not isinstance(items, list):
        raise DataError(f"{folder / 'item_ids.json'}: expected {ITEMS_FORMAT}")
    id_to_title: dict[int, str] = {}
    first_uri: dict[int, str] = {}
    for uri, i in entities.items():
        if isinstance(i, bool) or not isinstance(i, int):
            raise DataError(f"{folder / 'entity2id.json'}: the id of {uri!r} must be a number, got {i!r}. Expected {ENTITY_FORMAT}")
        if i in first_uri:  # two URIs under one id: one title would silently replace the other
            raise DataError(f"{folder / 'entity2id.json'}: id {i} is given to both {first_uri[i]!r} and {uri!r}; "
                            "every entity needs its own id")
        first_uri[i], id_to_title[i] = uri, entity_title(uri)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in items):
        raise DataError(f"{folder / 'item_ids.json'}: every item id must be a number. Expected {ITEMS_FORMAT}")
    unknown = [i for i in items if int(i) not in id_to_title]
    if unknown:
        raise DataError(f"{folder / 'item_ids.json'}: ids {unknown[:5]} are not in entity2id.json")
    return Catalogue(id_to_title, frozenset(int(i) for i in items))
