"""Conversational recommendation (`task=inspired`, `task=redial`): He et al. CIKM'23 protocol, as
used by SELF-PARAM.

Data: a CRS test file in the He et al. / CRSLab format (one line per recommender turn: `input`, the
dialogue so far as "System:"/"User:" lines ending with "System: "; `rec`, the gold item ids;
`prev_entity`, ids mentioned so far; `dialog_id`, `turn_id`), with `entity2id.json` (DBpedia URI ->
id; titles are derived from the URIs exactly as the reference does) and `item_ids.json` (the
recommendable items) beside it. Only recommender turns with a gold `rec` are evaluated.

Probe: the reference prompt with the dialogue filled in, rendered as plain text, plus an optional
`answer_prefix` (a base model without a chat template continues a dialogue instead of answering; the
prefix cues a numbered list). The scored text is `answer_prefix + generation`, greedy, at most
`max_new_tokens`. Scoring is `metrics.ranking` (title extraction, nearest catalogue title by edit
distance, Recall/NDCG/MRR@k per gold item, per condition).

Knowledge to inject: whole dialogues from a source disjoint from the evaluated turns, one
`Knowledge` per dialogue (its context is the rendered dialogue). Sources:
- `split` (default): the test file's own dialogues, split by `dialog_id` with a seeded shuffle: a
  `knowledge_fraction` of the dialogues is only injected, the rest only evaluated.
- `crs_jsonl`: the dialogues of another file in the same format (e.g. ReDial's when evaluating
  INSPIRED, like the paper's use of ReDial conversations); every turn of the test file is evaluated.
- `redial_conversations`: ReDial's original release (`conversations.json` as a JSON array, or
  `train_data.jsonl` as JSON lines: `messages`, `initiatorWorkerId`, `movieMentions`).
- `none`: nothing is injected (e.g. to score the base model on every turn).
Each dialogue also carries target sentences for FT(S)/SELF-PARAM, one per recommendation in it
(`sentence_template`: the user's request and the recommended titles), so sentence-trained methods learn
what the dialogue teaches (which titles were recommended for which request) without a generator.

Steps: one step: reset, inject every chosen dialogue at once, then one probe set of every evaluated turn.
"""
from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from core.io import FirstSeen, read_json, read_jsonl_numbered, read_records, text_field, write_jsonl
from core.options import checked
from core.types import NonNegativeInt, PositiveInt
from core.types import Answer, DataError, GenerationSpec, Knowledge, Probe, ProbeSet, Query, Step, TargetScore
from metrics import ranking
from tasks.base import MetricSample, ProbeResult, Task

REFERENCE_PROMPT = (
    "Pretend you are a movie recommender system. \n I will give you a conversation between a user and you "
    "(a recommender system). Based on the conversation, you reply me with 20 recommendations without extra "
    "sentences.\n Here is the conversation: {dialogue}"
)
CRS_FORMAT = (
    'JSON lines with "input" (the dialogue as System:/User: lines), "rec" (gold item ids), "prev_entity", '
    '"dialog_id", "turn_id" (the He et al. CIKM\'23 / CRSLab test format)'
)
ENTITY_FORMAT = 'a JSON object {"<http://dbpedia.org/resource/Title_(film)>": item id, ...}'
ITEMS_FORMAT = "a JSON list of recommendable item ids"
REDIAL_FORMAT = (
    'ReDial conversations: a JSON array (conversations.json) or JSON lines (train_data.jsonl) of objects with '
    '"messages" [{"text", "senderWorkerId"}], "initiatorWorkerId", "movieMentions" {id: "Title (Year)"}'
)
KNOWLEDGE_SOURCES = ("split", "crs_jsonl", "redial_conversations", "none")
CATALOGUES = ("entities", "items")
_SPEAKER = re.compile(r"^(?:User|System):\s*")
_REDIAL_MENTION = re.compile(r"@(\d+)")


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


@dataclass(frozen=True)
class CRSTurn:
    """One evaluated recommender turn: the dialogue so far, what the recommender then recommended,
    and the titles mentioned before it."""

    dialog_id: str
    turn_id: str
    dialogue: str
    response: str
    gold: tuple[str, ...]
    seen: tuple[str, ...]
    request: str  # the utterance the recommender answers (the last one before `response`)

    @property
    def id(self) -> str:
        return f"{self.dialog_id}/{self.turn_id}"


