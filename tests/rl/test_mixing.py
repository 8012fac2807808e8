"""Expert mixing (`rl/mixing.py`): experts go into the last slots of groups below the threshold, SFT groups
are the experts, the in-loop filters (verified, length, likelihood under the current policy) and the
zero-variance filter."""

from __future__ import annotations

import pytest

from tgrl_lib.data.schema import Trajectory
from tgrl_lib.models.logprobs import mean_logprobs
from tgrl_lib.rl.mixing import ExpertPool, add_experts, drop_zero_variance, rotate
from tgrl_lib.rl.rollout import Group


def _trajectory(text: str, problem_id: str = "p0") -> Trajectory:
    return Trajectory(problem_id=problem_id, source="expert:test", text=text)


def test_mixing_injects_only_below_threshold_into_the_last_slots(policy, make_groups):
    low, high = make_groups(policy, [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # accuracy 0.25 and 0.75
    before_low = list(low.samples)
    before_high = list(high.samples)
    experts = [_trajectory(f"<think>I count {k}.</think><answer>2</answer>") for k in ("a", "b", "c")]
    pool = ExpertPool(by_problem={"p0": experts})
    stats = add_experts(
        [low, high], pool, n_expert=2, wants=lambda g: g.accuracy < 0.5, step=1, format_weight=0.1
    )
    assert low.samples[:2] == before_low[:2] and high.samples == before_high
    assert [s.is_expert for s in low.samples] == [False, False, True, True]
    assert [s.text for s in low.samples[2:]] == [experts[1].text, experts[2].text]  # rotation from step 1
    assert all(s.reward == pytest.approx(1.1) and s.correct for s in low.samples[2:])  # scored, not trusted
    assert low.accuracy == pytest.approx(0.5)  # on-policy accuracy: the kept rollouts only
    assert stats["expert/injected"] == 2 and stats["expert/groups_injected"] == 0.5
    assert [t.text for t in rotate(experts, 2, step=2)] == [experts[2].text, experts[0].text]


def test_sft_groups_are_the_experts_and_missing_ones_are_counted(policy, problem):
    groups = [Group(problem, "prompt", None), Group(problem.model_copy(update={"id": "p1"}), "prompt", None)]
    pool = ExpertPool(by_problem={"p0": [_trajectory("<think>x</think><answer>2</answer>")]})
    stats = add_experts(groups, pool, n_expert=1, wants=lambda g: True, step=0, format_weight=0.1)
    assert [len(g.samples) for g in groups] == [1, 0] and groups[0].samples[0].is_expert
    assert stats["expert/missing"] == 1


def test_in_loop_filters_drop_unverified_and_too_long_experts(policy, problem):
    good = _trajectory("<think>I see 2 red circles.</think><answer>2</answer>")
    wrong = _trajectory("<think>I see 3 red circles.</think><answer>3</answer>")
    long = _trajectory("<think>" + "red circle " * 40 + "</think><answer>2</answer>")
    stray = _trajectory("<think>x</think><answer>2</answer>", problem_id="nope")
    pool = ExpertPool.build(
        [good, wrong, long, stray], {"p0": problem}, tokenizer=policy.tokenizer, require_verified=True,
        max_tokens=40,
    )  # fmt: skip
    assert pool.by_problem == {"p0": [good]}
    assert dict(pool.rejected) == {"unverified": 1, "too_long": 1, "unknown_problem": 1}
    lenient = ExpertPool.build([wrong], {"p0": problem}, tokenizer=policy.tokenizer, require_verified=False,
                               max_tokens=40)  # fmt: skip
    assert lenient.by_problem == {"p0": [wrong]}


def test_likelihood_filter_uses_the_current_policy(policy, make_groups):
    (group,) = make_groups(policy, [[0.0, 0.0]])
    texts = ["<think>I see 2 red circles.</think><answer>2</answer>", "<think>2</think><answer>2</answer>"]
    scores = mean_logprobs(policy.model, policy.processor, [group.prompt] * 2, [group.image] * 2, texts,
                           batch_size=1, max_response_tokens=64)[0]  # fmt: skip
    assert all(-20 < s < 0 for s in scores) and scores[0] != scores[1]
    threshold = (scores[0] + scores[1]) / 2
    keep = texts[scores.index(max(scores))]
    pool = ExpertPool(by_problem={"p0": [_trajectory(t) for t in texts]})

    def likelihood(groups, trajectories):
        return mean_logprobs(policy.model, policy.processor, [g.prompt for g in groups],
                             [g.image for g in groups], [t.text for t in trajectories],
                             batch_size=2, max_response_tokens=64)[0]  # fmt: skip

    stats = add_experts([group], pool, n_expert=2, wants=lambda g: True, step=0, format_weight=0.1,
                        likelihood=likelihood, min_logprob=threshold)  # fmt: skip
    assert stats["expert/filtered"] == 1 and [s.text for s in group.samples if s.is_expert] == [keep]


def test_zero_variance_groups_are_dropped(policy, make_groups):
    groups = make_groups(policy, [[0.0, 0.0], [1.1, 0.0], [1.1, 1.1]])
    kept, dropped = drop_zero_variance(groups)
    assert kept == [groups[1]] and dropped == 2
