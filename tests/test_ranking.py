"""metrics/ranking.py: title extraction on messy generations, nearest-title matching, and every metric
on hand-computed lists."""
import math

import pytest

from metrics import ranking
from metrics.ranking import TitleMatch, TitleMatcher


# ---------------------------------------------------------------- he2023 (reference) parser
def test_he2023_splits_at_the_first_1_dot_and_strips_numbering_parentheses_and_spaces():
    text = ("Sure! Here you go:\n\n1. The Matrix (1999)\n2) Heat  (1995) (Director's cut)\n3 - Alien\n4、Up\n"
            "5.   Blade   Runner 2049\n\nThese are great picks.")
    assert ranking.extract_titles(text, "he2023") == [
        "The Matrix", "Heat", "Alien", "Up", "Blade Runner 2049", "", "These are great picks.",
    ]  # blank lines and trailing prose stay items, as in the reference


def test_he2023_without_a_1_dot_splits_at_commas_and_lines():
    assert ranking.extract_titles("Heat, Alien (1979)\nUp", "he2023") == ["Heat", "Alien", "Up"]


def test_he2023_keeps_its_quirks_years_without_parentheses_quotes_and_descriptions():
    # "11." contains "1.": everything before it is preamble (the reference's split), and only the
    # innermost parentheses go
    assert ranking.extract_titles("10. Heat\n11. Up", "he2023") == ["Up"]
    assert ranking.extract_titles('1. "Heat", 1995 - a heist film', "he2023") == ['"Heat", 1995 - a heist film']
    assert ranking.extract_titles("1. Alien ((1979))", "he2023") == ["Alien ()"]


# ---------------------------------------------------------------- robust parser
@pytest.mark.parametrize("text, expected", [
    ("1. The Matrix (1999)\n2) Heat\n3: Alien\n- Up\n* Jaws\n• Coco", ["The Matrix", "Heat", "Alien", "Up", "Jaws", "Coco"]),
    ('Here are some films:\n1. "Heat"\n2. \u201cAlien\u201d\n3. \'Up\'\nI hope you enjoy them!', ["Heat", "Alien", "Up"]),
    ("1. **The Matrix** (1999)\n2. <em>Heat</em>\n3. `Alien`", ["The Matrix", "Heat", "Alien"]),
    ("1. 1997: The Matrix\n2. Heat, 1995\n3. Alien - 1979\n4. Blade Runner 2049\n5. 1917", ["The Matrix", "Heat", "Alien", "Blade Runner 2049", "1917"]),
    ("1. Die Hard - A classic action movie about a man in a skyscraper.\n2. Star Wars - The Rise of Skywalker",
     ["Die Hard", "Star Wars - The Rise of Skywalker"]),
    ("1. Heat.\n2. \n3. Alien [HD]\n\nThese movies offer thrills.", ["Heat", "Alien"]),
    ("Heat, Alien (1979)\nUp", ["Heat", "Alien", "Up"]),
    ("User: hi\nSystem:  [/INST] 1. Heat (1995)\n2. Alien", ["Heat", "Alien"]),  # an echoed prompt, list mid-line
    ("movies from 2021. 1) Heat\n2) Up\n10. Jaws\n11. Coco", ["Heat", "Up", "Jaws", "Coco"]),
])
def test_robust_parser_on_messy_generations(text, expected):
    assert ranking.extract_titles(text, "robust") == expected


def test_unknown_parser_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown title parser 'fancy'"):
        ranking.extract_titles("1. Heat", "fancy")


# ---------------------------------------------------------------- nearest catalogue title
def test_matcher_is_case_insensitive_and_reports_the_edit_distance():
    matcher = TitleMatcher(["The Matrix", "Heat", "Alien"])
    assert matcher.nearest("the matrix") == TitleMatch("the matrix", "The Matrix", 0)
    assert matcher.nearest("Aliens") == TitleMatch("Aliens", "Alien", 1)
    assert matcher.nearest("") == TitleMatch("", "Heat", 4)  # every title is len(title) edits from ""
    assert "Heat" in matcher and "heat" not in matcher and len(matcher) == 3


def test_matcher_breaks_ties_by_sorted_catalogue_order_whatever_the_input_order():
    # "frozen 2" is 2 edits from both "frozen" and "frozen ii"; the alphabetically first wins
    for titles in (["Frozen II", "Frozen"], ["Frozen", "Frozen II"]):
        assert TitleMatcher(titles).nearest("Frozen 2").title == "Frozen"
    # titles equal up to case: the case-insensitive sort, then the case-sensitive one, decides
    assert TitleMatcher(["up", "Up"]).nearest("UP").title == "Up"


