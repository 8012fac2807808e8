"""Trainer pieces on the tiny VLM: the update equals an independent GRPO reference, expert mixing puts the
expert in the right slots, in-loop filters, the data cursor, and one real `train` call."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from tgrl_lib.config import TrainConfig
from tgrl_lib.data.prompts import render_prompt
from tgrl_lib.data.schema import Problem, Trajectory
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.oracle import oracle_response
from tgrl_lib.models.logprobs import mean_logprobs
from tgrl_lib.models.policy import load_policy
from tgrl_lib.rl.advantages import group_advantages
from tgrl_lib.rl.mixing import ExpertPool, add_experts, drop_zero_variance, rotate
from tgrl_lib.rl.rollout import DataCursor, Group, Sample
from tgrl_lib.rl.update import (
    OBJECTIVES,
    build_batch,
    policy_update,
    prepare_batch,
    scoring_temperature,
)

PROBLEM = Problem(id="p0", image="images/p0.png", question="How many red shapes are there?", answer="2",
                  answer_type="integer", facts=None)  # fmt: skip


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


def _groups(policy, rewards: list[list[float]], seed: int = 0) -> list[Group]:
    """Groups whose responses are random token ids (as a rollout gives them) with the given rewards."""
    gen = torch.Generator().manual_seed(seed)
    plain = len(policy.tokenizer) - 8  # the BPE entries; the 8 special tokens follow them
    groups = []
    for i, row in enumerate(rewards):
        image = Image.new("RGB", (56, 56), (40 * i, 100, 200))
        group = Group(PROBLEM, render_prompt(policy.processor, PROBLEM.question, None), image)
        for r in row:
            n = int(torch.randint(2, 7, (1,), generator=gen))
            ids = tuple(torch.randint(0, plain, (n,), generator=gen).tolist())
            group.samples.append(Sample(text="", token_ids=ids, reward=r, correct=r > 0))
        groups.append(group)
    return groups


def _reference_grpo(model, batch, advantages: torch.Tensor, aggregation: str, temperature: float = 1.0):
    """GRPO loss written out independently: plain log_softmax over full logits / temperature, ratio =
    pi/pi_old with pi_old = pi (one on-policy pass), -A * ratio per token, aggregated as DAPO (token mean)
    or GRPO (mean over each sequence, then over sequences)."""
    seq = batch.seq
    logits = model(**seq.model_inputs(), use_cache=False).logits.float() / temperature  # [B, T, V]
    logp_all = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t + 1
    logp = logp_all.gather(-1, seq.input_ids[:, 1:, None]).squeeze(-1)  # [B, T-1]
    mask = seq.response_mask[:, 1:].bool()  # [B, T-1]
    ratio = torch.exp(logp - logp.detach())
    per_token = -advantages[:, None] * ratio  # [B, T-1]
    if aggregation == "token_mean":
        return per_token[mask].sum() / mask.sum()
    per_seq = (per_token * mask).sum(-1) / mask.sum(-1)
    return per_seq.mean()


@pytest.mark.parametrize(
    ("aggregation", "temperature"), [("token_mean", 1.0), ("seq_mean", 1.0), ("token_mean", 0.7)]
)
def test_update_equals_independent_grpo_reference(policy, aggregation, temperature):
    import copy

    from accelerate import Accelerator

    config = TrainConfig(
        algorithm="grpo", group_size=4, micro_batch_size=3, minibatch_size=64, max_new_tokens=8,
        max_grad_norm=1e9, weighting={"kind": "none"}, loss={"aggregation": aggregation},
        temperature=temperature,
    )  # fmt: skip
    groups = _groups(policy, [[1.0, 0.0, 0.0, 1.1], [0.0, 0.1, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])
    advantages = group_advantages(rewards)
    batch = build_batch(policy.processor, groups, advantages, config.max_new_tokens)
    reference_model = copy.deepcopy(policy.model).train()
    model = copy.deepcopy(policy.model).train()
    prepare_batch(batch, model, policy.processor, config)
    assert batch.old_logprobs is None  # one on-policy pass: the old log-probs forward is skipped

    ref_loss = _reference_grpo(reference_model, batch, batch.advantages, aggregation, temperature)
    ref_loss.backward()
    expected = {n: p.grad.clone() for n, p in reference_model.named_parameters() if p.grad is not None}

    accelerator = Accelerator(cpu=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # one step: theta - grad
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    stats = policy_update(
        accelerator, model, optimizer, scheduler, batch, OBJECTIVES["grpo"](config), config, 1
    )

    assert stats["loss/total"] == pytest.approx(float(ref_loss.detach()), abs=1e-6)
    assert stats["update/optimizer_steps"] == 1.0 and stats["policy/ratio_mean"] == pytest.approx(1.0)
    for name, param in model.named_parameters():
        grad = before[name] - param.detach()
        torch.testing.assert_close(grad, expected.get(name, torch.zeros_like(grad)), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_off_policy_old_logprobs_are_scored_at_the_training_temperature(policy, temperature):
    """Two epochs make the update off-policy (old log-probs from the no-grad pass); with lr 0 the policy
    never moves, so every ratio is exactly 1 only if both passes score at the same temperature."""
    import copy

    from accelerate import Accelerator

    config = TrainConfig(
        algorithm="grpo", group_size=4, micro_batch_size=3, minibatch_size=4, ppo_epochs=2,
        max_new_tokens=8, weighting={"kind": "none"}, temperature=temperature,
    )  # fmt: skip
    groups = _groups(policy, [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])
    batch = build_batch(policy.processor, groups, group_advantages(rewards), config.max_new_tokens)
    model = copy.deepcopy(policy.model).train()
    prepare_batch(batch, model, policy.processor, config)
    assert batch.old_logprobs is not None
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1.0)
    stats = policy_update(
        Accelerator(cpu=True), model, optimizer, scheduler, batch, OBJECTIVES["grpo"](config), config, 1
    )
    assert stats["update/optimizer_steps"] == 4.0  # 8 rows / minibatch 4, two epochs
    assert stats["policy/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert stats["policy/clipfrac"] == 0.0


@pytest.mark.parametrize("normalise", ["mean", "rank"])
def test_prepare_batch_weights_follow_the_normalise_switch(policy, normalise):
    config = TrainConfig(
        algorithm="grpo", group_size=4, micro_batch_size=4, max_new_tokens=8,
        weighting={"kind": "visual_dependency", "apply_to": "both", "normalise": normalise},
    )  # fmt: skip
    groups = _groups(policy, [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])
    batch = build_batch(policy.processor, groups, group_advantages(rewards), config.max_new_tokens)
    stats = prepare_batch(batch, policy.model, policy.processor, config)
    valid = batch.seq.response_mask.bool()
    weights = batch.token_weights[valid]
    assert weights.numel() > 8 and weights.std() > 0  # the blanked image changed some log-probs
    assert stats["weights/mean"] == pytest.approx(float(weights.mean()))
    if normalise == "rank":  # mean exactly 1, strictly inside the bounds
        assert stats["weights/mean"] == pytest.approx(1.0, abs=1e-5) and stats["weights/clip_frac"] == 0.0
        assert weights.min() > 0.5 and weights.max() < 1.5
    else:
        assert weights.min() >= 0.5 and weights.max() <= 2.0


def test_rl_scores_at_the_rollout_temperature_and_sft_at_one():
    assert scoring_temperature(TrainConfig(algorithm="tgrl", temperature=0.7)) == 0.7
    assert scoring_temperature(TrainConfig(algorithm="grpo", temperature=1.3)) == 1.3
    assert scoring_temperature(TrainConfig(algorithm="sft", temperature=0.7)) == 1.0


def _trajectory(text: str, problem_id: str = "p0") -> Trajectory:
    return Trajectory(problem_id=problem_id, source="expert:test", text=text)


def test_mixing_injects_only_below_threshold_into_the_last_slots(policy):
    low, high = _groups(policy, [[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])  # accuracy 0.25 and 0.75
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


def test_sft_groups_are_the_experts_and_missing_ones_are_counted(policy):
    groups = [Group(PROBLEM, "prompt", None), Group(PROBLEM.model_copy(update={"id": "p1"}), "prompt", None)]
    pool = ExpertPool(by_problem={"p0": [_trajectory("<think>x</think><answer>2</answer>")]})
    stats = add_experts(groups, pool, n_expert=1, wants=lambda g: True, step=0, format_weight=0.1)
    assert [len(g.samples) for g in groups] == [1, 0] and groups[0].samples[0].is_expert
    assert stats["expert/missing"] == 1


def test_in_loop_filters_drop_unverified_and_too_long_experts(policy):
    good = _trajectory("<think>I see 2 red circles.</think><answer>2</answer>")
    wrong = _trajectory("<think>I see 3 red circles.</think><answer>3</answer>")
    long = _trajectory("<think>" + "red circle " * 40 + "</think><answer>2</answer>")
    stray = _trajectory("<think>x</think><answer>2</answer>", problem_id="nope")
    pool = ExpertPool.build(
        [good, wrong, long, stray], {"p0": PROBLEM}, tokenizer=policy.tokenizer, require_verified=True,
        max_tokens=40,
    )  # fmt: skip
    assert pool.by_problem == {"p0": [good]}
    assert dict(pool.rejected) == {"unverified": 1, "too_long": 1, "unknown_problem": 1}
    lenient = ExpertPool.build([wrong], {"p0": PROBLEM}, tokenizer=policy.tokenizer, require_verified=False,
                               max_tokens=40)  # fmt: skip
    assert lenient.by_problem == {"p0": [wrong]}


def test_likelihood_filter_uses_the_current_policy(policy):
    (group,) = _groups(policy, [[0.0, 0.0]])
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


def test_zero_variance_groups_are_dropped(policy):
    groups = _groups(policy, [[0.0, 0.0], [1.1, 0.0], [1.1, 1.1]])
    kept, dropped = drop_zero_variance(groups)
    assert kept == [groups[1]] and dropped == 2


def test_data_cursor_covers_each_epoch_and_resumes_identically():
    cursor = DataCursor(n=5, seed=3)
    first = cursor.take(3) + cursor.take(3) + cursor.take(4)  # crosses two epoch boundaries
    assert sorted(first[:5]) == list(range(5)) and sorted(first[5:]) == list(range(5))
    assert first[:5] != first[5:]  # reshuffled per epoch
    replay = DataCursor(n=5, seed=3)
    replay.take(4)
    state = replay.state_dict()
    resumed = DataCursor(n=5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(6) == first[4:]
    with pytest.raises(TgrlError, match="same problems dataset"):
        DataCursor(n=6, seed=3).load_state_dict(state)


def _datasets(tmp_path, n: int = 6):
    from tgrl_lib.data.schema import load_dataset, write_dataset
    from tgrl_lib.data.synthetic import synthesize

    synthesize(tmp_path / "problems", n=n, seed=0, split="train", difficulties=["easy"])
    problems = load_dataset(tmp_path / "problems", "problems").records
    experts = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in problems]
    experts.append(
        Trajectory(problem_id=problems[0].id, source="expert:bad", text="<answer>nonsense</answer>")
    )
    write_dataset(tmp_path / "experts", "trajectories", experts)
    return tmp_path / "problems", tmp_path / "experts"


def test_train_tgrl_two_steps_logs_namespaced_metrics(tiny_model_dir, tmp_path):
    from tgrl_lib.rl.trainer import train

    problems, experts = _datasets(tmp_path)
    config = TrainConfig(
        algorithm="tgrl", model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), steps=2,
        problems_per_step=2, group_size=3, minibatch_size=3, micro_batch_size=2, max_new_tokens=12,
        in_loop_filter={"max_tokens": 64, "min_logprob": -50.0}, checkpoint_every=1, keep_checkpoints=1,
        loss={"kl_coef": 0.05, "entropy_coef": 0.001},
    )  # fmt: skip
    seen = []
    result = train(config, problems_dir=problems, experts_dir=experts, on_step=lambda s, m: seen.append(s))
    assert seen == [1, 2] and result.steps_done == 2 and result.resumed_from == 0
    assert (result.final_dir / "model.safetensors").is_file()
    assert load_policy(result.final_dir).model is not None
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["expert_pool/rejected_unverified"] == 1
    last = rows[-1]
    for key in ("reward/mean", "reward/accuracy", "reward/format", "groups/all_correct", "groups/all_wrong",
                "expert/injected", "expert/filtered", "response/length_mean", "grad/norm", "weights/mean",
                "loss/policy", "loss/expert", "policy/clipfrac", "expert/shaped_weight_mean",
                "perf/step_time_s", "perf/rollout_time_s", "perf/update_time_s", "perf/tokens_per_s",
                "perf/peak_rss_mb", "kl/mean", "policy/entropy", "optim/lr"):  # fmt: skip
        assert key in last, key
    assert last["expert/injected"] == 2  # both groups were all wrong: one expert each (minibatches: 2)
    assert last["update/optimizer_steps"] == 2  # 6 rows / minibatch 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["final", "metrics.jsonl", "step-000002"]


def test_train_refuses_tgrl_without_experts(tiny_model_dir, tmp_path):
    from tgrl_lib.rl.trainer import train

    config = TrainConfig(algorithm="tgrl", model=str(tiny_model_dir), output_dir=str(tmp_path / "o"))
    with pytest.raises(TgrlError, match="needs expert trajectories"):
        train(config, problems_dir=tmp_path)
