"""Verifiable rewards: answer correctness plus a small bonus for the think-then-answer format.

The reward is the R1-style rule reward used by the multimodal RLVR recipes (DeepSeek-R1, MM-Eureka,
LUFFY): `reward = 1.0 * correct + format_weight * formatted`, with `format_weight` 0.1 by default
(`TrainConfig.format_reward`). Correctness comes from `tgrl_lib.scoring.answers` (extraction and matching
rules are documented there), the same scorer that the filters and the benchmark evaluation use, as in
nanochat where the RL reward and the task's evaluation share one function. Reward functions are plain
callables with a `>>>` example, as in TRL's `trl/rewards`; unlike TRL they take our `Problem` rather than a
solution string, because matching depends on the answer type, the choices, the precision and the unit.

Beyond the paper (its own arm in the reproduction table, off by default): `fact_weight` > 0 adds
`fact_weight * fact_score`, the share of the response's stated visual facts that are true
(`tgrl_lib.scoring.grounding`), on problems that carry `facts`; a response that states no fact gets 0 for
it, so the term cannot be earned by saying nothing. It shows what a grounding signal adds on top of the
verifiable reward; TGRL itself rewards only the answer (and the format).

The format rule is strict: exactly one `<think>`, `</think>`, `<answer>`, `</answer>` each, in that order,
only whitespace around and between the two blocks, a non-empty answer, nothing after `</answer>`.
Correctness does not require the format (a right `\\boxed{}` answer is still correct), so the format bonus
is the only thing the tags earn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from tgrl_lib.data.schema import Problem
from tgrl_lib.errors import TgrlError
from tgrl_lib.scoring.answers import extract_answer, match_answer, normalize_text, parse_number

__all__ = [
    "RewardResult",
    "extract_answer",
    "fact_score",
    "format_reward",
    "has_valid_format",
    "match_answer",
    "normalize_text",
    "parse_number",
    "reward",
    "score_batch",
    "verify",
]

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
DEFAULT_FORMAT_WEIGHT = 0.1


def has_valid_format(text: str) -> bool:
    """True iff `text` is exactly `<think>...</think><answer>...</answer>` (whitespace allowed around).

    >>> has_valid_format("<think>2 + 1 = 3</think>\\n<answer>3</answer>\\n")
    True
    >>> has_valid_format("<think>2 + 1 = 3</think><answer>3</answer> Done.")
    False
    """
    tags = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
    if any(text.count(tag) != 1 for tag in tags):
        return False
    body = text.strip()
    if not (body.startswith(THINK_OPEN) and body.endswith(ANSWER_CLOSE)):
        return False
    think_end, answer_start = body.index(THINK_CLOSE), body.index(ANSWER_OPEN)
    if answer_start < think_end or body[think_end + len(THINK_CLOSE) : answer_start].strip():
        return False
    return bool(body[answer_start + len(ANSWER_OPEN) : -len(ANSWER_CLOSE)].strip())


def format_reward(text: str) -> float:
    """1.0 for a well-formed `<think>...</think><answer>...</answer>` response, else 0.0.

    >>> format_reward("<think>red is largest</think><answer>A</answer>"), format_reward("<answer>A</answer>")
    (1.0, 0.0)
    """
    return 1.0 if has_valid_format(text) else 0.0


def verify(response: str, problem: Problem) -> bool:
    """Whether the answer stated in `response` is the problem's answer (extract, then match).

    >>> p = Problem(id="p", image="i.png", question="Colour?", answer="red", answer_type="multiple_choice",
    ...             choices=["blue", "red"])
    >>> verify("<think>...</think><answer>(B)</answer>", p), verify("The answer is blue.", p)
    (True, False)
    """
    return match_answer(extract_answer(response, problem), problem)


def fact_score(response: str, problem: Problem) -> float | None:
    """Share of the stated visual facts that are true (0.0 when none is stated); None without facts.

    >>> facts = {"objects": [{"shape": "circle", "color": "red", "size": "small", "px": 10,
    ...          "bbox": [0, 0, 10, 10], "center": [5, 5]}], "bars": []}
    >>> p = Problem(id="p", image="i.png", question="How many?", answer="1", answer_type="integer",
    ...             facts=facts)
    >>> fact_score("I see 1 red circle, 1 blue square.", p), fact_score("One.", p)
    (0.5, 0.0)
    """
    from tgrl_lib.scoring.grounding import grounding_score

    if not problem.facts:
        return None
    score = grounding_score(response, problem.facts)
    return 0.0 if score is None else score


@dataclass(frozen=True)
class RewardResult:
    """The scalar reward and its parts, so that callers can log accuracy and format rate separately."""

    reward: float  # 1.0 * correct + format_weight * formatted (+ fact_weight * fact_score)
    correct: bool
    formatted: bool
    answer: str | None  # the extracted answer (None when none was found)


def _check_weight(format_weight: float) -> None:
    if not (math.isfinite(format_weight) and format_weight >= 0):
        raise TgrlError(
            f"format_weight must be a finite number >= 0, got {format_weight!r}",
            hint="set train.format_reward to e.g. 0.1, or 0 to reward correctness only",
        )


def reward(
    response: str, problem: Problem, *, format_weight: float = DEFAULT_FORMAT_WEIGHT, fact_weight: float = 0.0
) -> RewardResult:
    """The verifiable reward of one response: 1 for a correct answer plus `format_weight` for the format.

    >>> p = Problem(id="p", image="i.png", question="How many?", answer="3", answer_type="integer")
    >>> reward("<think>2 + 1</think><answer>3</answer>", p)
    RewardResult(reward=1.1, correct=True, formatted=True, answer='3')
    >>> reward("so \\\\boxed{13}", p).reward
    0.0
    """
    _check_weight(format_weight)
    answer = extract_answer(response, problem)
    correct = match_answer(answer, problem)
    formatted = has_valid_format(response)
    total = float(correct) + format_weight * formatted
    if fact_weight:
        _check_weight(fact_weight)
        total += fact_weight * (fact_score(response, problem) or 0.0)
    return RewardResult(total, correct, formatted, answer)


def score_batch(
    responses: Sequence[str], problems: Sequence[Problem], *, format_weight: float = DEFAULT_FORMAT_WEIGHT
) -> list[RewardResult]:
    """`reward` for each (response, problem) pair; repeat a problem once per sample of its group.

    >>> p = Problem(id="p", image="i.png", question="How many?", answer="7", answer_type="integer")
    >>> [r.reward for r in score_batch(["<answer>7</answer>", "<answer>17</answer>"], [p, p])]
    [1.0, 0.0]
    """
    if len(responses) != len(problems):
        raise TgrlError(
            f"score_batch got {len(responses)} responses but {len(problems)} problems",
            hint="pass one problem per response (repeat each problem for every sample of its group)",
        )
    _check_weight(format_weight)
    pairs = zip(responses, problems, strict=True)
    return [reward(text, problem, format_weight=format_weight) for text, problem in pairs]
