"""Oracle expert: a grounded reasoning trajectory written from a synthetic problem's `facts`.

The response first states the visual evidence (in the phrasing `tgrl_lib.scoring.grounding` reads), then
reasons, then answers, e.g.

    <think>I see 2 red circles, 1 blue square. Red shapes: 2. 2 + 1 = 3.</think><answer>3</answer>

It is short (under ~45 words) so that it fits the tiny model's budget. The answer is computed from the
facts and the machine-readable question in `meta["task"]` (written by `tgrl_lib.data.synthetic`), not
copied from `Problem.answer`. Multiple-choice answers are the choice text.

Faults, injected at `fault_rate` so that trajectory filters have real work (recorded in `meta["fault"]`):

- `wrong_fact`: one stated fact is false (a count +1, a relation flipped, an order swapped, an extreme
  object recoloured, a bar value changed); the answer is still right. Only the grounding filter can tell.
- `wrong_arithmetic`: the final result (and answer) is wrong.
- `bad_format`: missing or broken `<think>` / `<answer>` tags.
- `repetition`: the first sentence repeated a dozen times (degenerate generation).

Phrasing (`phrasing="varied"`, `GenerateConfig.oracle_phrasing`): each sample draws its own wording (four
inventory openings, totals as "Red shapes: 2" or "That makes 2 red shapes", three bar listings, a relation
stated either way round, an order left-to-right or right-to-left, two extreme phrasings), a shuffled order of
its evidence sentences, inventory items and bars, and a connector before the reasoning step ("So", "Then",
"Hence"), all from the sample's seeded RNG, so K samples of one problem give several distinct experts that
the duplicates filter keeps apart, while true repeats stay identical. Default "fixed": the one phrasing
above (what earlier tables were made with).

Problems without facts or task (imported benchmarks) get a minimal answer-only trajectory; `wrong_fact` does
not apply to them and is recorded as no fault.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from tgrl_lib.data.schema import Problem
from tgrl_lib.errors import TgrlError

FAULT_KINDS = ("wrong_fact", "wrong_arithmetic", "bad_format", "repetition")
COLOR_ORDER = ("red", "green", "blue", "yellow")
SHAPE_ORDER = ("circle", "square", "triangle")
SIZE_ORDER = ("large", "medium", "small")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
REPEATS = 12
PHRASINGS = ("fixed", "varied")


@dataclass
class Reasoning:
    """What the oracle will say: evidence items (each can be made false), steps, and the answer.

    Evidence items: ("see", [[n, words], ...]) | ("total", colour|None, n) | ("bars", [[colour, value], ...])
    | ("relation", a, relation, b) | ("order", [words, ...]) | ("extreme", which, words)
    | ("bar_extreme", which, colour). Steps may hold `{result}`, replaced by the (possibly wrong) answer.
    """

    evidence: list[list[Any]]
    steps: list[str] = field(default_factory=list)
    answer: str = ""
    numeric: bool = True
    choices: list[str] | None = None


# --------------------------------------------------------------------------------------- evidence
def _words(obj: dict[str, Any], with_size: bool = False) -> str:
    base = f"{obj['color']} {obj['shape']}"
    return f"{obj['size']} {base}" if with_size else base


def _see(objects: list[dict[str, Any]], with_size: bool = False) -> list[Any]:
    groups = Counter(
        (SIZE_ORDER.index(o["size"]) if with_size else 0, COLOR_ORDER.index(o["color"]),
         SHAPE_ORDER.index(o["shape"]), _words(o, with_size))
        for o in objects
    )  # fmt: skip
    return ["see", [[n, key[3]] for key, n in sorted(groups.items())]]


def _order(objects: list[dict[str, Any]]) -> list[Any]:
    return ["order", [_words(o) for o in sorted(objects, key=lambda o: o["center"][0])]]


def _find(objects: list[dict[str, Any]], desc: dict[str, str]) -> dict[str, Any]:
    hits = [o for o in objects if o["color"] == desc["color"] and o["shape"] == desc["shape"]]
    if len(hits) != 1:
        raise TgrlError(f"oracle: the task names {desc}, which is not a unique shape in the facts")
    return hits[0]


# ---------------------------------------------------------------------------------------- reasoning
def _count_reasoning(task: dict[str, Any], objects: list[dict[str, Any]]) -> Reasoning:
    counts = Counter(o["color"] for o in objects)
    n, op = len(objects), task["op"]
    see = _see(objects)
    if op in ("count_color", "count_color_plus"):
        c = counts[task["color"]]
        if op == "count_color":
            return Reasoning([see, ["total", task["color"], c]], [], str(c))
        return Reasoning(
            [see, ["total", task["color"], c]], [f"{c} + {task['k']} = {{result}}."], str(c + task["k"])
        )
    if op == "count_not_color":
        c = counts[task["color"]]
        return Reasoning(
            [see, ["total", None, n], ["total", task["color"], c]], [f"{n} - {c} = {{result}}."], str(n - c)
        )
    if op in ("count_two_colors", "count_color_diff"):
        c1, c2 = task["colors"]
        a, b = counts[c1], counts[c2]
        sign, result = ("+", a + b) if op == "count_two_colors" else ("-", a - b)
        evidence = [see, ["total", c1, a], ["total", c2, b]]
        return Reasoning(evidence, [f"{a} {sign} {b} = {{result}}."], str(result))
    if op == "count_total_minus":
        return Reasoning([see, ["total", None, n]], [f"{n} - {task['k']} = {{result}}."], str(n - task["k"]))
    raise TgrlError(f"oracle: unknown task op {op!r}")


def _bar_reasoning(task: dict[str, Any], bars: list[dict[str, Any]], choices: list[str] | None) -> Reasoning:
    value = {b["color"]: b["value"] for b in bars}
    evidence: list[list[Any]] = [["bars", [[b["color"], b["value"]] for b in bars]]]
    ranked = sorted(value, key=lambda c: -value[c])
    op = task["op"]
    if op == "bar_sum_two":
        a, b = (value[c] for c in task["colors"])
        return Reasoning(evidence, [f"{a} + {b} = {{result}}."], str(a + b))
    if op == "bar_sum_all":
        values = [b["value"] for b in bars]
        return Reasoning(evidence, [" + ".join(map(str, values)) + " = {result}."], str(sum(values)))
    if op == "bar_range":
        evidence += [["bar_extreme", "tallest", ranked[0]], ["bar_extreme", "shortest", ranked[-1]]]
        top, low = value[ranked[0]], value[ranked[-1]]
        return Reasoning(evidence, [f"{top} - {low} = {{result}}."], str(top - low))
    if op == "bar_count_taller":
        color = task["color"]
        taller = [c for c in ranked if value[c] > value[color]]
        step = f"Taller than {color}: {', '.join(taller) or 'none'}. Count: {{result}}."
        return Reasoning(evidence, [step], str(len(taller)))
    if op == "bar_tallest":
        evidence.append(["bar_extreme", "tallest", ranked[0]])
        return Reasoning(evidence, [], ranked[0], numeric=False, choices=choices)
    if op == "bar_second":
        return Reasoning(evidence, ["Second tallest: {result}."], ranked[1], numeric=False, choices=choices)
    raise TgrlError(f"oracle: unknown task op {op!r}")


def _spatial_reasoning(
    task: dict[str, Any], objects: list[dict[str, Any]], choices: list[str] | None
) -> Reasoning:
    if task["op"] == "count_left_of":
        ref = _find(objects, task["ref"])
        left = sum(o["center"][0] < ref["center"][0] for o in objects)
        return Reasoning([_order(objects)], [f"Left of the {_words(ref)}: {{result}}."], str(left))
    a, b = _find(objects, task["a"]), _find(objects, task["b"])
    (ax, ay), (bx, by) = a["center"], b["center"]
    dx, dy = ax - bx, ay - by
    if abs(dx) >= abs(dy):
        relation = "left of" if dx < 0 else "right of"
    else:
        relation = "above" if dy < 0 else "below"
    evidence = [_see(objects), ["relation", _words(a), relation, _words(b)]]
    return Reasoning(evidence, [], relation, numeric=False, choices=choices)


def _extreme_reasoning(
    task: dict[str, Any], objects: list[dict[str, Any]], choices: list[str] | None
) -> Reasoning:
    which = task["extreme"]
    key = {
        "largest": lambda o: -o["px"],
        "smallest": lambda o: o["px"],
        "leftmost": lambda o: o["center"][0],
        "rightmost": lambda o: -o["center"][0],
    }[which]
    target = min(objects, key=key)
    first = _see(objects, with_size=True) if which in ("largest", "smallest") else _order(objects)
    evidence = [first, ["extreme", which, _words(target)]]
    return Reasoning(evidence, [], target[task["attr"]], numeric=False, choices=choices)


def reason(problem: Problem) -> Reasoning | None:
    """The oracle's reasoning for a synthetic problem; None when the problem has no facts or task."""
    task = (problem.meta or {}).get("task")
    facts = problem.facts
    if not facts or not isinstance(task, dict) or "op" not in task:
        return None
    op = task["op"]
    if op.startswith("count_") and op != "count_left_of":
        return _count_reasoning(task, facts["objects"])
    if op.startswith("bar_"):
        return _bar_reasoning(task, facts["bars"], problem.choices)
    if op in ("relation", "count_left_of"):
        return _spatial_reasoning(task, facts["objects"], problem.choices)
    if op == "extreme_attr":
        return _extreme_reasoning(task, facts["objects"], problem.choices)
    raise TgrlError(f"oracle: unknown task op {op!r}", hint=f"problem {problem.id}")


