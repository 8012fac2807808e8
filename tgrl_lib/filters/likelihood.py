"""Policy-likelihood filter: keep expert trajectories the policy can plausibly learn from.

The score of a trajectory is its mean token log-prob under the policy checkpoint, given the same prompt
(system prompt, image, question) the policy sees in training: `mean_t log p(y_t | y_<t, image, question)`
over the response tokens and the closing <|im_end|>. Off-policy guidance methods (LUFFY, arXiv 2504.14945)
note that very unlikely expert tokens give large, noisy updates; filtering on the likelihood before
training is our concrete choice for TGRL's trajectory filtering (the paper's exact rule is not public).

Batched: trajectories are sorted by length, collated with `models.collate.collate_sequences` and scored with
`models.logprobs.response_logprobs` under `torch.no_grad()`. Every scored trajectory gets
`meta["logprob_mean"]` and `meta["scored_tokens"]` (response tokens incl. the closing <|im_end|>), kept or
not, for the report.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import Field

from tgrl_lib.data.schema import Trajectory, resolve_inside
from tgrl_lib.filters.base import KEEP, FilterContext, FilterParams, Verdict, batch_filter, reject
from tgrl_lib.filters.batch import by_problem


class _ImageCache:
    """The last few problem images, decoded once (the K samples of a problem share one image)."""

    def __init__(self, context: FilterContext, size: int = 256):
        self.context = context
        self.size = size
        self._images: OrderedDict[str, Any] = OrderedDict()

    def get(self, problem_id: str) -> Any:
        from tgrl_lib.data.images import load_image

        if problem_id not in self._images:
            problem = self.context.problems[problem_id]
            root = Path(self.context.problems_root)
            self._images[problem_id] = load_image(resolve_inside(root, problem.image))
            if len(self._images) > self.size:
                self._images.popitem(last=False)
        return self._images[problem_id]


class _LazyImages(Sequence):
    """Row i's problem image, decoded when a batch asks for it."""

    def __init__(self, cache: _ImageCache, problem_ids: list[str]):
        self.cache, self.problem_ids = cache, problem_ids

    def __len__(self) -> int:
        return len(self.problem_ids)

    def __getitem__(self, i: int) -> Any:  # type: ignore[override]
        return self.cache.get(self.problem_ids[i])


def score_trajectories(
    trajectories: list[Trajectory], context: FilterContext, *, max_response_tokens: int | None = None
) -> list[tuple[float, int]]:
    """(mean token log-prob, response tokens) of each trajectory under the policy, in input order."""
    from tgrl_lib.data.prompts import render_prompt
    from tgrl_lib.models.logprobs import mean_logprobs

    policy = context.policy()
    images = _ImageCache(context)
    problems = [context.problems[t.problem_id] for t in trajectories]
    means, counts = mean_logprobs(
        policy.model,
        policy.processor,
        [render_prompt(policy.processor, p.question, p.choices) for p in problems],
        _LazyImages(images, [p.id for p in problems]),  # decoded batch by batch, not all at once
        [t.text for t in trajectories],
        batch_size=context.batch_size,
        max_response_tokens=max_response_tokens,
    )
    return list(zip(means, counts, strict=True))


class LikelihoodParams(FilterParams):
    min_logprob: float | None = Field(
        None, le=0.0, description="Least mean token log-prob under the policy (None: no threshold)."
    )
    top_k: int | None = Field(None, ge=1, description="Keep only the k most likely per problem (None: all).")
    max_response_tokens: int | None = Field(
        None, ge=1, description="Score at most this many response tokens (None: all)."
    )


@batch_filter("likelihood", LikelihoodParams)
def likelihood(
    trajectories: list[Trajectory], context: FilterContext, params: LikelihoodParams
) -> list[Verdict]:
    """Mean token log-prob under the policy (`--policy`) at least `min_logprob`, and/or only the `top_k`
    most likely per problem; with neither, it only records `meta["logprob_mean"]`."""
    min_logprob, top_k = params.min_logprob, params.top_k
    scored = score_trajectories(trajectories, context, max_response_tokens=params.max_response_tokens)
    scores = [(round(mean, 6), count) for mean, count in scored]  # decide on the value that is recorded
    verdicts = [KEEP] * len(trajectories)
    for trajectory, (mean, count) in zip(trajectories, scores, strict=True):
        trajectory.meta["logprob_mean"] = mean
        trajectory.meta["scored_tokens"] = count
    if min_logprob is not None:
        for i, (mean, _) in enumerate(scores):
            if mean < min_logprob:
                verdicts[i] = reject(f"mean log-prob {mean:.3f} below min_logprob={min_logprob:g}")
    if top_k is not None:
        for positions in by_problem(trajectories).values():
            alive = [i for i in positions if verdicts[i].kept]
            ranked = sorted(alive, key=lambda i: (-scores[i][0], i))
            for rank, i in enumerate(ranked[top_k:], start=top_k + 1):
                verdicts[i] = reject(
                    f"mean log-prob {scores[i][0]:.3f} ranks {rank} in its problem (top_k={top_k})"
                )
    return verdicts
