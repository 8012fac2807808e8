"""Verifiable rewards: every extraction and matching rule in both directions, the format rule, the reward
arithmetic, and linear time on hostile responses."""

import doctest
import time
from fractions import Fraction

import pytest

from tgrl_lib.data.schema import Problem
from tgrl_lib.errors import TgrlError
from tgrl_lib.scoring import answers, rewards
from tgrl_lib.scoring.answers import extract_answer, match_answer, normalize_text, parse_number
from tgrl_lib.scoring.rewards import (
    RewardResult,
    format_reward,
    has_valid_format,
    reward,
    score_batch,
    verify,
)


def number(answer: str, kind: str = "integer", precision: int | None = None, unit: str | None = None):
    return Problem(
        id="n", image="i.png", question="q", answer=answer, answer_type=kind, precision=precision, unit=unit
    )


def choice(answer: str, choices: list[str]) -> Problem:
    return Problem(
        id="c", image="i.png", question="q", answer=answer, answer_type="multiple_choice", choices=choices
    )


def text(answer: str) -> Problem:
    return Problem(id="t", image="i.png", question="q", answer=answer, answer_type="text")


COLOURS = choice("blue", ["red", "blue", "green"])


# ---------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    ("response", "expected"),
    [
        # answer tag
        ("<think>2 + 1</think><answer>3</answer>", "3"),
        ("<answer>  \n 3 \n </answer>", "3"),
        ("<ANSWER>5</Answer>", "5"),
        ("<answer>1</answer> wait <answer>2</answer>", "2"),  # last tag wins
        ("<answer>1</answer> wait <answer>2", "1"),  # unclosed last tag: the last closed pair
        ("<answer>a<answer>b</answer>", "b"),
        ("<answer>\\boxed{4}</answer>", "4"),  # boxed inside the tag is unwrapped
        ("<answer>Answer: B</answer>", "B"),  # so is "Answer: X"
        ("\\boxed{3} then <answer>4</answer>", "4"),  # the tag beats a box outside it
        ("The answer is 3. <answer>4</answer>", "4"),
        # \boxed{}
        ("so \\boxed{7}.", "7"),
        ("\\boxed{1} or rather \\boxed{2}", "2"),  # last box wins
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\boxed{3}}", "3"),
        ("\\boxed {12}", "12"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("\\boxed{5} and then \\boxed{6", "5"),  # unclosed last box
        ("\\fbox{8}", "8"),
        ("{{ \\boxed{3} }}}} \\boxed{4", "3"),  # braces before and after a box do not move it
        ("}} { \\boxed{{5}} {", "{5}"),
        ("The answer is 3. Final: \\boxed{4}", "4"),  # a box beats the phrase wherever it is
        ("\\boxed{4}. So the answer is 3.", "4"),
        ("<answer>7", None),  # unclosed tag is not a tag, and nothing else applies
        ("<answer>\\boxed{7}", "7"),  # ... but a box inside it still counts
        # "The answer is X" / "Answer: X"
        ("The answer is 42.", "42"),
        ("the answer is: B", "B"),
        ("Final Answer: (C) green", "(C) green"),
        ("The answer is 3.5 cm. Because the bar is long.", "3.5 cm"),
        ("The answer is 3? No. The answer is 5!", "5"),  # last occurrence
        ("Answer:\n  12\nthat's it", "12"),
        ("**Answer:** 5", "5"),
        ("**Answer**: 6", "6"),
        ("The answer is 7, or maybe 17.", "7, or maybe 17"),  # no cut at commas: hedges stay hedges
        ("The answer is -0.5\nmore text", "-0.5"),
        # stripping
        ("<answer>$-3$</answer>", "-3"),
        ("<answer>**7**.</answer>", "7"),
        ("<answer>\\(5\\)</answer>", "5"),
        ("<answer>'red'</answer>", "red"),
        ("<answer>.5</answer>", ".5"),
        ("<answer>$\\text{B}$</answer>", "B"),
        ("<answer>\\textbf{(B) blue}</answer>", "(B) blue"),
        ("<answer>12 \\mathrm{cm}</answer>", "12 cm"),
        # nothing
        ("", None),
        ("I am not sure.", None),
        ("The answer is", None),
        ("<answer>   </answer>", None),
        ("<answer></answer> \\boxed{3}", None),  # an empty tag is an empty answer
        ("</answer>5<answer>", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected
    assert extract_answer(response, COLOURS) == expected


# ------------------------------------------------------------------------------------------------- numbers
@pytest.mark.parametrize(
    ("pred", "value"),
    [
        ("7", 7),
        ("-7", -7),
        ("\u22127", -7),
        ("+7", 7),
        ("1,234", 1234),
        ("1,234,567.5", Fraction(2469135, 2)),
        ("1\\,234", 1234),
        ("3/4", Fraction(3, 4)),
        ("-3 / 4", Fraction(-3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("\\tfrac12", Fraction(1, 2)),
        ("-\\frac{1}{2}", Fraction(-1, 2)),
        ("\\frac{-1}{2}", Fraction(-1, 2)),
        ("1.5e3", 1500),
        ("1.5E-3", Fraction(3, 2000)),
        ("1.5 \\times 10^{3}", 1500),
        ("2 \\cdot 10^-2", Fraction(1, 50)),
        ("1.5x10^3", 1500),
        ("12 cm", 12),
        ("12cm^2", 12),
        ("12 square meters", 12),
        ("9.8 m/s^2", Fraction(49, 5)),
        ("$5", 5),
        ("-$5", -5),
        ("50%", 50),
        ("50\\%", 50),
        ("30°", 30),
        ("30^\\circ", 30),
        ("x = 5", 5),
        ("\\text{5 cm}", 5),
        ("{3}", 3),
        ("(-3)", -3),
        ("seven", 7),
        ("Twelve apples", 12),
        (".5", Fraction(1, 2)),
    ],
)
def test_parse_number_accepts(pred, value):
    assert parse_number(pred) == value


@pytest.mark.parametrize(
    "pred",
    [
        "7 or 17",
        "3 to 5",
        "3 and four",
        "5, 6",
        "5 6",
        "1 1/2",
        "12,34",  # ambiguous: European decimal or a list
        "1234,567",
        "3/0",
        "\\frac{1}{0}",
        "\\sqrt{2}",
        "abc",
        "",
        "1e99999",
        "9" * 200,
        "12 a b c d e",  # more than four unit words
        "- -",
        "none",
    ],
)
def test_parse_number_refuses(pred):
    assert parse_number(pred) is None


@pytest.mark.parametrize(
    ("pred", "gold", "ok"),
    [
        ("7", "7", True),
        ("7.0", "7", True),
        ("7.00", "7", True),
        ("seven", "7", True),
        ("17", "7", False),  # the substring hack
        ("7", "17", False),
        ("71", "7", False),
        ("7.5", "7", False),
        ("7 or 17", "7", False),
        ("17 7", "7", False),
        ("1,234", "1234", True),
        ("1234", "1,234", True),
        ("-3", "-3", True),
        ("3", "-3", False),
        ("-3", "3", False),
        ("1e3", "1000", True),
        ("1.5 \\times 10^{3}", "1500", True),
        ("15e2", "1500", True),
        ("1.5e4", "1500", False),
        ("$5", "5", True),
        ("5 dollars", "5", True),
        ("50%", "50", True),
        ("x = 5", "5", True),
        ("6/2", "3", True),
        ("7/2", "3", False),
    ],
)
def test_integer_match(pred, gold, ok):
    assert match_answer(pred, number(gold)) is ok


@pytest.mark.parametrize(
    ("pred", "gold", "precision", "ok"),
    [
        ("1.45", "1.45", 2, True),
        ("1.449", "1.45", 2, True),  # rounded at 2 decimals
        ("1.4549", "1.45", 2, True),
        ("1.455", "1.45", 2, False),  # half-up: 1.46
        ("1.4", "1.45", 2, False),
        ("1.46", "1.45", 2, False),
        ("2.5", "2.50", 2, True),
        ("0.45", "0.5", 1, True),  # half-up: 0.5
        ("0.44", "0.5", 1, False),
        ("1/2", "0.5", 1, True),
        ("\\frac{1}{2}", "0.5", 1, True),
        ("\\boxed{\\frac{1}{2}}", "0.5", 1, False),  # matching sees extracted answers only
        ("-0.75", "-3/4", 2, True),
        ("0.75", "-3/4", 2, False),
        ("3", "3.4", 0, True),
        ("4", "3.4", 0, False),
        ("1,500.5", "1500.5", None, True),
        ("0.3333333", "1/3", None, True),  # relative tolerance 1e-6
        ("0.3333", "1/3", None, False),
        ("0.0025", "2.5e-3", None, True),
        ("1.5E+3", "1500", None, True),
        ("1500.01", "1500", None, False),
        ("0", "0", None, True),
        ("0.0000001", "0", None, False),  # exact at 0
        ("1.0000001", "1", None, True),
        ("1.00001", "1", None, False),
    ],
)
def test_float_match(pred, gold, precision, ok):
    assert match_answer(pred, number(gold, "float", precision)) is ok


@pytest.mark.parametrize(
    ("pred", "gold", "unit", "ok"),
    [
        ("12 cm", "12", "cm", True),
        ("12cm", "12", "cm", True),
        ("12 CM", "12", "cm", True),
        ("12", "12", "cm", True),
        ("13 cm", "12", "cm", False),
        ("12 sq. ft", "12", "sq. ft", True),
        ("\u00a312", "12", "\u00a3", True),
        ("50%", "50", "%", True),
        ("0.5", "50", "%", False),  # percent keeps its number: 50% is 50, not 0.5
        ("50", "50%", None, True),
        ("12 km", "12", "m", True),  # units are ignored, never converted or checked
    ],
)
def test_units(pred, gold, unit, ok):
    assert match_answer(pred, number(gold, "float", 2, unit)) is ok


def test_huge_precision_is_clamped_and_fast():
    start = time.perf_counter()
    assert match_answer("0.5", number("1/2", "float", precision=10**9))
    assert not match_answer("0.5000001", number("1/2", "float", precision=10**9))
    assert time.perf_counter() - start < 1.0


def test_a_non_numeric_truth_is_a_data_error():
    with pytest.raises(TgrlError, match="not a number"):
        match_answer("3", number("three or so"))


# ------------------------------------------------------------------------------------------ multiple choice
@pytest.mark.parametrize(
    "pred",
    ["B", "b", "(B)", "(b)", "B.", "B)", "B:", "option B", "Option b", "choice (B)", "blue", "Blue", "BLUE."]
    + ["  blue ", "B. blue", "(B) blue", "b) Blue", "Option B: blue"],
)
def test_choice_accepts(pred):
    assert match_answer(pred, COLOURS)


@pytest.mark.parametrize(
    "pred",
    ["A", "(a)", "C", "D", "Z", "red", "bluish", "light blue", "A. blue", "B. red", "(C) blue", "A or B"]
    + ["B or C", "A, B", "AB", "blue or red", "blue green", "B blue red", "", "   ", None, "2"],
)
def test_choice_rejects(pred):
    assert not match_answer(pred, COLOURS)


@pytest.mark.parametrize(
    ("pred", "answer", "ok"),
    [
        ("red", "red", True),
        ("reddish", "red", False),
        ("red", "reddish", False),
        ("reddish", "reddish", True),
    ],
)
def test_choice_text_is_never_a_substring(pred, answer, ok):
    assert match_answer(pred, choice(answer, ["red", "reddish", "blue"])) is ok


@pytest.mark.parametrize(
    ("pred", "ok"),
    [("24", True), ("24 cm", True), ("24.0", True), ("B", True), ("B. 24", True), ("C", False)]
    + [("124", False), ("2", False), ("36", False), ("A. 24", False)],
)
def test_numeric_choices_compare_as_numbers(pred, ok):
    assert match_answer(pred, choice("24", ["12", "24", "36"])) is ok


@pytest.mark.parametrize(("pred", "ok"), [("B", True), ("A", False), ("(B)", True), ("C", False)])
def test_a_letter_is_read_as_a_letter_even_when_choices_are_letters(pred, ok):
    # choices C, A, B with answer "A" (option B): the prompt asks for letters, so "A" means option A = "C"
    assert match_answer(pred, choice("A", ["C", "A", "B"])) is ok


# ---------------------------------------------------------------------------------------------------- text
@pytest.mark.parametrize(
    ("pred", "answer", "ok"),
    [
        ("new york", "New York", True),
        ("New York.", "New York", True),
        ("  NEW   york! ", "New York", True),
        ("new-york", "New York", True),
        ("\\text{New York}", "New York", True),
        ("York", "New York", False),
        ("New York City", "New York", False),
        ("red", "reddish", False),
        ("reddish", "red", False),
        ("35 m", "3.5 m", False),  # numbers stay whole
        ("3.5 m", "3.5 m", True),
        ("-3", "3", False),
        ("yes or no", "yes", False),
        ("", "yes", False),
        ("?", "?", False),  # nothing left to compare
    ],
)
def test_text_match(pred, answer, ok):
    assert match_answer(pred, text(answer)) is ok


def test_normalize_text_keeps_numbers_and_words_only():
    assert normalize_text("The  LEFT-most, \\textbf{Red} (one)!") == "the left most red one"
    assert normalize_text("[1, 2,3]") == "1 2 3"
    assert normalize_text("a-3 -3 3.50") == "a 3 -3 3.50"


# ---------------------------------------------------------------------------------------------------- verify
@pytest.mark.parametrize(
    ("response", "problem", "ok"),
    [
        ("<think>4 + 3</think><answer>7</answer>", number("7"), True),
        ("<think>I see 7 circles</think><answer>17</answer>", number("7"), False),
        ("<answer>17</answer>", number("7"), False),
        ("The answer is 17, not 7.", number("7"), False),
        ("The answer is 7, or maybe 17.", number("7"), False),
        ("\\boxed{7} or \\boxed{17}", number("7"), False),
        ("<answer>7</answer> hmm <answer>17</answer>", number("7"), False),  # last tag wins
        ("<answer>17</answer> hmm <answer>7</answer>", number("7"), True),
        ("There are 7 circles", number("7"), False),  # nothing extracted
        ("\\boxed{\\frac{1}{2}}", number("0.5", "float", 1), True),
        ("<answer>(B)</answer>", COLOURS, True),
        ("<answer>A or B</answer>", COLOURS, False),
        ("The answer is (B) blue.", COLOURS, True),
        ("<answer>Blue.</answer>", COLOURS, True),
        ("<answer>bluish</answer>", COLOURS, False),
    ],
)
def test_verify(response, problem, ok):
    assert verify(response, problem) is ok


# ---------------------------------------------------------------------------------------------------- format
@pytest.mark.parametrize(
    "response",
    [
        "<think>2 + 1 = 3</think><answer>3</answer>",
        "\n  <think>\n2 + 1 = 3\n</think>\n\n<answer> 3 </answer>\n",
        "<think></think><answer>3</answer>",  # an empty think is allowed; an empty answer is not
        "<think>the answer is 3</think><answer>The answer is 3.</answer>",
    ],
)
def test_format_accepts(response):
    assert has_valid_format(response)
    assert format_reward(response) == 1.0


@pytest.mark.parametrize(
    "response",
    [
        "",
        "3",
        "<answer>3</answer>",  # no think
        "<think>2 + 1</think>3",  # no answer tags
        "<answer>3</answer><think>2 + 1</think>",  # answer first
        "<think>2 + 1<answer>3</answer>",  # think never closed
        "<think>2 + 1</think><answer>3",  # answer never closed
        "<think>2 + 1</think><answer>3</answer><answer>4</answer>",
        "<think>a</think><think>b</think><answer>3</answer>",
        "<think><think>a</think></think><answer>3</answer>",
        "<think>a</think> so <answer>3</answer>",  # text between the blocks
        "<think>a</think><answer>3</answer> Done.",  # text after the answer
        "Sure! <think>a</think><answer>3</answer>",  # text before
        "<think>a</think><answer>  </answer>",  # empty answer
        "<THINK>a</THINK><ANSWER>3</ANSWER>",
        "<think>a <answer>2</answer></think><answer>3</answer>",
        "<think>a</think><answer>3</answer><|im_end|>",
    ],
)
def test_format_rejects(response):
    assert not has_valid_format(response)
    assert format_reward(response) == 0.0


# ---------------------------------------------------------------------------------------------------- reward
@pytest.mark.parametrize(
    ("response", "weight", "expected"),
    [
        ("<think>4 + 3</think><answer>7</answer>", 0.1, RewardResult(1.1, True, True, "7")),
        ("The answer is 7.", 0.1, RewardResult(1.0, True, False, "7")),
        ("<think>4 + 4</think><answer>8</answer>", 0.1, RewardResult(0.1, False, True, "8")),
        ("no idea", 0.1, RewardResult(0.0, False, False, None)),
        ("<think>4 + 3</think><answer>7</answer>", 0.0, RewardResult(1.0, True, True, "7")),
        ("<think>4 + 3</think><answer>7</answer>", 0.5, RewardResult(1.5, True, True, "7")),
    ],
)
def test_reward_is_correct_plus_weighted_format(response, weight, expected):
    result = reward(response, number("7"), format_weight=weight)
    assert result.correct is expected.correct and result.formatted is expected.formatted
    assert result.answer == expected.answer
    assert result.reward == pytest.approx(expected.reward)


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf")])
def test_reward_refuses_bad_weights(weight):
    with pytest.raises(TgrlError, match="format_weight"):
        reward("<answer>7</answer>", number("7"), format_weight=weight)


def test_score_batch_keeps_order_and_checks_lengths():
    seven, colours = number("7"), COLOURS
    results = score_batch(
        ["<think>x</think><answer>7</answer>", "<answer>17</answer>", "<answer>B</answer>"],
        [seven, seven, colours],
    )
    assert [r.reward for r in results] == pytest.approx([1.1, 0.0, 1.0])
    assert [r.answer for r in results] == ["7", "17", "B"]
    with pytest.raises(TgrlError, match="2 responses but 1 problems"):
        score_batch(["a", "b"], [seven])


def test_docstring_examples_run():
    for module in (answers, rewards):
        outcome = doctest.testmod(module)
        assert outcome.attempted > 0 and outcome.failed == 0, module.__name__


# ------------------------------------------------------------------------------------------ hostile inputs
HOSTILE = {
    "20k-digit answer": "<answer>" + "1" * 20_000 + "</answer>",
    "20k-character text answer": "<answer>" + "red blue, " * 2_000 + "</answer>",
    "20k-character letter soup": "<answer>" + "(A) B. " * 3_000 + "</answer>",
    "unclosed boxes": "\\boxed{" * 30_000,
    "nested boxes": "\\boxed{" * 15_000 + "1" + "}" * 15_000,
    "deep braces around a box": "{" * 100_000 + "\\boxed{3}" + "}" * 100_000,
    "closing braces": "}" * 200_000 + "\\boxed{3",
    "opening tags": "<answer>" * 25_000,
    "closing tags": "</answer>" * 22_000,
    "tags alternating": "<answer></answer>" * 12_000 + "<answer>" + "9" * 50_000 + "</answer>",
    "answer phrases": "The answer is " * 15_000,
    "answer then spaces": "answer:" + " " * 200_000 + "x",
    "thousands separators": "<answer>" + "1," * 100_000 + "1</answer>",
    "digits": "9" * 200_000,
    "decimal points": "<answer>" + "1." * 100_000 + "</answer>",
    "exponents": "<answer>1e" + "9" * 100_000 + "</answer>",
    "fractions": "<answer>\\frac{" + "1" * 100_000 + "}{3}</answer>",
    "units": "<answer>12 " + "a" * 100_000 + "</answer>",
    "parentheses": "<answer>" + "(" * 100_000 + "A" + ")" * 100_000 + "</answer>",
    "think tags": "<think>" * 25_000 + "</think><answer>3</answer>",
    "latex commands": "<answer>" + "\\text{" * 25_000 + "</answer>",
}
HOSTILE_PROBLEMS = [number("7"), number("1.5", "float", 2), number("1.5", "float"), COLOURS, text("red blue")]


@pytest.mark.parametrize("name", sorted(HOSTILE))
@pytest.mark.parametrize("problem", HOSTILE_PROBLEMS, ids=lambda p: f"{p.answer_type}-{p.precision}")
def test_hostile_inputs_answer_in_well_under_a_second(name, problem):
    start = time.perf_counter()
    reward(HOSTILE[name], problem)
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"{name}: {elapsed:.2f} s"