# ---------------------------------------------------------------------------------------- rendering
@dataclass(frozen=True)
class Style:
    """How one sample is worded: each field indexes a phrasing below (0 everywhere = the fixed phrasing).

    `shuffle` also reorders the evidence sentences, the shapes of an inventory and the bars of a listing;
    every phrasing is one that `tgrl_lib.scoring.grounding` reads (a test holds them to that)."""

    see: int = 0
    total: int = 0
    bars: int = 0
    relation: int = 0
    order: int = 0
    extreme: int = 0
    connector: int = 0
    shuffle: bool = False

    @classmethod
    def draw(cls, rng: random.Random) -> Style:
        see, total, bars, relation, order, extreme = (rng.randrange(k) for k in (len(SEE), 2, 3, 3, 3, 2))
        return cls(see, total, bars, relation, order, extreme, rng.randrange(len(CONNECTORS)), shuffle=True)


FIXED = Style()
SEE = ("I see {}.", "There are {}.", "The image shows {}.", "In the picture: {}.")
CONNECTORS = ("", "So ", "Then ", "Hence ")


def _plural(n: int, words: str) -> str:
    return f"{n} {words}{'s' if n != 1 else ''}"


def _listing(parts: list[str], style: Style) -> str:
    if style.see % 2 and len(parts) > 1:  # "a, b and c"
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return ", ".join(parts)