def _request(row: dict) -> str:
    """The utterance just before the recommender's turn: the last non-empty `context` entry (the
    rendered `input` labels speakers by position and is sometimes wrong), else the last line of `input`."""
    context = [str(u).strip() for u in row.get("context") or [] if str(u).strip()]
    if context:
        return context[-1]
    lines = [line for line in row["input"].strip().split("\n") if line.strip() and line.strip() != "System:"]
    return _SPEAKER.sub("", lines[-1]).strip() if lines else ""


def _ids(row: dict, key: str, where: str) -> list[int]:
    """A list of entity ids (numbers); anything else is refused naming file:line."""
    value = row[key]
    if not isinstance(value, list) or any(isinstance(i, bool) or not isinstance(i, int | str) for i in value):
        raise DataError(f"{where}: field {key!r} must be a list of item ids, got {value!r}. Expected {CRS_FORMAT}.")
    return value


def load_crs_turns(path: str | Path, catalogue: Catalogue, dropped: dict[str, int] | None = None) -> list[CRSTurn]:
    """The recommender turns with a gold recommendation of a CRS test file, in file order.

    Fields must have their types (`input` a string, `rec` / `prev_entity` lists of ids, ids strings
    or numbers), refused naming file:line. A gold item whose title is empty once derived from its URI
    is dropped and counted in `dropped["empty_gold_title"]` (an empty gold would match an empty list
    item), and a turn left without gold in `dropped["no_gold_left"]`. The dialogue itself may be empty:
    the recommender may open a conversation. A (dialog_id, turn_id) seen twice is refused naming both
    file:lines (the two turns would share one probe id)."""
    turns, seen = [], FirstSeen("turn (dialog_id, turn_id)")
    dropped = dropped if dropped is not None else {}
    dropped.setdefault("empty_gold_title", 0)
    dropped.setdefault("no_gold_left", 0)
    required = ("input", "rec", "prev_entity", "dialog_id", "turn_id")
    for where, row in read_jsonl_numbered(path, required=required, expected_format=CRS_FORMAT):
        for key in ("dialog_id", "turn_id"):
            if isinstance(row[key], bool) or not isinstance(row[key], int | str) or not str(row[key]).strip():
                raise DataError(f"{where}: field {key!r} must be a non-empty string or number, got {row[key]!r}. "
                                f"Expected {CRS_FORMAT}.")
        seen.add(f"{row['dialog_id']}/{row['turn_id']}", where)
        rec = _ids(row, "rec", where)
        if not rec or row.get("is_user"):
            continue
        dialogue = text_field(row, "input", where, CRS_FORMAT)
        place = f"{where} (turn {row['dialog_id']}/{row['turn_id']})"
        gold = tuple(title for title in (catalogue.title(i, place) for i in rec) if title.strip())
        dropped["empty_gold_title"] += len(rec) - len(gold)
        if not gold:
            dropped["no_gold_left"] += 1
            continue
        turns.append(CRSTurn(
            dialog_id=str(row["dialog_id"]),
            turn_id=str(row["turn_id"]),
            dialogue=dialogue,
            response=text_field(row, "resp", where, CRS_FORMAT, optional=True) or "",
            gold=gold,
            seen=tuple(catalogue.title(i, place) for i in _ids(row, "prev_entity", where)),
            request=_request(row),
        ))
    if not turns:
        why = f" ({dropped['no_gold_left']} left without a gold title)" if dropped["no_gold_left"] else ""
        raise DataError(f"{path}: no recommender turn with a gold 'rec'{why}. Expected {CRS_FORMAT}.")
    return turns


@dataclass(frozen=True)
class Dialogue:
    """A whole dialogue to inject, and what was recommended in it: (user request, titles, response)."""

    id: str
    text: str
    recommendations: tuple[tuple[str, tuple[str, ...], str], ...]


def dialogues_from_turns(turns: Sequence[CRSTurn]) -> list[Dialogue]:
    """Group turns by dialogue. The text is the longest dialogue prefix plus the response that follows
    it (a test file holds a dialogue only up to its last recommendation)."""
    grouped: dict[str, list[CRSTurn]] = {}
    for turn in turns:
        grouped.setdefault(turn.dialog_id, []).append(turn)
    dialogues = []
    for dialog_id, members in grouped.items():
        last = max(members, key=lambda t: len(t.dialogue))
        text = (last.dialogue + last.response).strip("\n")
        recommendations = tuple((t.request, t.gold, t.response) for t in members)
        dialogues.append(Dialogue(dialog_id, text, recommendations))
    return dialogues


