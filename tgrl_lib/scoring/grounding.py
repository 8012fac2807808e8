"""Visual grounding: the claims about the image stated in a reasoning text, checked against the scene facts.

TGRL's premise is that a policy can answer right while misreading the image; this module measures that. It
reads the phrasing the oracle expert writes (and close variants a model picks up), never raises on free
text, and runs in linear time (fixed regular expressions without nested repetition, one pass each).

Understood claims (case-insensitive; `DESC` is `[size] [colour] shape`, e.g. "small red circle", "blue
shape"; numbers are digits, "a"/"an", "no" or one..ten):

- count:     "I see 2 red circles, 1 blue square", "there is a large green triangle" -> exactly N such
- total:     "Red shapes: 3", "Shapes: 5"                        -> N shapes (of that colour)
- bar value: "The bars are: red=3, B=5", "the red bar is 3"      -> a bar named by colour or label
- relation:  "The red circle is left of | right of | above | below the blue square" -> centre x / y
- order:     "From left to right: red circle, blue square, green triangle" -> consecutive pairs
- extreme:   "The largest | smallest | leftmost | rightmost | topmost | bottommost shape is a red circle"
- bar rank:  "The tallest | shortest bar is blue"

A claim is true or false against the facts; it is unknown (not counted as stated) when it cannot be decided:
bar claims on a scene without bars, or a relation between descriptors that match several shapes with mixed
outcomes. A claim naming a shape or bar that does not exist is false.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

COLOR = r"red|green|blue|yellow"
SHAPE = r"circle|square|triangle"
SIZE = r"small|medium|large"
NUMBER_WORDS = {
    "no": 0, "zero": 0, "a": 1, "an": 1, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip
NUMBER = r"\d{1,3}|" + "|".join(NUMBER_WORDS)
LABEL = rf"{COLOR}|(?-i:[A-H])"  # bars are named by colour or by an upper-case letter


def _desc(p: str) -> str:
    return (
        rf"(?:(?P<{p}size>{SIZE})\s+)?(?:(?P<{p}color>{COLOR})\s+)?"
        rf"(?P<{p}shape>{SHAPE}|shape|object)s?\b"
    )


_DESC_PLAIN = rf"(?:(?:{SIZE})\s+)?(?:(?:{COLOR})\s+)?(?:{SHAPE}|shape|object)s?\b"
_FLAGS = re.IGNORECASE
ORDER = re.compile(
    r"\bfrom\s+(?P<dir>left\s+to\s+right|right\s+to\s+left|top\s+to\s+bottom|bottom\s+to\s+top)\s*:?\s*"
    rf"(?P<items>{_DESC_PLAIN}(?:\s*,\s*(?:and\s+)?{_DESC_PLAIN})+)",
    _FLAGS,
)
RELATION = re.compile(
    rf"\bthe\s+{_desc('a')}\s+is\s+(?:to\s+the\s+)?(?P<rel>left\s+of|right\s+of|above|below)\s+the\s+{_desc('b')}",
    _FLAGS,
)
EXTREME = re.compile(
    r"\bthe\s+(?P<ext>largest|biggest|smallest|leftmost|rightmost|topmost|highest|bottommost|lowest)\s+"
    rf"(?:shape|object)\s+is\s+(?:a|an|the)\s+{_desc('t')}",
    _FLAGS,
)
BAR_EXTREME = re.compile(
    rf"\bthe\s+(?P<ext>tallest|shortest)\s+bar\s+is\s+(?:the\s+)?(?P<label>{LABEL})\b(?:\s+bar\b)?", _FLAGS
)
BAR = re.compile(
    rf"\b(?:the\s+(?P<label2>{LABEL})\s+bar\s+is\s+(?P<value2>\d{{1,4}})\b"
    rf"|(?P<label>{LABEL})\s*=\s*(?P<value>\d{{1,4}})\b)",
    _FLAGS,
)
TOTAL = re.compile(rf"\b(?:(?P<color>{COLOR})\s+)?(?:shapes|objects)\s*:\s*(?P<n>\d{{1,3}})\b", _FLAGS)
COUNT = re.compile(rf"\b(?P<n>{NUMBER})\s+{_desc('c')}", _FLAGS)
ITEM = re.compile(_desc("i"), _FLAGS)

EXTREME_KEY = {  # extreme -> (sort key over objects, take the min of it)
    "largest": lambda o: -o["px"], "biggest": lambda o: -o["px"], "smallest": lambda o: o["px"],
    "leftmost": lambda o: o["center"][0], "rightmost": lambda o: -o["center"][0],
    "topmost": lambda o: o["center"][1], "highest": lambda o: o["center"][1],
    "bottommost": lambda o: -o["center"][1], "lowest": lambda o: -o["center"][1],
}  # fmt: skip
ORDER_RELATION = {
    "left to right": "left of",
    "right to left": "right of",
    "top to bottom": "above",
    "bottom to top": "below",
}


@dataclass(frozen=True)
class Claim:
    """One visual claim found in a text."""

    kind: str  # count | bar | relation | extreme | bar_extreme
    text: str  # the phrase it was read from
    span: tuple[int, int]
    subject: dict[str, Any]  # descriptor(s): {"size", "color", "shape"} / {"label"} / {"a": .., "b": ..}
    value: Any  # the stated number, relation or extreme


@dataclass
class ClaimCheck:
    claim: Claim
    verdict: bool | None  # None: cannot be decided from the facts
    reason: str


@dataclass
class GroundingResult:
    stated: int  # decidable claims (true + false)
    true: int
    false: int
    unknown: int = 0
    details: list[ClaimCheck] = field(default_factory=list)

    @property
    def score(self) -> float | None:
        return self.true / self.stated if self.stated else None


# ------------------------------------------------------------------------------------------ extract
def _descriptor(match: re.Match, p: str) -> dict[str, str]:
    out = {}
    for key in ("size", "color", "shape"):
        value = match.group(p + key)
        if value and not (key == "shape" and value.lower() in ("shape", "object")):
            out[key] = value.lower()
    return out


def _number(text: str) -> int:
    return int(text) if text.isdigit() else NUMBER_WORDS[text.lower()]


def extract_claims(text: str) -> list[Claim]:
    """Every claim in `text`, in order of appearance; phrases already read by a more specific pattern
    (relation, extreme, order) are not read again as counts."""
    text = text if isinstance(text, str) else ""
    taken = bytearray(len(text))
    claims: list[Claim] = []

    def free(m: re.Match) -> bool:
        return taken.find(1, m.start(), m.end()) == -1

    def add(m: re.Match, kind: str, subject: dict[str, Any], value: Any) -> None:
        taken[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
        claims.append(Claim(kind, m.group(0), (m.start(), m.end()), subject, value))

    for m in ORDER.finditer(text):
        items = [_descriptor(i, "i") for i in ITEM.finditer(m.group("items"))]
        relation = ORDER_RELATION[" ".join(m.group("dir").lower().split())]
        for a, b in itertools.pairwise(items):
            claims.append(Claim("relation", m.group(0), (m.start(), m.end()), {"a": a, "b": b}, relation))
        taken[m.start() : m.end()] = b"\x01" * (m.end() - m.start())
    for m in RELATION.finditer(text):
        if free(m):
            relation = " ".join(m.group("rel").lower().split())
            add(m, "relation", {"a": _descriptor(m, "a"), "b": _descriptor(m, "b")}, relation)
    for m in EXTREME.finditer(text):
        if free(m):
            add(m, "extreme", _descriptor(m, "t"), m.group("ext").lower())
    for m in BAR_EXTREME.finditer(text):
        if free(m):
            add(m, "bar_extreme", {"label": m.group("label")}, m.group("ext").lower())
    for m in BAR.finditer(text):
        if free(m):
            label, value = m.group("label") or m.group("label2"), m.group("value") or m.group("value2")
            add(m, "bar", {"label": label}, int(value))
    for m in TOTAL.finditer(text):
        if free(m):
            add(
                m, "count", {"color": m.group("color").lower()} if m.group("color") else {}, int(m.group("n"))
            )
    for m in COUNT.finditer(text):
        subject = _descriptor(m, "c")
        generic_article = m.group("n").lower() in ("a", "an") and not subject
        if free(m) and not generic_article:
            add(m, "count", subject, _number(m.group("n")))
    claims.sort(key=lambda c: c.span)
    return claims


# -------------------------------------------------------------------------------------------- check
def _matches(obj: dict[str, Any], desc: dict[str, str]) -> bool:
    return all(obj.get(key) == value for key, value in desc.items())


def _name(desc: dict[str, str]) -> str:
    return " ".join(desc.get(k, "") for k in ("size", "color", "shape") if k in desc) or "shape"


def _holds(a: dict[str, Any], b: dict[str, Any], relation: str) -> bool:
    (ax, ay), (bx, by) = a["center"], b["center"]
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[relation]


def _bars_named(bars: list[dict[str, Any]], label: str) -> list[dict[str, Any]]:
    if len(label) == 1:
        return [b for b in bars if b.get("label") == label]
    return [b for b in bars if b.get("color") == label.lower()]


def check_claim(claim: Claim, facts: dict[str, Any]) -> ClaimCheck:
    objects = facts.get("objects") or []
    bars = facts.get("bars") or []
    if claim.kind == "count":
        actual = sum(_matches(o, claim.subject) for o in objects)
        return ClaimCheck(claim, actual == claim.value, f"{actual} {_name(claim.subject)}(s) in the image")
    if claim.kind == "bar":
        if not bars:
            return ClaimCheck(claim, None, "the image has no bars")
        named = _bars_named(bars, claim.subject["label"])
        if not named:
            return ClaimCheck(claim, False, f"no bar {claim.subject['label']}")
        return ClaimCheck(claim, named[0]["value"] == claim.value, f"the bar's value is {named[0]['value']}")
    if claim.kind == "bar_extreme":
        if not bars:
            return ClaimCheck(claim, None, "the image has no bars")
        best = max(b["value"] for b in bars) if claim.value == "tallest" else min(b["value"] for b in bars)
        hits = [b for b in _bars_named(bars, claim.subject["label"]) if b["value"] == best]
        return ClaimCheck(claim, bool(hits), f"the {claim.value} bar has value {best}")
    if claim.kind == "extreme":
        if not objects:
            return ClaimCheck(claim, None, "the image has no shapes")
        key = EXTREME_KEY[claim.value]
        best = min(key(o) for o in objects)
        winners = [o for o in objects if key(o) == best]
        verdict = any(_matches(o, claim.subject) for o in winners)
        return ClaimCheck(
            claim, verdict, f"the {claim.value} shape is a {winners[0]['color']} {winners[0]['shape']}"
        )
    return _check_relation(claim, objects)


def _check_relation(claim: Claim, objects: list[dict[str, Any]]) -> ClaimCheck:
    a_desc, b_desc = claim.subject["a"], claim.subject["b"]
    first = [o for o in objects if _matches(o, a_desc)]
    second = [o for o in objects if _matches(o, b_desc)]
    if not first or not second:
        missing = _name(a_desc) if not first else _name(b_desc)
        return ClaimCheck(claim, False, f"no {missing} in the image")
    outcomes = {_holds(a, b, claim.value) for a in first for b in second if a is not b}
    if len(outcomes) != 1:
        return ClaimCheck(claim, None, "the descriptions match several shapes")
    verdict = outcomes.pop()
    return ClaimCheck(claim, verdict, "holds" if verdict else "does not hold")


def check_claims(claims: list[Claim], facts: dict[str, Any] | None) -> GroundingResult:
    """Count the true and false claims against `facts` (`render` facts structure)."""
    result = GroundingResult(stated=0, true=0, false=0)
    if not facts:
        result.unknown = len(claims)
        return result
    for claim in claims:
        check = check_claim(claim, facts)
        result.details.append(check)
        if check.verdict is None:
            result.unknown += 1
        elif check.verdict:
            result.true += 1
        else:
            result.false += 1
    result.stated = result.true + result.false
    return result


def grounding_score(text: str, facts: dict[str, Any] | None) -> float | None:
    """Fraction of the decidable visual claims in `text` that are true; None when nothing was stated.

    >>> facts = {"objects": [{"shape": "circle", "color": "red", "size": "small", "px": 10,
    ...          "bbox": [0, 0, 10, 10], "center": [5, 5]}], "bars": []}
    >>> grounding_score("I see 1 red circle and 2 blue squares.", facts)
    0.5
    """
    if not facts:
        return None
    return check_claims(extract_claims(text), facts).score
