"""Expert mixing: filtered expert trajectories go into the policy's groups (TGRL) or are the batch (SFT).

Taken from LUFFY (arXiv 2504.14945): an expert trajectory takes an on-policy slot of the problem's group, so
the advantage is computed over the mixed group, and (its data-level option) the expert goes in only when the
group's on-policy accuracy is below a threshold (`mixing.inject_below`; 1.0 = always, LUFFY's default
recipe). What we add or change:

- the G on-policy responses are generated first and `n_expert` of them are replaced (the group keeps its
  size G), because whether to inject depends on the group's own accuracy;
- in-loop filters on the expert trajectories (DESIGN.md §4). Static ones run once when the pool is built:
  the answer verifies with the training reward's own scorer (`require_verified`), the response fits the
  length budget in policy tokens (`in_loop_filter.max_tokens`, default the rollout budget
  `max_new_tokens`: an expert longer than what the policy may write would be cut). The policy-likelihood
  filter runs every step, on the current policy: mean token log-prob >= `in_loop_filter.min_logprob`;
- which of a problem's eligible experts goes in rotates with the step (`(step + j) mod K`), so a problem seen
  in several epochs meets its different experts, deterministically (a resumed run picks the same ones);
- ReLIFT's rule (arXiv 2506.07527: RL helps easy and medium questions, SFT the ones the policy cannot
  solve at all) as an injection rule, `mixing.inject_rule: all_wrong`: experts go only into groups with no
  correct rollout (`wants_injection`). ReLIFT fine-tunes on those questions in separate SFT phases
  interleaved with RL; we inject them into the group instead. Off (`below`) by default until the
  reproduction table decides;
- DAPO's dynamic-sampling filter (arXiv 2503.14476) as an option: groups whose mixed rewards are all
  equal carry no advantage and are dropped (we drop, DAPO resamples).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tgrl_lib.data.schema import Problem, Trajectory
from tgrl_lib.rl.rollout import Group, Sample

# (groups, trajectories) -> mean token log-prob of each trajectory under the current policy
LikelihoodFn = Callable[[Sequence[Group], Sequence[Trajectory]], list[float]]


def response_tokens(tokenizer: Any, text: str) -> int:
    """Policy tokens of an expert response as the trainer collates it (text + the closing <|im_end|>)."""
    return len(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) + 1


@dataclass
class ExpertPool:
    """Expert trajectories per problem id that passed the static in-loop filters, in dataset order."""

    by_problem: dict[str, list[Trajectory]] = field(default_factory=dict)
    rejected: Counter = field(default_factory=Counter)  # reason -> count

    @classmethod
    def build(
        cls,
        trajectories: Sequence[Trajectory],
        problems: dict[str, Problem],
        *,
        tokenizer: Any,
        require_verified: bool,
        max_tokens: int,
    ) -> ExpertPool:
        from tgrl_lib.scoring.rewards import verify

        pool = cls()
        for t in trajectories:
            problem = problems.get(t.problem_id)
            if problem is None:
                reason = "unknown_problem"
            elif t.filter is not None and not t.filter.kept:
                reason = "filtered_before"
            elif require_verified and not verify(t.text, problem):
                reason = "unverified"
            elif response_tokens(tokenizer, t.text) > max_tokens:
                reason = "too_long"
            else:
                pool.by_problem.setdefault(t.problem_id, []).append(t)
                continue
            pool.rejected[reason] += 1
        return pool

    @property
    def size(self) -> int:
        return sum(len(v) for v in self.by_problem.values())

    def stats(self) -> dict[str, float]:
        out = {"expert_pool/kept": float(self.size), "expert_pool/problems": float(len(self.by_problem))}
        out.update({f"expert_pool/rejected_{k}": float(v) for k, v in sorted(self.rejected.items())})
        return out


def wants_injection(accuracy: float, *, inject_below: float, rule: str = "below") -> bool:
    """Whether a group with this on-policy accuracy gets experts: `below` (LUFFY's data-level option)
    when accuracy < inject_below, `all_wrong` (ReLIFT) only when no rollout is correct.

    >>> wants_injection(0.25, inject_below=0.5), wants_injection(0.25, inject_below=1.0, rule="all_wrong")
    (True, False)
    """
    if rule == "all_wrong":
        return accuracy == 0.0
    if rule == "below":
        return accuracy < inject_below
    raise ValueError(f"unknown inject rule {rule!r} (below or all_wrong)")


def rotate(candidates: Sequence[Trajectory], n: int, step: int) -> list[Trajectory]:
    """`n` of the candidates (fewer if there are fewer), starting at `step mod K` and wrapping."""
    k = len(candidates)
    return [candidates[(step + j) % k] for j in range(min(n, k))]


def add_experts(
    groups: list[Group],
    pool: ExpertPool,
    *,
    n_expert: int,
    wants: Callable[[Group], bool],
    step: int,
    format_weight: float,
    likelihood: LikelihoodFn | None = None,
    min_logprob: float | None = None,
    fact_weight: float = 0.0,
) -> dict[str, float]:
    """Give every group that `wants` experts up to `n_expert` of its eligible ones, replacing its last
    on-policy samples (TGRL) or, in a group without rollouts, as its samples (SFT). Returns expert/* stats."""
    wanting = [g for g in groups if wants(g)]
    eligible = {id(g): pool.by_problem.get(g.problem.id, []) for g in wanting}
    stats: dict[str, float] = {"expert/filtered": 0.0}
    if likelihood is not None and min_logprob is not None:
        eligible, stats = _likelihood_filter(wanting, eligible, likelihood, min_logprob)
    injected = missing = 0
    for group in wanting:
        chosen = rotate(eligible[id(group)], n_expert, step)
        if not chosen:
            missing += 1
            continue
        experts = [_expert_sample(t, group.problem, format_weight, fact_weight) for t in chosen]
        if group.samples:
            group.samples[-len(experts) :] = experts  # replaces on-policy slots: the group keeps size G
        else:
            group.samples = experts
        injected += len(experts)
    stats.update(
        {
            "expert/injected": float(injected),
            "expert/groups_injected": (len(wanting) - missing) / len(groups) if groups else 0.0,
            "expert/missing": float(missing),
        }
    )
    return stats


def _likelihood_filter(
    wanting: list[Group],
    eligible: dict[int, list[Trajectory]],
    likelihood: LikelihoodFn,
    min_logprob: float,
) -> tuple[dict[int, list[Trajectory]], dict[str, float]]:
    """Keep the candidates whose mean token log-prob under the current policy is >= min_logprob."""
    pairs = [(g, t) for g in wanting for t in eligible[id(g)]]
    if not pairs:
        return eligible, {"expert/filtered": 0.0}
    scores = likelihood([g for g, _ in pairs], [t for _, t in pairs])
    kept: dict[int, list[Trajectory]] = {id(g): [] for g in wanting}
    for (group, trajectory), mean in zip(pairs, scores, strict=True):
        if mean >= min_logprob:
            kept[id(group)].append(trajectory)
    stats = {
        "expert/filtered": float(len(pairs) - sum(len(v) for v in kept.values())),
        "expert/logprob_mean": sum(scores) / len(scores),
    }
    return kept, stats


def _expert_sample(
    trajectory: Trajectory, problem: Problem, format_weight: float, fact_weight: float = 0.0
) -> Sample:
    from tgrl_lib.scoring.rewards import reward

    result = reward(trajectory.text, problem, format_weight=format_weight, fact_weight=fact_weight)
    return Sample(
        trajectory.text,
        None,
        is_expert=True,
        source=trajectory.source,
        reward=result.reward,
        correct=result.correct,
        formatted=result.formatted,
    )


def drop_zero_variance(groups: list[Group]) -> tuple[list[Group], int]:
    """DAPO dynamic sampling as a filter: drop groups whose rewards are all equal (zero advantage)."""
    kept = [g for g in groups if len({s.reward for s in g.samples}) > 1]
    return kept, len(groups) - len(kept)
