"""Batch filters that compare trajectories of the same problem: near-duplicates and a per-problem cap.

Both are deterministic: they keep the first trajectories in input order (or, for the cap, the most likely
ones when the likelihood filter has stored `meta["logprob_mean"]`), so a rerun gives the same output.
"""

from __future__ import annotations

import re
from collections import defaultdict

from pydantic import Field

from tgrl_lib.data.schema import Trajectory
from tgrl_lib.filters.base import KEEP, FilterContext, FilterParams, Verdict, batch_filter, reject

_PUNCT = re.compile(r"[^\w\s]")


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: "A  cat!" and "a cat" are the same text.

    >>> normalise("<think>Two  red</think> <answer>2</answer>!")
    'think two red think answer 2 answer'
    """
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def shingles(text: str, n: int) -> frozenset[tuple[str, ...]]:
    """The set of word n-grams of the normalised text (the whole text when it is shorter than n)."""
    words = normalise(text).split()
    if len(words) < n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """|a & b| / |a | b| (1.0 for two empty sets)."""
    union = len(a | b)
    return len(a & b) / union if union else 1.0


def by_problem(trajectories: list[Trajectory]) -> dict[str, list[int]]:
    """Positions of each problem's trajectories, in input order."""
    groups: dict[str, list[int]] = defaultdict(list)
    for i, trajectory in enumerate(trajectories):
        groups[trajectory.problem_id].append(i)
    return groups


class DuplicatesParams(FilterParams):
    threshold: float = Field(
        0.9, gt=0.0, le=1.0, description="Word n-gram Jaccard similarity at which two texts are duplicates."
    )
    ngram: int = Field(3, ge=1, le=64, description="Words per n-gram of the similarity.")


@batch_filter("duplicates", DuplicatesParams)
def duplicates(
    trajectories: list[Trajectory], context: FilterContext, params: DuplicatesParams
) -> list[Verdict]:
    """Within a problem, drop a trajectory whose normalised text equals, or whose word-`ngram` Jaccard
    similarity is >= `threshold` with, an earlier kept one."""
    verdicts = [KEEP] * len(trajectories)
    for positions in by_problem(trajectories).values():
        kept: list[tuple[int, str, frozenset]] = []
        for i in positions:
            text = normalise(trajectories[i].text)
            grams = shingles(trajectories[i].text, params.ngram)
            for j, other_text, other_grams in kept:
                if text == other_text:
                    verdicts[i] = reject(f"same text as sample {_sample(trajectories[j], j)}")
                    break
                similarity = jaccard(grams, other_grams)
                if similarity >= params.threshold:
                    verdicts[i] = reject(
                        f"near-duplicate of sample {_sample(trajectories[j], j)} (Jaccard {similarity:.2f})"
                    )
                    break
            else:
                kept.append((i, text, grams))
    return verdicts


def _sample(trajectory: Trajectory, position: int) -> str:
    return str(trajectory.meta.get("sample", f"#{position}"))


class PerProblemCapParams(FilterParams):
    max_per_problem: int = Field(8, ge=1, description="Most trajectories kept per problem.")


@batch_filter("per_problem_cap", PerProblemCapParams)
def per_problem_cap(
    trajectories: list[Trajectory], context: FilterContext, params: PerProblemCapParams
) -> list[Verdict]:
    """At most `max_per_problem` trajectories per problem: the most likely under the policy when the
    likelihood filter ran (`meta["logprob_mean"]`), otherwise the first in input order."""
    verdicts, max_per_problem = [KEEP] * len(trajectories), params.max_per_problem
    for positions in by_problem(trajectories).values():
        ranked = sorted(positions, key=lambda i: (-trajectories[i].meta.get("logprob_mean", 0.0), i))
        for i in ranked[max_per_problem:]:
            verdicts[i] = reject(f"more than max_per_problem={max_per_problem} for this problem")
    return verdicts
