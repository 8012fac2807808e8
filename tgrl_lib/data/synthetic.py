"""Synthetic visual-reasoning benchmark: small images of coloured shapes and bar charts with questions whose
answer needs visual evidence plus one reasoning step, and the ground-truth `facts` of every image.

Families (each with an `easy` and a `hard` level; `meta["task"]` holds the machine-readable question):

- `count_color_arith`: count the shapes of a colour, then add or subtract (integer).
  easy: 1-3 shapes in 2 colours; hard: 4-6 shapes in 3-4 colours, two counts or total minus a count.
- `bar_chart`: read bar heights (bars named by colour), then sum, compare or rank.
  easy: 2 bars, values 1-5; hard: 3-4 bars, values 1-8 (integer or multiple choice).
- `spatial`: where one shape is relative to another (multiple choice: left of / right of / above / below),
  or how many shapes lie left of a reference. easy: 2 shapes; hard: 3-5 shapes.
- `largest_attribute`: colour or shape of the largest / smallest / leftmost / rightmost shape (multiple
  choice). easy: 2-3 shapes, one clearly larger; hard: 4-5 shapes in three sizes or by position.

Multiple-choice answers hold the correct choice's text (MathVista convention). Generation is deterministic:
problem i of split s draws from its own RNG seeded by sha256(seed, s, i, attempt), images are drawn from
the facts (`render.draw_png`), so the same arguments give byte-identical directories. The same image
(facts) never appears twice in a split, and `exclude` keys keep a test split disjoint from a train split.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgrl_lib.data import render
from tgrl_lib.data.outdir import prepare_out_dir
from tgrl_lib.data.render import COLORS, SHAPES, LayoutError
from tgrl_lib.data.schema import IMAGES, DatasetWriter, Manifest, Problem, read_manifest
from tgrl_lib.errors import TgrlError

FAMILIES = ("count_color_arith", "bar_chart", "spatial", "largest_attribute")
DIFFICULTIES = ("easy", "hard")
DIRECTIONS = ("left of", "right of", "above", "below")
GENERATOR = "tgrl.synthetic/1"
MAX_ATTEMPTS = 1000
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


# ------------------------------------------------------------------------------------------- keys
def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def scene_key(facts: dict[str, Any]) -> str:
    """Identity of an image: equal facts draw equal images."""
    return "scene:" + hashlib.sha256(canonical(facts).encode()).hexdigest()


def pair_key(question: str, facts: dict[str, Any]) -> str:
    """Identity of a (question, facts) pair."""
    return "pair:" + hashlib.sha256(canonical({"q": question, "facts": facts}).encode()).hexdigest()


def problem_rng(seed: int, split: str, index: int, attempt: int) -> random.Random:
    digest = hashlib.sha256(f"{GENERATOR}|{seed}|{split}|{index}|{attempt}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


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


def _distinct_x(objects: list[dict[str, Any]], gap: int) -> bool:
    xs = sorted(o["center"][0] for o in objects)
    return all(b - a >= gap for a, b in itertools.pairwise(xs))


# ----------------------------------------------------------------------------------------- families
def count_color_arith(rng: random.Random, difficulty: str, image_size: int) -> Drawn:
    easy = difficulty == "easy"
    n = rng.randint(1, 3) if easy else rng.randint(4, 6)
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


def bar_chart(rng: random.Random, difficulty: str, image_size: int) -> Drawn:
    easy = difficulty == "easy"
    n, max_value = (2, 5) if easy else (rng.randint(3, 4), 8)
    colors = rng.sample(COLOR_NAMES, n)
    values = rng.sample(range(1, max_value + 1), n)  # distinct: "tallest" is never a tie
    facts = render.bar_chart_facts(rng, colors, values, image_size, max_value)
    value = dict(zip(colors, values, strict=True))
    ranked = sorted(colors, key=lambda c: -value[c])
    if easy:
        if rng.random() < 0.5:
            c1, c2 = colors if rng.random() < 0.5 else colors[::-1]
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


def spatial(rng: random.Random, difficulty: str, image_size: int) -> Drawn:
    easy = difficulty == "easy"
    scale = image_size / render.BASE_SIZE
    margin, min_sep = round(6 * scale), round(12 * scale)
    n = 2 if easy else rng.randint(3, 5)
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


def largest_attribute(rng: random.Random, difficulty: str, image_size: int) -> Drawn:
    easy = difficulty == "easy"
    scale = image_size / render.BASE_SIZE
    extreme = "largest" if easy else rng.choice(["largest", "smallest", "leftmost", "rightmost"])
    n = rng.randint(2, 3) if easy else rng.randint(4, 5)
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


# ------------------------------------------------------------------------------------------ driver
def _check_choice(
    names: list[str] | tuple[str, ...] | None, known: tuple[str, ...], what: str
) -> tuple[str, ...]:
    chosen = tuple(names) if names else known
    unknown = [x for x in chosen if x not in known]
    if unknown:
        raise TgrlError(
            f"unknown {what} {', '.join(map(repr, unknown))}", hint=f"choose from {', '.join(known)}"
        )
    return chosen


def draw_problem(
    seed: int, split: str, index: int, family: str, difficulty: str, image_size: int, exclude: set[str]
) -> tuple[Drawn, str, str]:
    """Problem `index` of a split: the first attempt whose image and (question, facts) are not excluded."""
    for attempt in range(MAX_ATTEMPTS):
        rng = problem_rng(seed, split, index, attempt)
        try:
            drawn = GENERATORS[family](rng, difficulty, image_size)
        except LayoutError:
            continue
        skey, pkey = scene_key(drawn.facts), pair_key(drawn.question, drawn.facts)
        if skey not in exclude and pkey not in exclude:
            return drawn, skey, pkey
    raise TgrlError(f"could not draw a new {family}/{difficulty} problem after {MAX_ATTEMPTS} attempts")


def _synthesize(
    out_dir: Path | str,
    *,
    n: int,
    seed: int,
    split: str,
    image_size: int,
    families: list[str] | tuple[str, ...] | None,
    difficulties: list[str] | tuple[str, ...] | None,
    exclude: set[str] | None,
) -> tuple[Manifest, set[str]]:
    from tgrl_lib.progress import progress_bar

    if n < 0:
        raise TgrlError(f"--n must be >= 0, got {n}")
    render.check_image_size(image_size)
    fams = _check_choice(families, FAMILIES, "family")
    levels = _check_choice(difficulties, DIFFICULTIES, "difficulty")
    combos = [(f, d) for f in fams for d in levels]
    root = Path(out_dir)
    prepare_out_dir(root)
    meta = {"generator": GENERATOR, "seed": seed, "split": split, "n": n, "image_size": image_size,
            "families": list(fams), "difficulties": list(levels)}  # fmt: skip
    taken = set(exclude or ())
    keys: set[str] = set()
    with (
        DatasetWriter(root, "problems", created_by="tgrl data synth", meta=meta) as writer,
        progress_bar(f"synth {split}", n) as advance,
    ):
        for index in range(n):
            family, difficulty = combos[index % len(combos)]  # round robin: every combination appears
            drawn, skey, pkey = draw_problem(seed, split, index, family, difficulty, image_size, taken)
            taken.add(skey)  # one image per problem: never twice in a split
            keys.update((skey, pkey))
            pid = f"synth-{split}-{index:06d}"
            image = f"{IMAGES}/{pid}.png"
            writer.add_image(image, render.draw_png(drawn.facts))
            problem = Problem(
                id=pid,
                image=image,
                question=drawn.question,
                answer=drawn.answer,
                answer_type=drawn.answer_type,
                choices=drawn.choices,
                source="synthetic",
                split=split,
                facts=drawn.facts,
                meta={"family": family, "difficulty": difficulty, "task": drawn.task},
            )
            writer.write([problem], sync=False)
            advance()
    return read_manifest(root), keys  # the writer wrote the manifest on leaving the block


def synthesize(
    out_dir: Path | str,
    *,
    n: int,
    seed: int,
    split: str = "train",
    image_size: int = 56,
    families: list[str] | tuple[str, ...] | None = None,
    difficulties: list[str] | tuple[str, ...] | None = DIFFICULTIES,
    exclude: set[str] | None = None,
) -> Manifest:
    """Write `n` problems into the dataset directory `out_dir` (replacing a previous synthetic dataset there).

    `exclude` holds `scene_key`/`pair_key` values that may not be produced (keeps test away from train).
    """
    manifest, _ = _synthesize(out_dir, n=n, seed=seed, split=split, image_size=image_size, families=families,
                              difficulties=difficulties, exclude=exclude)  # fmt: skip
    return manifest


def synthesize_splits(
    out_root: Path | str,
    n_train: int,
    n_test: int,
    seed: int,
    *,
    image_size: int = 56,
    families: list[str] | tuple[str, ...] | None = None,
    difficulties: list[str] | tuple[str, ...] | None = DIFFICULTIES,
) -> dict[str, Manifest]:
    """`out_root/train` and `out_root/test`: the test split shares no image and no (question, facts) pair
    with the train split."""
    root = Path(out_root)
    if (root / "manifest.json").exists():
        raise TgrlError("is a dataset itself; train/ and test/ go into a plain directory", path=root)
    common = {"seed": seed, "image_size": image_size, "families": families, "difficulties": difficulties}
    train, keys = _synthesize(root / "train", n=n_train, split="train", exclude=None, **common)
    test, _ = _synthesize(root / "test", n=n_test, split="test", exclude=keys, **common)
    return {"train": train, "test": test}