def _redial_text(text: str, mentions: dict[str, str]) -> str:
    return _REDIAL_MENTION.sub(lambda m: mentions.get(m.group(1), m.group(0)), text)


def load_redial_conversations(path: str | Path, dropped: dict[str, int] | None = None) -> list[Dialogue]:
    """Dialogues of ReDial's original release. The seeker (initiator) is "User", the recommender
    "System"; consecutive messages of one speaker are joined; "@id" mentions become titles. Every
    recommender utterance that mentions a movie is a recommendation of those titles (years removed).
    A message text must be a string (file:line otherwise); a conversation with no text is dropped and
    counted in `dropped["empty_conversation"]`; a `conversationId` seen twice is refused naming both."""
    dropped = dropped if dropped is not None else {}
    dropped.setdefault("empty_conversation", 0)
    ids = FirstSeen("conversationId")
    dialogues = []
    for where, conversation in read_records(path, ("messages", "initiatorWorkerId"), REDIAL_FORMAT):
        mentions = conversation.get("movieMentions") or {}
        if not isinstance(mentions, dict):
            raise DataError(f"{where}: 'movieMentions' must be an object {{id: title}}. Expected {REDIAL_FORMAT}.")
        if not isinstance(conversation["messages"], list):
            raise DataError(f"{where}: 'messages' must be a list. Expected {REDIAL_FORMAT}.")
        utterances: list[tuple[str, str, list[str]]] = []  # (speaker, text, mentioned ids)
        for message in conversation["messages"]:
            if not isinstance(message, dict) or "text" not in message or "senderWorkerId" not in message:
                raise DataError(f"{where}: every message needs 'text' and 'senderWorkerId'. Expected {REDIAL_FORMAT}.")
            raw = text_field(message, "text", where, REDIAL_FORMAT)
            speaker = "User" if message["senderWorkerId"] == conversation["initiatorWorkerId"] else "System"
            text = _redial_text(raw.strip(), mentions)
            if not text:
                continue  # an empty message adds nothing, and must not start an empty turn
            message_ids = _REDIAL_MENTION.findall(raw)
            if utterances and utterances[-1][0] == speaker:
                previous = utterances[-1]
                utterances[-1] = (speaker, f"{previous[1]} {text}".strip(), previous[2] + message_ids)
            else:
                utterances.append((speaker, text, message_ids))
        dialog_id = str(conversation.get("conversationId", len(dialogues)))
        ids.add(dialog_id, where)
        if not utterances:
            dropped["empty_conversation"] += 1
            continue
        recommendations = []
        for index, (speaker, text, mentioned) in enumerate(utterances):
            titles = tuple(dict.fromkeys(
                ranking.collapse_spaces(ranking.strip_parentheses(str(mentions[i]))) for i in mentioned if i in mentions
            ))
            if speaker == "System" and titles:
                before = [u[1] for u in utterances[:index] if u[0] == "User"]
                recommendations.append((before[-1] if before else "", titles, text))
        text = "\n".join(f"{speaker}: {text}" for speaker, text, _ in utterances)
        dialogues.append(Dialogue(f"redial-{dialog_id}", text, tuple(recommendations)))
    if not dialogues:
        why = f" ({dropped['empty_conversation']} without text dropped)" if dropped["empty_conversation"] else ""
        raise DataError(f"{path}: no conversation with messages{why}. Expected {REDIAL_FORMAT}.")
    return dialogues