def test_match_all_keeps_order_and_repeats():
    matcher = TitleMatcher(["Heat", "Alien"])
    assert [m.title for m in matcher.match_all(["alien", "heat", "alien"])] == ["Alien", "Heat", "Alien"]


# ---------------------------------------------------------------- ranking and metrics
def matches(*pairs):
    return [TitleMatch(title, title, distance) for title, distance in pairs]


def test_ranked_titles_filters_excludes_and_dedupes_in_order():
    found = matches(("A", 0), ("B", 3), ("C", 2), ("A", 1), ("D", 0))
    assert ranking.ranked_titles(found) == ["A", "B", "C", "A", "D"]
    assert ranking.ranked_titles(found, oov_threshold=2) == ["A", "C", "A", "D"]
    assert ranking.ranked_titles(found, seen=["A"], exclude_seen=True) == ["B", "C", "D"]
    assert ranking.ranked_titles(found, seen=["A"], exclude_seen=False) == ["A", "B", "C", "A", "D"]
    assert ranking.ranked_titles(found, oov_threshold=0, dedupe=True) == ["A", "D"]


def test_gold_scores_on_a_hand_computed_list():
    ranked = ["A", "B", "C", "A", "D", "E"]
    at_c = ranking.gold_scores(ranked, "C", ks=(1, 2, 3, 5))
    assert at_c["recall@1"] == 0 and at_c["recall@2"] == 0 and at_c["recall@3"] == 1 and at_c["recall@5"] == 1
    assert at_c["ndcg@3"] == pytest.approx(1 / math.log2(4)) == pytest.approx(0.5)
    assert at_c["mrr@3"] == pytest.approx(1 / 3) and at_c["mrr@2"] == 0 and at_c["ndcg@2"] == 0
    at_a = ranking.gold_scores(ranked, "A", ks=(1, 5))  # a repeat: the first occurrence counts
    assert at_a == {"recall@1": 1, "ndcg@1": 1, "mrr@1": 1, "recall@5": 1, "ndcg@5": 1, "mrr@5": 1}
    at_e = ranking.gold_scores(ranked, "E", ks=(5, 20))
    assert at_e["recall@5"] == 0 and at_e["recall@20"] == 1
    assert at_e["ndcg@20"] == pytest.approx(1 / math.log2(7)) and at_e["mrr@20"] == pytest.approx(1 / 6)
    assert set(ranking.gold_scores(ranked, "Z").values()) == {0.0}
    assert set(ranking.gold_scores([], "A").values()) == {0.0}


def test_mean_and_standard_error_by_hand():
    assert ranking.mean_se([1, 0, 0, 1]) == {"mean": 0.5, "se": pytest.approx(math.sqrt(1 / 3) / 2), "n": 4}
    assert ranking.mean_se([0.25]) == {"mean": 0.25, "se": None, "n": 1}
    assert ranking.mean_se([]) == {"mean": None, "se": None, "n": 0}


def test_conditions_count_each_gold_item_once():
    # turn 1: two gold items, one mentioned before (discussion); turn 2: one new gold item
    turn1 = ranking.score_turn(["A", "B"], golds=["B", "C"], seen=["B"], ks=(1, 5))
    turn2 = ranking.score_turn(["C"], golds=["C"], seen=[], ks=(1, 5))
    assert [r.condition for r in turn1 + turn2] == ["discussion", "recommendation", "recommendation"]
    table = ranking.summarize_by_condition(turn1 + turn2, ks=(1, 5))
    assert set(table) == {"recommendation", "discussion", "all"}
    assert table["all"]["recall@5"]["n"] == 3 and table["all"]["recall@5"]["mean"] == pytest.approx(2 / 3)
    assert table["all"]["recall@1"]["mean"] == pytest.approx(1 / 3)  # only C in turn 2 is first
    assert table["recommendation"]["recall@5"] == {"mean": 0.5, "se": pytest.approx(0.5), "n": 2}
    assert table["discussion"]["mrr@5"] == {"mean": 0.5, "se": None, "n": 1}
    assert list(table["all"]) == ranking.metric_names((1, 5))  # the reference's column order


def test_empty_condition_has_no_mean_and_prints_as_a_dash():
    table = ranking.summarize_by_condition(ranking.score_turn(["A"], ["A"], seen=[], ks=(1,)), ks=(1,))
    assert table["discussion"]["recall@1"] == {"mean": None, "se": None, "n": 0}
    text = ranking.format_table(table)
    assert "discussion" in text and "-" in text and "1.0000" in text