def _sentence(item: list[Any], style: Style = FIXED) -> str:
    kind = item[0]
    if kind == "see":
        return SEE[style.see].format(_listing([_plural(n, w) for n, w in item[1]], style))
    if kind == "total":
        if style.total:
            noun = f"{item[1]} shape" if item[1] else "shape"
            return f"That makes {_plural(item[2], noun)}."
        return f"{item[1].capitalize()} shapes: {item[2]}." if item[1] else f"Shapes: {item[2]}."
    if kind == "bars":
        if style.bars == 1:
            return "Bar values: " + ", ".join(f"{c} = {v}" for c, v in item[1]) + "."
        if style.bars == 2:
            listing = ", ".join(f"the {c} bar is {v}" for c, v in item[1])
            return listing[0].upper() + listing[1:] + "."
        return "The bars are: " + ", ".join(f"{c}={v}" for c, v in item[1]) + "."
    if kind == "relation":
        _, a, relation, b = item
        if style.relation == 1:
            return f"The {b} is {OPPOSITE[relation]} the {a}."  # the same fact, the other way round
        if style.relation == 2 and relation in ("left of", "right of"):
            return f"The {a} is to the {relation} the {b}."
        return f"The {a} is {relation} the {b}."
    if kind == "order":
        if style.order == 1:
            return "From right to left: " + ", ".join(item[1][::-1]) + "."
        return (
            ("Ordered from" if style.order == 2 else "From") + " left to right: " + ", ".join(item[1]) + "."
        )
    if kind == "extreme":
        if style.extreme:
            return f"The {item[1]} object is the {item[2]}."
        return f"The {item[1]} shape is a {item[2]}."
    if style.extreme:  # bar_extreme
        return f"The {item[1]} bar is the {item[2]} bar."
    return f"The {item[1]} bar is {item[2]}."


