"""Grounding: claims read from hand-written texts and counted true/false against hand-made facts."""

from __future__ import annotations

import random
import time

import pytest

from tgrl_lib.scoring.grounding import check_claims, extract_claims, grounding_score


def obj(shape, color, size, x, y, px=14):
    return {"shape": shape, "color": color, "size": size, "px": px,
            "bbox": [x - px // 2, y - px // 2, x + px // 2, y + px // 2], "center": [x, y]}  # fmt: skip


# red circle (large) left and up; two blue squares right; a green triangle at the bottom
SCENE = {
    "kind": "shapes",
    "objects": [
        obj("circle", "red", "large", 10, 10, px=18),
        obj("square", "blue", "small", 40, 12, px=10),
        obj("square", "blue", "medium", 44, 30),
        obj("triangle", "green", "small", 20, 46, px=10),
    ],
    "bars": [],
}
CHART = {
    "kind": "bar_chart",
    "objects": [],
    "bars": [
        {"label": "A", "color": "red", "value": 3, "bbox": [10, 30, 16, 51]},
        {"label": "B", "color": "blue", "value": 5, "bbox": [24, 16, 30, 51]},
        {"label": "C", "color": "green", "value": 2, "bbox": [38, 37, 44, 51]},
    ],
}


def counts(text, facts):
    result = check_claims(extract_claims(text), facts)
    return result.stated, result.true, result.false


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("I see 1 red circle, 2 blue squares, 1 green triangle.", (3, 3, 0)),
        ("I see 2 red circles, 2 blue squares, 1 green triangle.", (3, 2, 1)),
        ("I see a red circle and one green triangle.", (2, 2, 0)),
        ("There are no yellow shapes and no green circles.", (2, 2, 0)),
        ("I see a large red circle, a small blue square, a large blue square.", (3, 2, 1)),
        ("Blue shapes: 2. Shapes: 4. Red shapes: 3.", (3, 2, 1)),
        ("There are 4 shapes, 3 squares and 2 blue shapes.", (3, 2, 1)),
        ("The red circle is left of the green triangle.", (1, 1, 0)),
        ("The red circle is to the right of the green triangle.", (1, 0, 1)),
        (
            "The green triangle is below the red circle. The red circle is above the green triangle.",
            (2, 2, 0),
        ),
        ("The yellow circle is left of the red circle.", (1, 0, 1)),  # names a shape that is not there
        ("The red circle is left of the blue square.", (1, 1, 0)),  # true for both blue squares
        ("From left to right: red circle, green triangle, blue square.", (2, 2, 0)),
        ("From left to right: green triangle, red circle.", (1, 0, 1)),
        ("From top to bottom: red circle, green triangle.", (1, 1, 0)),
        ("The largest shape is a red circle.", (1, 1, 0)),
        ("The largest shape is a blue square.", (1, 0, 1)),
        ("The leftmost shape is a red circle. The rightmost shape is a blue square.", (2, 2, 0)),
        ("The smallest object is a large green triangle.", (1, 0, 1)),  # size attribute checked too
        ("I see 3 red circles. The largest shape is a red circle.", (2, 1, 1)),  # "a red circle" not a count
    ],
)
def test_scene_claims(text, expected):
    assert counts(text, SCENE) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The bars are: red=3, blue=5, green=2.", (3, 3, 0)),
        ("The bars are: A=3, B=4, C=2.", (3, 2, 1)),
        ("The red bar is 3 and purple=4.", (1, 1, 0)),  # purple is not a bar colour word: ignored
        ("The bars are: yellow=1.", (1, 0, 1)),  # no yellow bar
        ("The tallest bar is blue. The shortest bar is red.", (2, 1, 1)),
        ("The tallest bar is the B bar.", (1, 1, 0)),
        ("3 + 5 + 2 = 10.", (0, 0, 0)),
        ("I see 2 red circles.", (1, 0, 1)),  # shapes claimed on a chart: there are none
    ],
)
def test_chart_claims(text, expected):
    assert counts(text, CHART) == expected


def test_bar_claims_about_a_scene_are_unknown_not_false():
    result = check_claims(extract_claims("The bars are: red=3. I see 1 red circle."), SCENE)
    assert (result.stated, result.true, result.unknown) == (1, 1, 1)
    assert [d.verdict for d in result.details] == [None, True]


def test_ambiguous_relation_is_unknown():
    # two blue squares right of the red circle: one above it, one below it
    facts = {"objects": [obj("square", "blue", "small", 40, 10), obj("square", "blue", "small", 40, 40),
                         obj("circle", "red", "small", 10, 25)], "bars": []}  # fmt: skip
    result = check_claims(extract_claims("The blue square is above the red circle."), facts)
    assert (result.stated, result.unknown) == (0, 1)
    assert counts("The blue square is right of the red circle.", facts) == (1, 1, 0)


def test_score_and_none():
    assert grounding_score("I see 1 red circle, 2 blue squares, 1 yellow square.", SCENE) == pytest.approx(
        2 / 3
    )
    assert grounding_score("The answer is 3 because three is a nice number.", SCENE) is None
    assert grounding_score("I see 1 red circle.", None) is None
    assert grounding_score("", SCENE) is None
    result = check_claims(extract_claims("I see 1 red circle."), None)
    assert (result.stated, result.unknown) == (0, 1)


def test_claim_details_name_the_phrase_and_reason():
    result = check_claims(extract_claims("<think>I see 2 red circles.</think><answer>2</answer>"), SCENE)
    (detail,) = result.details
    assert (
        detail.claim.text == "2 red circles" and detail.verdict is False and "1 red circle" in detail.reason
    )


def test_arbitrary_text_never_raises():
    rng = random.Random(0)
    alphabet = "ab rde=1234567890:,.()<>/-AaBbthelfrigsquacn\n\t漢字🙂\x00"
    words = (
        "the red blue circle square is left of right above below from to : , = 1 2 a an largest bar shapes"
    )
    samples = ["", " ", "=", "A=", "the the the", "From left to right:", "the largest shape is a"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300))) for _ in range(300)]
    samples += [" ".join(rng.choice(words.split()) for _ in range(rng.randint(1, 80))) for _ in range(300)]
    for text in samples:
        check_claims(extract_claims(text), SCENE)
        check_claims(extract_claims(text), CHART)
    assert extract_claims(None) == []  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "hostile",
    [
        "2 red circles, " * 2000,
        "From left to right: red circle" + ", blue square" * 3000,
        "the red " * 5000,
        "The red circle is left of the " * 1000,
        "a" * 30000,
        "= 1 " * 8000,
        "large " * 6000 + "circle",
    ],
)
def test_linear_time_on_hostile_input(hostile):
    start = time.perf_counter()
    claims = extract_claims(hostile)
    check_claims(claims, SCENE)
    assert time.perf_counter() - start < 1.0
