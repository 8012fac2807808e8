"""Evidence use: does the response's answer follow from the facts the response itself states?

Grounding (`tgrl_lib.scoring.grounding`) asks whether the stated facts are true; accuracy whether the answer
is right. Evidence use asks a third question, whether the reasoning is faithful to its own evidence: take the
visual claims the response states (read by `grounding.extract_claims`), apply the task's rule
(`Problem.meta["task"]`, written by `tgrl_lib.data.synthetic`) to them as if they were the scene, and check
whether the response's answer equals what that rule gives. A right answer reached from wrong stated counts,
or a wrong answer under right counts, does not use its evidence; a wrong answer that does follow from wrong
stated facts does (it perceived badly but reasoned faithfully).

This metric is ours, not the TGRL paper's (nor its anchors'). It applies only to synthetic problems (facts
and a machine-readable task); when the response states too little to apply the rule (say, no count of the
queried colour and no inventory of the scene), the result is "not derivable" and is not counted, so
`evidence_use` is reported beside the share of responses where it could be derived.

How stated facts are read, per task (a later claim about the same thing overrides an earlier one):

- colour counts: a total ("Red shapes: 3", "3 red shapes") wins; else the sum of an inventory's counts of
  that colour ("I see 2 red circles, 1 red square"); an inventory that names no shape of the colour states 0.
  The total of all shapes: "Shapes: 5" / "5 shapes", else the inventory's sum.
- bars: the stated value of each bar named by colour; ranks from those values, or from "the tallest bar is".
- relations: a stated relation between the two named shapes (either way round); `count_left_of` and
  leftmost/rightmost from a stated left-to-right (or right-to-left) order.
- extremes: "the largest shape is a ...", else (largest/smallest) the only shape of the largest/smallest
  stated size in a sized inventory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tgrl_lib.data.schema import Problem
from tgrl_lib.scoring.grounding import Claim, extract_claims

OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
SIZE_RANK = {"small": 0, "medium": 1, "large": 2}
SYNONYM = {"biggest": "largest", "highest": "topmost", "lowest": "bottommost"}


@dataclass(frozen=True)
class EvidenceResult:
    implied: str | None  # the answer the task's rule gives on the stated facts; None: not derivable
    follows: bool | None  # the response's answer equals `implied`; None when not derivable


# ------------------------------------------------------------------------------------ stated scene
def _key(desc: dict[str, Any]) -> tuple[str | None, str | None]:
    return desc.get("color"), desc.get("shape")


def _inventory(claims: list[Claim]) -> dict[tuple, int]:
    """Shape-level counts ("2 red circles"): (size, colour, shape) -> n, later claims override."""
    out: dict[tuple, int] = {}
    for c in claims:
        if c.kind == "count" and "shape" in c.subject:
            out[(c.subject.get("size"), c.subject.get("color"), c.subject["shape"])] = c.value
    return out


def stated_count(claims: list[Claim], color: str | None) -> int | None:
    """Shapes of `color` (None: all shapes) by the response's own account; None when it does not say."""
    totals = [
        c.value for c in claims if c.kind == "count" and c.subject == ({"color": color} if color else {})
    ]
    if totals:
        return totals[-1]
    inventory = _inventory(claims)
    if not inventory:
        return None
    return sum(n for (_, c, _), n in inventory.items() if color is None or c == color)


def stated_bars(claims: list[Claim]) -> dict[str, int]:
    """Bar values named by colour: colour -> value (bars named by letter cannot be tied to a colour)."""
    return {
        c.subject["label"].lower(): c.value for c in claims if c.kind == "bar" and len(c.subject["label"]) > 1
    }


def stated_order(claims: list[Claim]) -> list[tuple[str | None, str | None]] | None:
    """The last stated left-to-right order of shapes as (colour, shape) keys, or None."""
    chains: dict[tuple[int, int], list[Claim]] = {}
    for c in claims:
        if c.kind == "relation" and c.text.lower().startswith("from") and c.value in ("left of", "right of"):
            chains.setdefault(c.span, []).append(c)  # one stated order: its consecutive pairs share a span
    if not chains:
        return None
    chain = chains[max(chains)]
    items = [_key(chain[0].subject["a"])] + [_key(c.subject["b"]) for c in chain]
    return items if chain[0].value == "left of" else items[::-1]


def _ranked(values: dict[str, int]) -> list[str] | None:
    """Colours by stated value, tallest first; None when two values tie (no rank follows)."""
    if len(set(values.values())) != len(values):
        return None
    return sorted(values, key=lambda c: -values[c])


