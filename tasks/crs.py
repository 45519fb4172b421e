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

Data code: `tasks/crs_catalogue.py` (titles), `tasks/crs_turns.py` (the test file's turns and dialogues),
`tasks/redial_conversations.py` (ReDial's release); this file is the task.
"""
from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from core.io import write_jsonl
from core.options import checked
from core.types import NonNegativeInt, PositiveInt
from core.types import Answer, DataError, GenerationSpec, Knowledge, Probe, ProbeSet, Query, Step, TargetScore
from metrics import ranking
from tasks.base import MetricSample, ProbeResult, Task
from tasks.crs_catalogue import Catalogue, load_catalogue
from tasks.crs_turns import CRSTurn, Dialogue, dialogues_from_turns, load_crs_turns
from tasks.redial_conversations import load_redial_conversations

KNOWLEDGE_SOURCES = ("split", "crs_jsonl", "redial_conversations", "none")


class CRSTask(Task):
    """`task=inspired` / `task=redial`: inject dialogues, then ask for 20 recommendations per turn."""

    name = "crs"

    @checked("task")
    def __init__(
        self,
        dataset_dir: str,
        prompt_template: str,  # no default: the reference's prompt is kept once, in conf/task/inspired.yaml
        test_file: str = "test.jsonl",
        limit: NonNegativeInt = 16,
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

    def process_results(self, probe_set: ProbeSet, outputs: Sequence[Answer | TargetScore],
              earlier: Sequence[ProbeResult] = ()) -> list[dict[str, float]]:
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

    def step_metrics(self, results: Sequence[ProbeResult], earlier: Sequence[ProbeResult] = ()) -> dict[str, float]:
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

    def metric_protocols(self, results: Sequence[ProbeResult] = ()) -> dict[str, str]:
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
