"""LongBench metrics on hand-computed cases, the dispatcher, and gap recovery."""

import math
import random

import pytest

from polykv_learn.eval.metrics import (
    METRICS,
    answer_settled,
    classification,
    code_sim,
    gap_recovery,
    normalize_answer,
    qa_f1,
    rouge_l,
    score,
    string_match,
)


def test_normalize_answer():
    assert normalize_answer("  The Cat, sat -- on A mat!  ") == "cat sat on mat"
    assert normalize_answer("An apple") == "apple"
    assert normalize_answer("theater") == "theater"  # articles only as whole words


def test_qa_f1_hand_computed():
    # pred tokens {cat, sat}; gold {cat, sat, down}: P = 1, R = 2/3, F1 = 2 * (2/3) / (5/3) = 0.8
    assert qa_f1("The cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert qa_f1("Paris.", ["paris"]) == 1.0
    assert qa_f1("London", ["Paris"]) == 0.0
    # max over the gold answers
    assert qa_f1("cat", ["dog", "the cat"]) == 1.0
    # repeated tokens count once per match: pred {a: 0, cat x2}, gold {cat}: P = 1/2, R = 1, F1 = 2/3
    assert qa_f1("cat cat", ["cat"]) == pytest.approx(2 / 3)
    assert qa_f1("", ["cat"]) == 0.0


def test_rouge_l_hand_computed():
    # LCS of [the cat sat on the mat] and [the cat lay on the mat] is 5: P = R = 5/6
    assert rouge_l("the cat sat on the mat", ["the cat lay on the mat"]) == pytest.approx(5 / 6)
    # LCS 2: P = 2/4, R = 2/2, F = 2 * 0.5 * 1 / 1.5 = 2/3
    assert rouge_l("a b c d", ["a c"]) == pytest.approx(2 / 3)
    assert rouge_l("A, B!", ["a b"]) == 1.0  # lower-cased alphanumeric tokens
    assert rouge_l("x y", ["a b", "y z"]) == pytest.approx(0.5)  # max over answers
    assert rouge_l("", ["a"]) == 0.0


def test_classification_longbench_rules():
    classes = ["get_weather", "play_music", "rate_book"]
    assert classification("get_weather", ["get_weather"], classes) == 1.0
    assert classification("get_weather or play_music", ["get_weather"], classes) == 0.5
    assert classification("play_music", ["get_weather"], classes) == 0.0
    assert classification("nothing", ["get_weather"], classes) == 0.0
    # a class that is a strict substring of the gold label is not a competing match
    assert classification("book_restaurant", ["book_restaurant"], ["book", "book_restaurant"]) == 1.0
    # the gold label "book" competes with "book_restaurant" found in the prediction
    assert classification("book_restaurant", ["book"], ["book", "book_restaurant"]) == 0.5
    # without all_classes the gold answers are the classes
    assert classification("it is rate_book", ["rate_book"]) == 1.0


def test_string_match_fraction_case_insensitive():
    answers = ["ANGIS", "CCYLJ", "IBKUF", "OOAFI"]
    assert string_match("angis and CCYLJ", answers) == 0.5
    assert string_match("The pass key is 71432.", ["71432"]) == 1.0
    assert string_match("nothing", ["71432"]) == 0.0


def test_code_sim():
    assert code_sim("# a comment\n\n    return x + 1\n", ["return x + 1"]) == 1.0
    # SequenceMatcher("return x", "return x + 1"): 2 * 8 / (8 + 12) = 0.8
    assert code_sim("```python\nreturn x\n```", ["    return x + 1"]) == pytest.approx(0.8)
    assert code_sim("// c style\nfoo()", ["foo()"]) == 1.0
    assert code_sim("", ["foo()"]) == 0.0


def test_score_dispatch_and_errors():
    assert set(METRICS) == {"string_match", "qa_f1", "rouge_l", "classification", "code_sim"}
    assert score("qa_f1", "The cat sat", ["a cat sat down"]) == pytest.approx(0.8)
    assert score("classification", "a or b", ["a"], all_classes=["a", "b"]) == 0.5
    assert score("string_match", "x", ["x"], all_classes=None, task="t") == 1.0  # extra keywords ignored
    with pytest.raises(ValueError, match="unknown metric 'bleu'.*qa_f1.*code_sim"):
        score("bleu", "x", ["x"])


def test_gap_recovery():
    assert gap_recovery(0.6, 0.5, 0.7) == pytest.approx(0.5)
    assert gap_recovery(0.7, 0.5, 0.7) == pytest.approx(1.0)
    assert gap_recovery(0.4, 0.5, 0.7) == pytest.approx(-0.5)
    assert gap_recovery(0.6, 0.5, 0.5) is None  # no gap: undefined
    assert gap_recovery(None, 0.5, 0.7) is None
    assert gap_recovery(0.6, math.nan, 0.7) is None


def test_classification_scores_the_first_line():
    classes = ["get_weather", "play_music"]
    assert classification("get_weather\nplay_music", ["get_weather"], classes) == 1.0
    assert classification("\n\nplay_music\nget_weather", ["get_weather"], classes) == 0.0


def test_answer_settled_hand_cases():
    assert not answer_settled("classification", "get_wea")
    assert not answer_settled("classification", "\n\n  ")  # the first line has not started
    assert answer_settled("classification", "\nget_weather\n")
    assert not answer_settled("code_sim", "# comment\n\n    return")
    assert answer_settled("code_sim", "# comment\n    return x\n")
    assert not answer_settled("string_match", "38369\nThe pass key is")  # no answers given: cannot tell
    assert not answer_settled("string_match", "The pass key is 3836", ["38369"])  # may still come
    assert answer_settled("string_match", "The pass key is 38369", ["38369"])  # more text cannot remove it
    assert not answer_settled("string_match", "apple, pear", ["Apple", "plum"])  # half found: 0.5 may grow
    assert answer_settled("string_match", "apple, PLUM", ["Apple", "plum"])
    assert not answer_settled("qa_f1", "a\nb\n") and not answer_settled("rouge_l", "a\nb\n")


def test_settled_answers_keep_their_score_whatever_follows():
    """Decoding stops once an answer is settled: every continuation must leave the score unchanged."""
    rng = random.Random(0)
    pieces = [
        "get_weather",
        "play_music",
        "\n",
        "\n",
        " ",
        "# note",
        "// c",
        "`",
        "return x",
        "foo()",
        "  ",
        "38",
        "369",
    ]
    cases = {
        "classification": (["get_weather"], ["get_weather", "play_music"]),
        "code_sim": (["return x + 1"], None),
        "string_match": (["38369", "play"], None),
    }
    checked = 0
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 9)))
        for metric, (answers, classes) in cases.items():
            final = score(metric, text.strip(), answers, all_classes=classes)
            for cut in range(len(text) + 1):
                if answer_settled(metric, text[:cut], answers):
                    assert score(metric, text[:cut].strip(), answers, all_classes=classes) == final, (metric, text, cut)
                    checked += 1
    assert checked > 500


def test_sample_schema_names_exactly_the_implemented_metrics():
    from polykv_learn.data.jsonl import METRIC_NAMES
    from polykv_learn.eval.metrics import METRICS

    assert set(METRIC_NAMES) == set(METRICS)