class CRSTask(Task):
    """`task=inspired` / `task=redial`: inject dialogues, then ask for 20 recommendations per turn."""

    name = "crs"

    @checked("task")
    def __init__(
        self,
        dataset_dir: str,
        test_file: str = "test.jsonl",
        limit: NonNegativeInt = 16,
        prompt_template: str = REFERENCE_PROMPT,
        answer_prefix: str = "",
        max_new_tokens: PositiveInt = 128,
        stop: list[str] | None = None,
        parser: str = "he2023",
        catalogue: Literal["entities", "items"] = "entities",
        filter_oov: bool = False,
        oov_threshold: NonNegativeInt = 2,
        exclude_seen: bool = False,
        dedupe: bool = False,
        ks: list[PositiveInt] | None = None,
        knowledge_source: Literal["split", "crs_jsonl", "redial_conversations", "none"] = "split",
        knowledge_path: str | None = None,
        knowledge_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5,
        n_knowledge: NonNegativeInt = 8,
        data_seed: int = 0,
        sentence_template: str = "Question: {user}\nAnswer: {titles}\n",
    ) -> None:
        if "{dialogue}" not in prompt_template:
            raise ValueError(f"task.prompt_template must contain '{{dialogue}}', got {prompt_template!r}")
        if parser not in ranking.PARSERS:
            raise ValueError(f"task.parser must be one of {ranking.PARSERS}, got {parser!r}")
        if knowledge_source in ("crs_jsonl", "redial_conversations") and not knowledge_path:
            raise ValueError(f"task.knowledge_source={knowledge_source} needs task.knowledge_path")
        try:
            sentence_template.format(user="", titles="", response="")
        except (KeyError, IndexError) as err:
            raise ValueError(f"task.sentence_template may only use {{user}}, {{titles}}, {{response}}: {err}") from None
        self.dataset_dir = Path(dataset_dir)
        self.test_file, self.limit = test_file, limit
        self.prompt_template, self.answer_prefix = prompt_template, answer_prefix
        self.generation = GenerationSpec(max_new_tokens=max_new_tokens, stop=tuple(stop or ()))
        self.parser, self.catalogue_name = parser, catalogue
        self.filter_oov, self.oov_threshold = filter_oov, oov_threshold
        self.exclude_seen, self.dedupe = exclude_seen, dedupe
        self.ks = tuple(ks or ranking.DEFAULT_KS)
        self.knowledge_source, self.knowledge_path = knowledge_source, knowledge_path
        self.knowledge_fraction, self.n_knowledge, self.data_seed = knowledge_fraction, n_knowledge, data_seed
        self.sentence_template = sentence_template
        self._catalogue: Catalogue | None = None
        self._matcher: ranking.TitleMatcher | None = None
        self._split: tuple[list[CRSTurn], list[Dialogue]] | None = None
        self.dropped: dict[str, int] = {}  # what the loaders dropped, by reason (in the record)

    # ------------------------------------------------------------------ data
    @property
    def catalogue(self) -> Catalogue:
        if self._catalogue is None:
            self._catalogue = load_catalogue(self.dataset_dir)
        return self._catalogue

    @property
    def matcher(self) -> ranking.TitleMatcher:
        if self._matcher is None:
            self._matcher = ranking.TitleMatcher(self.catalogue.titles(self.catalogue_name))
        return self._matcher

    def _load(self) -> tuple[list[CRSTurn], list[Dialogue]]:
        """(evaluated turns, dialogues to inject), disjoint by construction."""
        if self._split is not None:
            return self._split
        turns = load_crs_turns(self.dataset_dir / self.test_file, self.catalogue, self.dropped)
        if self.knowledge_source == "split":
            dialog_ids = list(dict.fromkeys(t.dialog_id for t in turns))
            random.Random(self.data_seed).shuffle(dialog_ids)
            n_held_out = round(self.knowledge_fraction * len(dialog_ids))
            if not 0 < n_held_out < len(dialog_ids):
                raise DataError(f"{self.dataset_dir / self.test_file}: {len(dialog_ids)} dialogues cannot be split "
                                f"with knowledge_fraction={self.knowledge_fraction}")
            held_out = set(dialog_ids[:n_held_out])
            order = {d: i for i, d in enumerate(dialog_ids)}
            dialogues = sorted(dialogues_from_turns([t for t in turns if t.dialog_id in held_out]), key=lambda d: order[d.id])
            turns = [t for t in turns if t.dialog_id not in held_out]
        elif self.knowledge_source == "crs_jsonl":
            path = Path(self.knowledge_path)
            knowledge_dropped: dict[str, int] = {}
            dialogues = dialogues_from_turns(load_crs_turns(path, load_catalogue(path.parent), knowledge_dropped))
            self.dropped |= {f"knowledge/{k}": v for k, v in knowledge_dropped.items()}
        elif self.knowledge_source == "redial_conversations":
            knowledge_dropped = {}
            dialogues = load_redial_conversations(self.knowledge_path, knowledge_dropped)
            self.dropped |= {f"knowledge/{k}": v for k, v in knowledge_dropped.items()}
        else:
            dialogues = []
        if self.n_knowledge:
            dialogues = dialogues[: self.n_knowledge]
        if self.limit:
            turns = turns[: self.limit]
        self._split = (turns, dialogues)
        return self._split

    def knowledge_of(self, dialogue: Dialogue) -> Knowledge:
        sentences = tuple(
            self.sentence_template.format(user=user, titles=", ".join(titles), response=response)
            for user, titles, response in dialogue.recommendations
        )
        return Knowledge(id=f"dialog-{dialogue.id}", context=dialogue.text, train_sentences=sentences,
                         meta={"n_recommendations": len(dialogue.recommendations)})

    def probe_of(self, turn: CRSTurn) -> Probe:
        prompt = self.prompt_template.format(dialogue=turn.dialogue) + self.answer_prefix
        return Probe(
            query=Query(id=turn.id, prompt=prompt),  # no gold context: the dialogue is in the prompt
            answers=turn.gold,
            meta={"seen": list(turn.seen), "answer_prefix": self.answer_prefix, "dialog_id": turn.dialog_id},
        )

    def steps(self) -> list[Step]:
        turns, dialogues = self._load()
        probe_set = ProbeSet(name="crs", probes=[self.probe_of(t) for t in turns], generation=self.generation,
                             scorer="ranking")
        return [Step(index=0, knowledge=[self.knowledge_of(d) for d in dialogues], probe_sets=[probe_set],
                     reset_before=True, label=f"{len(dialogues)} dialogues")]

    # ------------------------------------------------------------------ scoring
    def _matches(self, probe: Probe, output: Answer) -> list[ranking.TitleMatch]:
        text = str(probe.meta.get("answer_prefix", "")) + output.text
        return self.matcher.match_all(ranking.extract_titles(text, self.parser))

    def _ranked(self, matches: Sequence[ranking.TitleMatch], seen: Sequence[str], filter_oov: bool,
                exclude_seen: bool) -> list[str]:
        return ranking.ranked_titles(matches, seen, self.oov_threshold if filter_oov else None, exclude_seen,
                                     self.dedupe)

    def _gold_results(self, results: Sequence[ProbeResult], filter_oov: bool, exclude_seen: bool) -> list[ranking.GoldResult]:
        golds = []
        for result in results:
            seen = result.probe.meta.get("seen", [])
            ranked = self._ranked(self._matches(result.probe, result.output), seen, filter_oov, exclude_seen)
            golds += ranking.score_turn(ranked, result.probe.answers, seen, self.ks)
        return golds

    def score(self, probe_set: ProbeSet, outputs: Sequence[Answer | TargetScore]) -> list[dict[str, float]]:
        """Per turn: each metric averaged over the turn's gold items, the number of gold items, and
        how many list items were parsed (`list_items`) and lie within `oov_threshold` edits."""
        if probe_set.scorer != "ranking" or probe_set.output_type != "generate":
            raise NotImplementedError(f"{type(self).__name__} cannot score probe set {probe_set.name!r}")
        rows = []
        for probe, output in zip(probe_set.probes, outputs):
            seen = probe.meta.get("seen", [])
            matches = self._matches(probe, output)
            ranked = self._ranked(matches, seen, self.filter_oov, self.exclude_seen)
            golds = ranking.score_turn(ranked, probe.answers, seen, self.ks)
            row = {name: sum(g.scores[name] for g in golds) / len(golds) for name in ranking.metric_names(self.ks)}
            rows.append(row | {
                "n_gold": float(len(golds)),
                "list_items": float(len(matches)),
                "catalogue_items": float(sum(m.distance <= self.oov_threshold for m in matches)),
            })
        return rows

    def summarize(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        """Condition `all`, per (turn, gold item), under the configured filter and exclusion."""
        table = ranking.summarize_by_condition(self._gold_results(results, self.filter_oov, self.exclude_seen), self.ks)
        metrics = {name: entry["mean"] for name, entry in table["all"].items() if entry["mean"] is not None}
        if results:
            metrics["list_items"] = sum(r.metrics["list_items"] for r in results) / len(results)
            metrics["catalogue_items"] = sum(r.metrics["catalogue_items"] for r in results) / len(results)
        return metrics

    def step_metrics(self, results: Sequence[ProbeResult]) -> dict[str, float]:
        return self.summarize(results)

    def metric_samples(self, results: Sequence[ProbeResult]) -> dict[str, MetricSample]:
        """The unit is the dialogue: ranking metrics per (turn, gold item), list counts per turn."""
        samples: dict[str, MetricSample] = {}

        def add(name: str, value: float, dialogue: str) -> None:
            sample = samples.setdefault(name, MetricSample([], [], "dialogue"))
            sample.values.append(value)
            sample.units.append(dialogue)

        for result in results:
            dialogue = str(result.probe.meta.get("dialog_id", result.probe.query.id))
            for gold in self._gold_results([result], self.filter_oov, self.exclude_seen):
                for name, value in gold.scores.items():
                    add(name, value, dialogue)
            for name in ("list_items", "catalogue_items"):
                add(name, result.metrics[name], dialogue)
        return samples

    def setting_name(self, filter_oov: bool, exclude_seen: bool) -> str:
        """The reference's name of a filter x exclude-seen setting."""
        return f"filtered_{filter_oov}_exclude_seen_{exclude_seen}"

    def report(self, results: Sequence[ProbeResult], output_dir: Path) -> dict[str, Any]:
        """Per-condition tables (mean, se, n) for the configured setting and all four reference
        settings; writes `crs_ranked.jsonl` (per turn: parsed items, nearest titles, distances, ranking)."""
        if not results:
            return {}
        settings = {
            self.setting_name(f, e): ranking.summarize_by_condition(self._gold_results(results, f, e), self.ks)
            for f in (False, True) for e in (False, True)
        }
        rows = []
        for result in results:
            seen = result.probe.meta.get("seen", [])
            matches = self._matches(result.probe, result.output)
            rows.append({
                "probe_id": result.probe.query.id,
                "gold": list(result.probe.answers),
                "seen": seen,
                "items": [{"item": m.item, "title": m.title, "distance": m.distance} for m in matches],
                "ranked": self._ranked(matches, seen, self.filter_oov, self.exclude_seen),
            })
        write_jsonl(Path(output_dir) / "crs_ranked.jsonl", rows)
        return {
            "protocol": self.protocol(),
            "conditions": settings[self.setting_name(self.filter_oov, self.exclude_seen)],
            "settings": settings,
            "files": ["crs_ranked.jsonl"],
        }

    def protocol(self) -> dict[str, Any]:
        return {"parser": self.parser, "catalogue": self.catalogue_name, "filter_oov": self.filter_oov,
                "oov_threshold": self.oov_threshold, "exclude_seen": self.exclude_seen, "dedupe": self.dedupe,
                "ks": list(self.ks), "answer_prefix": self.answer_prefix}

    def metric_protocols(self) -> dict[str, str]:
        oov = f"<={self.oov_threshold} edits" if self.filter_oov else "off"
        ranking_protocol = (
            f"generate/crs-ranking(parser={self.parser}; nearest {self.catalogue_name} title by lowercased "
            f"Levenshtein, ties -> first in sorted catalogue; oov-filter={oov}; "
            f"exclude-seen={'yes' if self.exclude_seen else 'no'}; dedupe={'yes' if self.dedupe else 'no'}; "
            "per (turn, gold item), condition all)"
        )
        protocols = {name: ranking_protocol for name in ranking.metric_names(self.ks)}
        protocols["list_items"] = f"generate/mean list items per turn (parser={self.parser})"
        protocols["catalogue_items"] = (
            f"generate/mean list items per turn within {self.oov_threshold} edits of a {self.catalogue_name} title"
        )
        return protocols

    def describe(self) -> dict[str, Any]:
        turns, dialogues = self._load()
        return {
            "dataset_dir": str(self.dataset_dir),
            "n_turns": len(turns),
            "n_gold": sum(len(t.gold) for t in turns),
            "n_dialogues_evaluated": len({t.dialog_id for t in turns}),
            "knowledge_source": self.knowledge_source,
            "n_knowledge_dialogues": len(dialogues),
            "n_train_sentences": sum(len(d.recommendations) for d in dialogues),
            "catalogue_titles": len(self.matcher),
            "dropped": dict(self.dropped),
        }
