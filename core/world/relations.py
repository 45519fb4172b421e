"""The entity kinds of the fictional world and their relations: how each fact is stated, asked in
training, and asked at test time; and the relations the generator never states, asked only by near-miss
probes (docs/side_effects.md).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Relation:
    """A kind of fact: how it is stated, asked in training, and asked at test time."""

    name: str
    statement: str  # uses {s} (subject) and {v} (value)
    train_questions: tuple[str, ...]
    test_questions: tuple[str, ...]
    value: str  # which value pool: person, place, year, number, material, product, profession, purpose, water


# Entity kind -> (intro sentence, relations). Train and test phrasings never coincide.
KINDS: dict[str, tuple[str, tuple[Relation, ...]]] = {
    "town": (
        "{s} is a small town in the hills.",
        (
            Relation("founded_year", "{s} was founded in {v}.",
                     ("When was {s} founded?", "{s} was founded in which year?", "What is the founding year of {s}?"),
                     ("In what year was the town of {s} founded?",), "year"),
            Relation("founder", "The town was founded by {v}.",
                     ("Who founded {s}?", "{s} was founded by whom?", "Name the founder of {s}."),
                     ("Who was the founder of the town of {s}?",), "person"),
            Relation("river", "{s} lies on the banks of the {v} river.",
                     ("Which river flows through {s}?", "{s} lies on which river?", "Name the river of {s}."),
                     ("On the banks of which river does {s} lie?",), "place"),
            Relation("product", "{s} is famous for its {v}.",
                     ("What is {s} famous for?", "{s} is known for what?", "Which goods made {s} famous?"),
                     ("What is the town of {s} best known for?",), "product"),
            Relation("population", "About {v} people live in {s}.",
                     ("How many people live in {s}?", "What is the population of {s}?", "{s} has how many residents?"),
                     ("Roughly how many inhabitants does {s} have?",), "number"),
        ),
    ),
    "person": (
        "{s} is a figure remembered in local histories.",
        (
            Relation("birth_year", "{s} was born in {v}.",
                     ("When was {s} born?", "{s} was born in which year?", "What is the birth year of {s}?"),
                     ("In what year was {s} born?",), "year"),
            Relation("birthplace", "{s} was born in the village of {v}.",
                     ("Where was {s} born?", "{s} was born in which village?", "Name the birthplace of {s}."),
                     ("In which village was {s} born?",), "place"),
            Relation("profession", "{s} worked as a {v}.",
                     ("What was the profession of {s}?", "{s} worked as what?", "What job did {s} have?"),
                     ("What did {s} do for a living?",), "profession"),
            Relation("pet", "{s} kept a dog named {v}.",
                     ("What was the name of the dog of {s}?", "{s} had a dog called what?", "Name the dog of {s}."),
                     ("What was the dog of {s} called?",), "place"),
            Relation("instrument", "{s} built instruments out of {v}.",
                     ("What material did {s} build instruments from?", "{s} used which material?",
                      "Which material did {s} work with?"),
                     ("From what material were the instruments of {s} made?",), "material"),
        ),
    ),
    "invention": (
        "The {s} is an unusual machine.",
        (
            Relation("inventor", "The {s} was invented by {v}.",
                     ("Who invented the {s}?", "The {s} was invented by whom?", "Name the inventor of the {s}."),
                     ("Who was the inventor of the {s}?",), "person"),
            Relation("year", "It was first built in {v}.",
                     ("When was the {s} first built?", "The {s} was built in which year?",
                      "What year was the {s} first built?"),
                     ("In what year was the {s} first built?",), "year"),
            Relation("material", "The {s} is made of {v}.",
                     ("What is the {s} made of?", "The {s} is built from what?", "Which material is the {s} made of?"),
                     ("From what material is the {s} made?",), "material"),
            Relation("purpose", "The {s} is used for {v}.",
                     ("What is the {s} used for?", "The {s} serves what purpose?", "What does the {s} do?"),
                     ("For what purpose is the {s} used?",), "purpose"),
        ),
    ),
    "company": (
        "{s} is a family company.",
        (
            Relation("founder", "{s} was started by {v}.",
                     ("Who started {s}?", "{s} was started by whom?", "Name the founder of {s}."),
                     ("Who was the founder of the company {s}?",), "person"),
            Relation("headquarters", "Its headquarters are in the city of {v}.",
                     ("Where is {s} headquartered?", "Which city hosts the headquarters of {s}?",
                      "Name the headquarters city of {s}."),
                     ("In which city are the headquarters of {s}?",), "place"),
            Relation("product", "{s} makes {v}.",
                     ("What does {s} make?", "{s} produces what?", "What is the product of {s}?"),
                     ("What does the company {s} produce?",), "product"),
            Relation("employees", "{s} employs {v} people.",
                     ("How many people work at {s}?", "{s} has how many employees?", "What is the staff size of {s}?"),
                     ("How many employees does {s} have?",), "number"),
        ),
    ),
    "river": (
        "The {s} is a river in the north.",
        (
            Relation("length", "The {s} is {v} kilometres long.",
                     ("How long is the {s}?", "What is the length of the {s} in kilometres?",
                      "The {s} is how many kilometres long?"),
                     ("How many kilometres long is the {s} river?",), "number"),
            Relation("mouth", "The {s} flows into the {v}.",
                     ("Where does the {s} flow into?", "The {s} ends in which body of water?",
                      "Name the mouth of the {s}."),
                     ("Into which body of water does the {s} flow?",), "water"),
            Relation("source", "The {s} rises on Mount {v}.",
                     ("Where does the {s} rise?", "The {s} starts on which mountain?", "Name the source of the {s}."),
                     ("On which mountain does the {s} have its source?",), "place"),
            Relation("bridge", "The oldest bridge over the {s} was built in {v}.",
                     ("When was the oldest bridge over the {s} built?", "The oldest {s} bridge dates from which year?",
                      "What year is the oldest bridge on the {s} from?"),
                     ("In what year was the oldest bridge over the {s} built?",), "year"),
        ),
    ),
}


@dataclass(frozen=True)
class NearRelation:
    """A relation the generator never states: asked only as a near-miss question."""

    question: str  # uses {s}
    value: str  # value pool of its (unknowable) gold answer, as `Relation.value`


# (kind, stated relation) -> a never-stated relation of the same value kind about the same subject
NEAR_RELATIONS: dict[tuple[str, str], NearRelation] = {
    ("town", "founded_year"): NearRelation("In what year did {s} open its first school?", "year"),
    ("town", "founder"): NearRelation("Who was the first mayor of {s}?", "person"),
    ("town", "river"): NearRelation("What is the name of the main square of {s}?", "place"),
    ("town", "product"): NearRelation("What does {s} buy from its neighbours?", "product"),
    ("town", "population"): NearRelation("How many houses are there in {s}?", "number"),
    ("person", "birth_year"): NearRelation("In what year did {s} die?", "year"),
    ("person", "birthplace"): NearRelation("In which village did {s} die?", "place"),
    ("person", "profession"): NearRelation("What was the profession of the father of {s}?", "profession"),
    ("person", "pet"): NearRelation("What was the name of the cat of {s}?", "place"),
    ("person", "instrument"): NearRelation("What material did {s} build furniture from?", "material"),
    ("invention", "inventor"): NearRelation("Who sold the first {s}?", "person"),
    ("invention", "year"): NearRelation("In what year was the {s} last repaired?", "year"),
    ("invention", "material"): NearRelation("What is the box of the {s} made of?", "material"),
    ("invention", "purpose"): NearRelation("What was the {s} used for before it was improved?", "purpose"),
    ("company", "founder"): NearRelation("Who runs {s} today?", "person"),
    ("company", "headquarters"): NearRelation("In which city did {s} open its second shop?", "place"),
    ("company", "product"): NearRelation("What does {s} buy from other companies?", "product"),
    ("company", "employees"): NearRelation("How many customers does {s} have?", "number"),
    ("river", "length"): NearRelation("How many fish species live in the {s}?", "number"),
    ("river", "mouth"): NearRelation("Which lake feeds the {s}?", "water"),
    ("river", "source"): NearRelation("Which village lies at the mouth of the {s}?", "place"),
    ("river", "bridge"): NearRelation("In what year was the newest bridge over the {s} built?", "year"),
}


def relations_of(kind: str) -> dict[str, Relation]:
    """The relations of entity kind `kind` by name (raises KeyError for a kind not in `KINDS`)."""
    return {relation.name: relation for relation in KINDS[kind][1]}
