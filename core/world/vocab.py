"""The fictional world's vocabulary: syllables for invented names, and the pools facts' values come from.

Every draw takes the caller's `random.Random`, so a generator's output is fixed by its seed; changing
the order or number of draws here changes every generated data set (tests pin some of them).
"""
from __future__ import annotations

import random

ONSETS = ["b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "qu", "r", "s", "st", "t", "th", "v", "z"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "s", "th", "m", "x"]
MATERIALS = ["copper", "glass", "cedar", "slate", "amber", "tin", "marble", "bamboo", "clay", "silver"]
PRODUCTS = ["bells", "lanterns", "cheese", "rope", "violins", "maps", "clocks", "honey", "kites", "boots"]
PROFESSIONS = ["astronomer", "glassblower", "cartographer", "beekeeper", "clockmaker", "botanist", "violinist"]
PURPOSES = ["measuring rainfall", "sorting seeds", "cooling bread", "tuning bells", "drying ink", "counting sheep"]
WATERS = ["Lake", "Bay of", "Sea of", "Gulf of"]
VALUE_KINDS = ("person", "place", "year", "number", "water", "material", "product", "profession", "purpose")


def make_name(rng: random.Random, syllables: int) -> str:
    """An invented, capitalised name of `syllables` onset-vowel-coda syllables, e.g. "Brouthkil"."""
    return "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS) for _ in range(syllables)).capitalize()


def draw_value(kind: str, rng: random.Random) -> str:
    """A value of the pool `kind` (one of `VALUE_KINDS`, as `Relation.value` names it): an invented
    person or place name, a year, a round number, a body of water, or a word from a fixed pool.
    Raises KeyError for an unknown kind."""
    if kind == "person":
        return f"{make_name(rng, 2)} {make_name(rng, 2)}"
    if kind == "place":
        return make_name(rng, rng.choice([2, 3]))
    if kind == "year":
        return str(rng.randint(1600, 1990))
    if kind == "number":
        return str(rng.randint(12, 980) * rng.choice([10, 100]))
    if kind == "water":
        return f"{rng.choice(WATERS)} {make_name(rng, 2)}"
    pools = {"material": MATERIALS, "product": PRODUCTS, "profession": PROFESSIONS, "purpose": PURPOSES}
    return rng.choice(pools[kind])


def draw_subject(entity_kind: str, rng: random.Random) -> str:
    """The name of a new entity of `entity_kind` (a key of `core.world.relations.KINDS`): a person's
    first and last name, else one three-syllable name."""
    return draw_value("person", rng) if entity_kind == "person" else make_name(rng, 3)
