"""QA metrics on hand-computed cases."""
import pytest

from metrics.qa import contains, exact_match, normalize_answer, qa_scores, token_f1


@pytest.mark.parametrize(
    ("text", "normalized"),
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("  a   cat, an owl and THE dog ", "cat owl and dog"),
        ("U.S.A.", "usa"),
        ("theory", "theory"),  # 'the' only as a whole word
    ],
)
def test_normalize_answer(text, normalized):
    assert normalize_answer(text) == normalized


def test_token_f1_hand_computed():
    # pred tokens: [founded, in, 1742]; gold: [1742]; common 1 -> P=1/3, R=1 -> F1 = 2*(1/3)/(4/3) = 0.5
    assert token_f1("Founded in 1742.", "1742") == pytest.approx(0.5)
    # pred [ada, quill, born], gold [ada, quill] -> P=2/3 R=1 -> F1=0.8
    assert token_f1("Ada Quill born", "Ada Quill") == pytest.approx(0.8)
    # repeated tokens count once per occurrence: pred [paris, paris], gold [paris] -> common 1, P=.5 R=1 -> 2/3
    assert token_f1("Paris Paris", "Paris") == pytest.approx(2 / 3)
    assert token_f1("London", "Paris") == 0.0
    assert token_f1("the", "a") == 1.0  # both normalise to empty
    assert token_f1("", "Paris") == 0.0


def test_exact_match_and_contains():
    assert exact_match("The Velmora river.", "velmora river") == 1.0
    assert exact_match("Velmora", "Velmora river") == 0.0
    assert contains("It lies on the Velmora river, near the sea", "Velmora River") == 1.0
    assert contains("Velmo", "Velmora") == 0.0
    assert contains("anything", "the") == 0.0  # an empty normalised gold never counts as contained


def test_qa_scores_take_the_best_gold():
    scores = qa_scores("born in 1742", ["1743", "1742"])
    assert scores == {"qa_f1": pytest.approx(0.5), "exact_match": 0.0, "contains": 1.0}
    with pytest.raises(ValueError):
        qa_scores("x", [])