# --------------------------------------------------------------------------------------- the rules
def _count_rule(task: dict[str, Any], claims: list[Claim]) -> str | None:
    op = task["op"]
    if op in ("count_color", "count_color_plus", "count_not_color"):
        n = stated_count(claims, task["color"])
        if n is None:
            return None
        if op == "count_color":
            return str(n)
        if op == "count_color_plus":
            return str(n + task["k"])
        total = stated_count(claims, None)
        return None if total is None else str(total - n)
    if op in ("count_two_colors", "count_color_diff"):
        a, b = (stated_count(claims, c) for c in task["colors"])
        if a is None or b is None:
            return None
        return str(a + b if op == "count_two_colors" else a - b)
    total = stated_count(claims, None)  # count_total_minus
    return None if total is None else str(total - task["k"])


def _bar_rule(task: dict[str, Any], claims: list[Claim]) -> str | None:
    op, values = task["op"], stated_bars(claims)
    if op == "bar_sum_two":
        got = [values.get(c) for c in task["colors"]]
        return None if None in got else str(sum(got))
    if op == "bar_tallest":
        named = [
            c.subject["label"].lower() for c in claims if c.kind == "bar_extreme" and c.value == "tallest"
        ]
        if named:
            return named[-1]
        ranked = _ranked(values) if len(values) >= 2 else None
        return ranked[0] if ranked else None
    if len(values) < 2:
        return None
    if op == "bar_sum_all":
        return str(sum(values.values()))
    if op == "bar_range":
        return str(max(values.values()) - min(values.values()))
    if op == "bar_count_taller":
        ref = values.get(task["color"])
        return None if ref is None else str(sum(v > ref for v in values.values()))
    ranked = _ranked(values)  # bar_second
    return ranked[1] if ranked else None


def _relation_rule(task: dict[str, Any], claims: list[Claim]) -> str | None:
    a, b = _key(task["a"]), _key(task["b"])
    said = None
    for c in claims:
        if c.kind != "relation":
            continue
        first, second = _key(c.subject["a"]), _key(c.subject["b"])
        if (first, second) == (a, b):
            said = c.value
        elif (first, second) == (b, a):
            said = OPPOSITE[c.value]
    return said


def _left_of_rule(task: dict[str, Any], claims: list[Claim]) -> str | None:
    order = stated_order(claims)
    ref = _key(task["ref"])
    if order is None or ref not in order:
        return None
    return str(order.index(ref))


def _extreme_rule(task: dict[str, Any], claims: list[Claim]) -> str | None:
    which, attr = task["extreme"], task["attr"]
    named = [c.subject for c in claims if c.kind == "extreme" and SYNONYM.get(c.value, c.value) == which]
    target: dict[str, Any] | None = named[-1] if named else None
    if target is None and which in ("leftmost", "rightmost"):
        order = stated_order(claims)
        if order:
            color, shape = order[0] if which == "leftmost" else order[-1]
            target = {"color": color, "shape": shape}
    if target is None and which in ("largest", "smallest"):
        sized = [(SIZE_RANK[k[0]], k) for k in _inventory(claims) if k[0] in SIZE_RANK]
        if sized:
            best = max(r for r, _ in sized) if which == "largest" else min(r for r, _ in sized)
            hits = [k for r, k in sized if r == best]
            if len(hits) == 1 and _inventory(claims)[hits[0]] == 1:
                target = {"color": hits[0][1], "shape": hits[0][2]}
    return None if target is None else target.get(attr)


def implied_answer(problem: Problem, claims: list[Claim]) -> str | None:
    """The task's rule applied to the stated claims; None when they do not determine an answer."""
    task = (problem.meta or {}).get("task")
    if not isinstance(task, dict) or "op" not in task:
        return None
    op = task["op"]
    if op == "count_left_of":
        return _left_of_rule(task, claims)
    if op.startswith("count_"):
        return _count_rule(task, claims)
    if op.startswith("bar_"):
        return _bar_rule(task, claims)
    if op == "relation":
        return _relation_rule(task, claims)
    if op == "extreme_attr":
        return _extreme_rule(task, claims)
    return None


def evidence_use(text: str, problem: Problem) -> EvidenceResult:
    """Whether the answer in `text` follows from the facts `text` states (see the module docstring).

    >>> p = Problem(id="p", image="i.png", question="How many red shapes?", answer="2", answer_type="integer",
    ...             meta={"task": {"op": "count_color", "color": "red"}})
    >>> evidence_use("<think>I see 3 red circles.</think><answer>3</answer>", p)
    EvidenceResult(implied='3', follows=True)
    >>> evidence_use("<think>I see 3 red circles.</think><answer>2</answer>", p).follows
    False
    """
    from tgrl_lib.scoring.rewards import verify

    implied = implied_answer(problem, extract_claims(text))
    if implied is None:
        return EvidenceResult(None, None)
    return EvidenceResult(implied, verify(text, problem.model_copy(update={"answer": implied})))