def _shuffled(item: list[Any], rng: random.Random) -> list[Any]:
    """An inventory or bar listing in another order (the facts are unchanged)."""
    if item[0] in ("see", "bars"):
        parts = list(item[1])
        rng.shuffle(parts)
        return [item[0], parts]
    return item


def _step(text: str, style: Style) -> str:
    connector = CONNECTORS[style.connector]
    if not connector:
        return text
    return connector + (text[0].lower() + text[1:] if text[:1].isalpha() else text)


def _corrupt(item: list[Any], rng: random.Random) -> list[Any]:
    """The same evidence item made false (see the module docstring)."""
    kind = item[0]
    if kind == "see":
        groups = [list(g) for g in item[1]]
        pick = rng.randrange(len(groups))
        groups[pick][0] += 1
        return ["see", groups]
    if kind == "total":
        return ["total", item[1], item[2] + 1]
    if kind == "bars":
        bars = [list(b) for b in item[1]]
        bars[rng.randrange(len(bars))][1] += rng.choice((1, 2))
        return ["bars", bars]
    if kind == "relation":
        return ["relation", item[1], OPPOSITE[item[2]], item[3]]
    if kind == "order" and len(item[1]) >= 2:
        order = list(item[1])
        i = rng.randrange(len(order) - 1)
        order[i], order[i + 1] = order[i + 1], order[i]
        return ["order", order]
    if kind == "extreme":
        color, shape = item[2].split(" ", 1)
        return ["extreme", item[1], f"{rng.choice([c for c in COLOR_ORDER if c != color])} {shape}"]
    if kind == "bar_extreme":
        return ["bar_extreme", item[1], rng.choice([c for c in COLOR_ORDER if c != item[2]])]
    raise TgrlError(f"oracle: cannot corrupt evidence {kind!r}")


def _wrong_answer(reasoning: Reasoning, rng: random.Random) -> str:
    if reasoning.numeric:
        truth = int(reasoning.answer)
        delta = rng.choice((1, 2))
        return str(truth + delta if truth - delta < 0 or rng.random() < 0.5 else truth - delta)
    options = [c for c in (reasoning.choices or []) if c != reasoning.answer] or ["none"]
    return rng.choice(options)


def _render(reasoning: Reasoning, rng: random.Random, fault: str | None, style: Style = FIXED) -> str:
    evidence = list(reasoning.evidence)
    if style.shuffle:
        evidence = [_shuffled(item, rng) for item in evidence]
        rng.shuffle(evidence)
    if fault == "wrong_fact":
        pick = rng.randrange(len(evidence))
        evidence[pick] = _corrupt(evidence[pick], rng)
    answer = _wrong_answer(reasoning, rng) if fault == "wrong_arithmetic" else reasoning.answer
    sentences = [_sentence(item, style) for item in evidence]
    sentences += [_step(s.format(result=answer), style) for s in reasoning.steps]
    body = " ".join(sentences)
    if fault == "repetition":
        body = " ".join([sentences[0]] * REPEATS)
    if fault == "bad_format":
        return _bad_format(body, answer, rng)
    return f"<think>{body}</think><answer>{answer}</answer>"


def _bad_format(body: str, answer: str, rng: random.Random) -> str:
    """No answer tags, think never closed, answer first, or no think tags."""
    a, b = f"<think>{body}</think>", f"<answer>{answer}</answer>"
    return rng.choice([a + answer, f"<think>{body}{b}", b + a, f"{body} {b}"])


