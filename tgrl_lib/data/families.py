"""The four task families of the synthetic benchmark (`tgrl_lib.data.synthetic`): each draws one scene and
one question about it from a seeded RNG, and returns the question, its answer, the scene's facts and the
machine-readable task (`meta["task"]`). `extra` > 0 draws 1..extra more shapes (bars) than the family's
range at that level (the out-of-distribution split); extra 0 leaves every draw as it was.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

from tgrl_lib.data import render
from tgrl_lib.data.render import COLORS, SHAPES, LayoutError
from tgrl_lib.errors import TgrlError

DIRECTIONS = ("left of", "right of", "above", "below")
COLOR_NAMES = tuple(COLORS)


@dataclass
class Drawn:
    """One generated question about one scene, before it becomes a `Problem`."""

    question: str
    answer: str
    answer_type: str
    facts: dict[str, Any]
    task: dict[str, Any]
    choices: list[str] | None = None


# ------------------------------------------------------------------------------------------ helpers
def describe(obj: dict[str, Any]) -> str:
    return f"{obj['color']} {obj['shape']}"


def _desc(obj: dict[str, Any]) -> dict[str, str]:
    return {"color": obj["color"], "shape": obj["shape"]}


def _count(objects: list[dict[str, Any]], color: str) -> int:
    return sum(o["color"] == color for o in objects)


def _plural(k: int, word: str) -> str:
    return f"{k} {word}" if k == 1 else f"{k} {word}s"


def _unique_specs(rng: random.Random, n: int, sizes: list[str]) -> list[tuple[str, str, str]]:
    """n shapes with distinct (colour, shape) descriptors, so each can be named unambiguously."""
    combos = rng.sample([(c, s) for c in COLOR_NAMES for s in SHAPES], n)
    return [(shape, color, size) for (color, shape), size in zip(combos, sizes, strict=True)]


def _mc(rng: random.Random, answer: str, pool: list[str], k: int) -> list[str]:
    others = [x for x in pool if x != answer]
    choices = [answer, *rng.sample(others, min(k - 1, len(others)))]
    rng.shuffle(choices)
    return choices


def _direction(a: dict[str, Any], b: dict[str, Any], margin: int, min_sep: int) -> str | None:
    """Where `a` is compared with `b` when one axis clearly dominates; None when ambiguous."""
    dx, dy = a["center"][0] - b["center"][0], a["center"][1] - b["center"][1]
    if abs(dx) >= abs(dy) + margin and abs(dx) >= min_sep:
        return "left of" if dx < 0 else "right of"
    if abs(dy) >= abs(dx) + margin and abs(dy) >= min_sep:
        return "above" if dy < 0 else "below"
    return None


def _n(rng: random.Random, lo: int, hi: int, extra: int) -> int:
    """How many shapes (bars): lo..hi, or with `extra` > 0 more than hi (out of distribution)."""
    if extra:
        return hi + rng.randint(1, extra)
    return lo if lo == hi else rng.randint(lo, hi)


def _distinct_x(objects: list[dict[str, Any]], gap: int) -> bool:
    xs = sorted(o["center"][0] for o in objects)
    return all(b - a >= gap for a, b in itertools.pairwise(xs))


# ----------------------------------------------------------------------------------------- families
def count_color_arith(rng: random.Random, difficulty: str, image_size: int, extra: int = 0) -> Drawn:
    easy = difficulty == "easy"
    n = _n(rng, 1, 3, extra) if easy else _n(rng, 4, 6, extra)
    palette = rng.sample(COLOR_NAMES, 2 if easy else rng.randint(3, 4))
    sizes = ("small", "medium", "large") if easy else ("small", "medium")
    colors = [palette[0]] + [rng.choice(palette) for _ in range(n - 1)]
    specs = [(rng.choice(SHAPES), c, rng.choice(sizes)) for c in colors]
    objects = render.place_objects(rng, specs, image_size)
    facts = render.shapes_facts(objects, image_size)
    counts = Counter(o["color"] for o in objects)
    present = sorted(counts, key=COLOR_NAMES.index)
    if easy:
        color = palette[0]
        if rng.random() < 0.5:
            return Drawn(f"How many {color} shapes are there?", str(counts[color]), "integer", facts,
                         {"op": "count_color", "color": color})  # fmt: skip
        k = rng.randint(1, 3)
        verb = "shape was" if k == 1 else "shapes were"
        question = f"How many {color} shapes would there be if {k} more {color} {verb} added?"
        return Drawn(question, str(counts[color] + k), "integer", facts,
                     {"op": "count_color_plus", "color": color, "k": k})  # fmt: skip
    op = rng.choice(["count_not_color", "count_two_colors", "count_color_diff", "count_total_minus"])
    ranked = sorted(present, key=lambda c: (-counts[c], COLOR_NAMES.index(c)))
    if op == "count_color_diff" and counts[ranked[0]] == counts[ranked[-1]]:
        op = "count_two_colors"  # no colour has more shapes than another
    if op == "count_not_color":
        color = rng.choice(present)
        return Drawn(f"How many shapes are not {color}?", str(n - counts[color]), "integer", facts,
                     {"op": op, "color": color})  # fmt: skip
    if op == "count_two_colors":
        c1, c2 = rng.sample(palette, 2)
        return Drawn(f"How many shapes are {c1} or {c2}?", str(counts[c1] + counts[c2]), "integer", facts,
                     {"op": op, "colors": [c1, c2]})  # fmt: skip
    if op == "count_color_diff":
        c1 = rng.choice([c for c in present if counts[c] > counts[ranked[-1]]])
        c2 = rng.choice([c for c in palette if counts[c] < counts[c1]])
        question = f"How many more {c1} shapes than {c2} shapes are there?"
        return Drawn(question, str(counts[c1] - counts[c2]), "integer", facts, {"op": op, "colors": [c1, c2]})
    color = rng.choice(present)
    k = rng.randint(1, counts[color])
    question = (
        f"If {_plural(k, color + ' shape')} {'is' if k == 1 else 'are'} removed, how many shapes are left?"
    )
    return Drawn(question, str(n - k), "integer", facts, {"op": op, "color": color, "k": k})


def bar_chart(rng: random.Random, difficulty: str, image_size: int, extra: int = 0) -> Drawn:
    easy = difficulty == "easy"
    n, max_value = (_n(rng, 2, 2, extra), 5) if easy else (_n(rng, 3, 4, extra), 8)
    if n > len(COLOR_NAMES):
        raise TgrlError(f"a bar chart holds at most {len(COLOR_NAMES)} bars (one per colour), asked for {n}")
    colors = rng.sample(COLOR_NAMES, n)
    values = rng.sample(range(1, max_value + 1), n)  # distinct: "tallest" is never a tie
    facts = render.bar_chart_facts(rng, colors, values, image_size, max_value)
    value = dict(zip(colors, values, strict=True))
    ranked = sorted(colors, key=lambda c: -value[c])
    if easy:
        if rng.random() < 0.5:
            pair = colors if n == 2 else rng.sample(colors, 2)
            c1, c2 = pair if rng.random() < 0.5 else pair[::-1]
            question = f"What is the value of the {c1} bar plus the {c2} bar?"
            return Drawn(
                question,
                str(value[c1] + value[c2]),
                "integer",
                facts,
                {"op": "bar_sum_two", "colors": [c1, c2]},
            )
        choices = _mc(rng, ranked[0], list(COLOR_NAMES), 3)
        return Drawn(
            "Which bar is the tallest?", ranked[0], "multiple_choice", facts, {"op": "bar_tallest"}, choices
        )
    op = rng.choice(["bar_sum_all", "bar_range", "bar_second", "bar_count_taller"])
    if op == "bar_sum_all":
        return Drawn("What is the sum of all the bar values?", str(sum(values)), "integer", facts, {"op": op})
    if op == "bar_range":
        question = "How much taller is the tallest bar than the shortest bar?"
        return Drawn(question, str(max(values) - min(values)), "integer", facts, {"op": op})
    if op == "bar_second":
        choices = _mc(rng, ranked[1], colors, len(colors))
        return Drawn(
            "Which bar is the second tallest?", ranked[1], "multiple_choice", facts, {"op": op}, choices
        )
    color = rng.choice(colors)
    taller = sum(v > value[color] for v in values)
    return Drawn(f"How many bars are taller than the {color} bar?", str(taller), "integer", facts,
                 {"op": op, "color": color})  # fmt: skip


def spatial(rng: random.Random, difficulty: str, image_size: int, extra: int = 0) -> Drawn:
    easy = difficulty == "easy"
    scale = image_size / render.BASE_SIZE
    margin, min_sep = round(6 * scale), round(12 * scale)
    n = _n(rng, 2, 2, extra) if easy else _n(rng, 3, 5, extra)
    sizes = [rng.choice(("small", "medium", "large") if easy else ("small", "medium")) for _ in range(n)]
    objects = render.place_objects(rng, _unique_specs(rng, n, sizes), image_size)
    facts = render.shapes_facts(objects, image_size)
    if not easy and rng.random() < 0.5:
        if not _distinct_x(objects, round(3 * scale)):
            raise LayoutError("shapes too close in x to order them")
        ref = rng.choice(objects)
        left = sum(o["center"][0] < ref["center"][0] for o in objects)
        question = f"How many shapes are to the left of the {describe(ref)}?"
        return Drawn(question, str(left), "integer", facts, {"op": "count_left_of", "ref": _desc(ref)})
    want = rng.choice(DIRECTIONS)
    pairs = [
        (a, b) for a in objects for b in objects if a is not b and _direction(a, b, margin, min_sep) == want
    ]
    if not pairs:
        raise LayoutError(f"no pair of shapes with a clear '{want}' relation")
    a, b = rng.choice(pairs)
    choices = list(DIRECTIONS)
    rng.shuffle(choices)
    question = f"Where is the {describe(a)} compared with the {describe(b)}?"
    return Drawn(
        question, want, "multiple_choice", facts, {"op": "relation", "a": _desc(a), "b": _desc(b)}, choices
    )


def largest_attribute(rng: random.Random, difficulty: str, image_size: int, extra: int = 0) -> Drawn:
    easy = difficulty == "easy"
    scale = image_size / render.BASE_SIZE
    extreme = "largest" if easy else rng.choice(["largest", "smallest", "leftmost", "rightmost"])
    n = _n(rng, 2, 3, extra) if easy else _n(rng, 4, 5, extra)
    if extreme == "largest":
        sizes = ["large"] + [rng.choice(("small",) if easy else ("small", "medium")) for _ in range(n - 1)]
    elif extreme == "smallest":
        sizes = ["small"] + [rng.choice(("medium", "large")) for _ in range(n - 1)]
    else:
        sizes = [rng.choice(("small", "medium")) for _ in range(n)]
    objects = render.place_objects(rng, _unique_specs(rng, n, sizes), image_size)
    facts = render.shapes_facts(objects, image_size)
    if extreme in ("leftmost", "rightmost") and not _distinct_x(objects, round(3 * scale)):
        raise LayoutError("shapes too close in x to tell which is leftmost")
    key = {
        "largest": lambda o: -o["px"],
        "smallest": lambda o: o["px"],
        "leftmost": lambda o: o["center"][0],
        "rightmost": lambda o: -o["center"][0],
    }[extreme]
    target = min(objects, key=key)
    attr = rng.choice(["color", "shape"])
    answer = target[attr]
    pool = list(COLOR_NAMES) if attr == "color" else list(SHAPES)
    choices = _mc(rng, answer, pool, 3 if easy or attr == "shape" else 4)
    what = "colour" if attr == "color" else "shape"
    noun = "shape" if attr == "color" else "object"
    question = f"What {what} is the {extreme} {noun}?"
    return Drawn(
        question,
        answer,
        "multiple_choice",
        facts,
        {"op": "extreme_attr", "extreme": extreme, "attr": attr},
        choices,
    )


GENERATORS = {
    "count_color_arith": count_color_arith,
    "bar_chart": bar_chart,
    "spatial": spatial,
    "largest_attribute": largest_attribute,
}
