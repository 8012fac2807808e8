"""Evidence use: the task's rule applied to the response's own stated facts, on right and wrong responses."""

from __future__ import annotations

import pytest

from tgrl_lib.data.schema import Problem
from tgrl_lib.scoring.evidence import evidence_use, implied_answer
from tgrl_lib.scoring.grounding import extract_claims, grounding_score


def obj(color, shape, x, size="small", px=10):
    return {"shape": shape, "color": color, "size": size, "px": px, "bbox": [x - 5, 20, x + 5, 30],
            "center": [x, 25]}  # fmt: skip


OBJECTS = [obj("red", "circle", 10), obj("red", "square", 25), obj("blue", "triangle", 40)]
SCENE = {"kind": "shapes", "width": 56, "height": 56, "bars": [], "objects": OBJECTS}


def problem(task, answer="2", answer_type="integer", choices=None, facts=SCENE):
    return Problem(id="p", image="i.png", question="q", answer=answer, answer_type=answer_type,
                   choices=choices, facts=facts, meta={"task": task})  # fmt: skip


COUNT = problem({"op": "count_color_plus", "color": "red", "k": 1}, answer="3")


@pytest.mark.parametrize(
    ("text", "correct", "grounded", "follows"),
    [
        # both right: true facts, the answer follows from them
        ("<think>I see 1 red circle, 1 red square, 1 blue triangle. 2 + 1 = 3.</think><answer>3</answer>",
         True, 1.0, True),
        # a right answer from wrong stated facts (says 3 red shapes, then answers 3 anyway)
        ("<think>I see 2 red circles, 1 red square. 3 + 1 = 3.</think><answer>3</answer>", True, 0.5, False),
        # a wrong answer from right facts (the arithmetic step is skipped)
        ("<think>I see 1 red circle, 1 red square, 1 blue triangle.</think><answer>2</answer>", False, 1.0,
         False),
        # wrong facts, wrong answer, but faithful to them: perceived badly, reasoned from its evidence
        ("<think>Red shapes: 3. 3 + 1 = 4.</think><answer>4</answer>", False, 0.0, True),
        # no facts stated: not derivable
        ("<think>Adding one gives three.</think><answer>3</answer>", True, None, None),
    ],
)  # fmt: skip
def test_evidence_use_on_right_and_wrong_responses(text, correct, grounded, follows):
    from tgrl_lib.scoring.rewards import verify

    assert verify(text, COUNT) is correct
    assert grounding_score(text, SCENE) == grounded
    result = evidence_use(text, COUNT)
    assert result.follows is follows
    assert (result.implied is None) is (follows is None)


def test_totals_override_the_inventory_and_absent_colours_count_zero():
    claims = extract_claims("I see 2 red circles, 1 blue square. Red shapes: 5.")
    assert implied_answer(problem({"op": "count_color", "color": "red"}), claims) == "5"
    assert implied_answer(problem({"op": "count_color", "color": "green"}), claims) == "0"
    total = problem({"op": "count_not_color", "color": "blue"})
    assert implied_answer(total, extract_claims("I see 2 red circles, 1 blue square.")) == "2"
    assert implied_answer(total, extract_claims("Shapes: 7. Blue shapes: 1.")) == "6"
    assert implied_answer(total, extract_claims("Blue shapes: 1.")) is None  # the total is never stated


def test_bar_rules_on_stated_values():
    bars = {"kind": "bar_chart", "width": 56, "height": 56, "objects": [], "bars": []}
    said = extract_claims("The bars are: red=3, blue=5, green=1.")
    assert implied_answer(problem({"op": "bar_sum_two", "colors": ["red", "blue"]}, facts=bars), said) == "8"
    assert implied_answer(problem({"op": "bar_range"}, facts=bars), said) == "4"
    assert implied_answer(problem({"op": "bar_count_taller", "color": "red"}, facts=bars), said) == "1"
    mc = {
        "answer": "red",
        "answer_type": "multiple_choice",
        "choices": ["red", "blue", "green"],
        "facts": bars,
    }
    assert implied_answer(problem({"op": "bar_second"}, **mc), said) == "red"
    assert implied_answer(problem({"op": "bar_tallest"}, **mc), said) == "blue"
    stated = extract_claims("The bars are: red=3, blue=5. The tallest bar is red.")  # the explicit claim wins
    assert implied_answer(problem({"op": "bar_tallest"}, **mc), stated) == "red"


def test_relation_order_and_extreme_rules():
    mc = {"answer_type": "multiple_choice", "choices": ["left of", "right of", "above", "below"]}
    rel = problem({"op": "relation", "a": {"color": "blue", "shape": "triangle"},
                   "b": {"color": "red", "shape": "circle"}}, answer="right of", **mc)  # fmt: skip
    answer = "<answer>right of</answer>"
    flipped = "<think>The red circle is left of the blue triangle.</think>" + answer  # the other way round
    assert evidence_use(flipped, rel).follows is True
    assert (
        evidence_use("<think>The blue triangle is above the red circle.</think>" + answer, rel).follows
        is False
    )
    left = problem({"op": "count_left_of", "ref": {"color": "blue", "shape": "triangle"}})
    order = "From right to left: blue triangle, red square, red circle."
    assert implied_answer(left, extract_claims(order)) == "2"
    colours = {"answer": "blue", "answer_type": "multiple_choice", "choices": ["red", "blue", "green"]}
    right = problem({"op": "extreme_attr", "extreme": "rightmost", "attr": "color"}, **colours)
    assert implied_answer(right, extract_claims(order)) == "blue"
    big = problem({"op": "extreme_attr", "extreme": "largest", "attr": "shape"}, answer="circle",
                  answer_type="multiple_choice", choices=["circle", "square", "triangle"])  # fmt: skip
    assert implied_answer(big, extract_claims("I see 1 large red circle, 2 small blue squares.")) == "circle"
    assert implied_answer(big, extract_claims("The biggest shape is a green triangle.")) == "triangle"
    assert implied_answer(big, extract_claims("I see 2 large red circles.")) is None  # no single largest


def test_problems_without_a_task_are_not_derivable():
    bare = Problem(id="x", image="i.png", question="q", answer="1", answer_type="integer")
    assert evidence_use("<think>I see 1 red circle.</think><answer>1</answer>", bare).follows is None