def respond(
    problem: Problem, rng: random.Random | None = None, fault: str | None = None, varied: bool = False
) -> tuple[str, str | None]:
    """`(text, fault actually injected)`; see `oracle_response`. `varied` draws the wording, fact order and
    reasoning phrasing from `rng` (`Style.draw`); otherwise the fixed phrasing is written."""
    if fault is not None and fault not in FAULT_KINDS:
        raise TgrlError(f"unknown oracle fault {fault!r}", hint=f"choose from {', '.join(FAULT_KINDS)}")
    rng = rng or random.Random(0)
    reasoning = reason(problem)
    if reasoning is None:  # imported problem: no facts to state
        if fault == "wrong_fact":
            fault = None
        mc = problem.answer_type == "multiple_choice"
        reasoning = Reasoning([], ["The answer follows from the image."], problem.answer, numeric=False,
                              choices=problem.choices if mc else None)  # fmt: skip
        if fault == "wrong_arithmetic" and not mc:
            return f"<think>{reasoning.steps[0]}</think><answer>{problem.answer} + 1</answer>", fault
    style = Style.draw(rng) if varied else FIXED
    return _render(reasoning, rng, fault, style), fault


def oracle_response(problem: Problem, rng: random.Random | None = None, fault: str | None = None) -> str:
    """The oracle's `<think>evidence. reasoning.</think><answer>X</answer>` for `problem`, with `fault`
    (one of FAULT_KINDS) injected when given. `rng` picks how a fault is injected (default: seeded 0)."""
    return respond(problem, rng, fault)[0]


class OracleExpert:
    """The oracle as a generation backend: `generate(problems, images, samples=K)` -> K texts per problem.

    Sample j of problem p draws from its own RNG (sha256 of seed, p.id, j), so reruns and resumed runs
    give the same texts and the same faults.
    """

    name = "oracle"

    def __init__(
        self,
        fault_rate: float = 0.0,
        fault_kinds: tuple[str, ...] | list[str] = FAULT_KINDS,
        seed: int = 0,
        phrasing: str = "fixed",
    ):
        if not 0.0 <= fault_rate <= 1.0:
            raise TgrlError(f"oracle fault_rate must be in [0, 1], got {fault_rate}")
        unknown = [k for k in fault_kinds if k not in FAULT_KINDS]
        if unknown or (fault_rate > 0 and not fault_kinds):
            raise TgrlError(
                f"unknown or no oracle fault kinds {unknown}", hint=f"choose from {', '.join(FAULT_KINDS)}"
            )
        if phrasing not in PHRASINGS:
            raise TgrlError(
                f"unknown oracle phrasing {phrasing!r}", hint=f"choose from {', '.join(PHRASINGS)}"
            )
        self.fault_rate = fault_rate
        self.fault_kinds = tuple(fault_kinds)
        self.seed = seed
        self.varied = phrasing == "varied"

    @classmethod
    def from_config(cls, config: Any) -> OracleExpert:
        """From a `GenerateConfig` (fault_rate, fault_kinds, seed, oracle_phrasing)."""
        return cls(
            fault_rate=config.fault_rate,
            fault_kinds=tuple(config.fault_kinds),
            seed=config.seed,
            phrasing=config.oracle_phrasing,
        )

    def _rng(self, problem_id: str, sample: int) -> random.Random:
        digest = hashlib.sha256(f"oracle|{self.seed}|{problem_id}|{sample}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def generate_with_meta(
        self, problems: list[Problem], images: list | None = None, *, samples: int = 1
    ) -> list[list[tuple[str, dict[str, Any]]]]:
        """`[(text, {"fault": kind | None, "sample": j}), ...]` per problem; images are not needed."""
        out = []
        for problem in problems:
            row = []
            for j in range(samples):
                rng = self._rng(problem.id, j)
                fault = rng.choice(self.fault_kinds) if rng.random() < self.fault_rate else None
                text, applied = respond(problem, rng, fault, self.varied)
                row.append((text, {"fault": applied, "sample": j}))
            out.append(row)
        return out

    def generate(
        self, problems: list[Problem], images: list | None = None, *, samples: int = 1
    ) -> list[list[str]]:
        return [
            [text for text, _ in row] for row in self.generate_with_meta(problems, images, samples=samples)
        ]
