"""The policy update (`rl/update.py`) on the tiny VLM: one step equals an independent, plainly written GRPO
reference; off-policy old log-probs score at the training temperature; token weights follow their switch."""

from __future__ import annotations

import pytest
import torch

from tgrl_lib.config import TrainConfig
from tgrl_lib.rl.advantages import group_advantages
from tgrl_lib.rl.update import OBJECTIVES, build_batch, policy_update, prepare_batch, scoring_temperature


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
def test_update_equals_independent_grpo_reference(policy, make_groups, aggregation, temperature):
    import copy

    from accelerate import Accelerator

    config = TrainConfig(
        algorithm="grpo", group_size=4, micro_batch_size=3, minibatch_size=64,
        sampling={"max_new_tokens": 8, "temperature": temperature},
        max_grad_norm=1e9, weighting={"kind": "none"}, loss={"aggregation": aggregation},
    )  # fmt: skip
    groups = make_groups(policy, [[1.0, 0.0, 0.0, 1.1], [0.0, 0.1, 0.0, 0.0], [1.0, 1.0, 0.0, 1.0]])
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])
    advantages = group_advantages(rewards)
    batch = build_batch(policy.processor, groups, advantages, config.sampling.max_new_tokens)
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
def test_off_policy_old_logprobs_are_scored_at_the_training_temperature(policy, make_groups, temperature):
    """Two epochs make the update off-policy (old log-probs from the no-grad pass); with lr 0 the policy
    never moves, so every ratio is exactly 1 only if both passes score at the same temperature."""
    import copy

    from accelerate import Accelerator

    config = TrainConfig(
        algorithm="grpo", group_size=4, micro_batch_size=3, minibatch_size=4, ppo_epochs=2,
        sampling={"max_new_tokens": 8, "temperature": temperature}, weighting={"kind": "none"},
    )  # fmt: skip
    groups = make_groups(policy, [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])
    batch = build_batch(policy.processor, groups, group_advantages(rewards), config.sampling.max_new_tokens)
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
def test_prepare_batch_weights_follow_the_normalise_switch(policy, make_groups, normalise):
    config = TrainConfig(
        algorithm="grpo", group_size=4, micro_batch_size=4, sampling={"max_new_tokens": 8},
        weighting={"kind": "visual_dependency", "apply_to": "both", "normalise": normalise},
    )  # fmt: skip
    groups = make_groups(policy, [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0]])
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])
    batch = build_batch(policy.processor, groups, group_advantages(rewards), config.sampling.max_new_tokens)
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
    assert scoring_temperature(TrainConfig(algorithm="tgrl", sampling={"temperature": 0.7})) == 0.7
    assert scoring_temperature(TrainConfig(algorithm="grpo", sampling={"temperature": 1.3})) == 1.3
    assert scoring_temperature(TrainConfig(algorithm="sft", sampling={"temperature": 0.7})) == 1.0


@pytest.mark.parametrize(("apply_to", "epochs"), [("expert", 1), ("policy", 1), ("both", 1), ("expert", 2)])
def test_visual_dependency_on_the_weighted_rows_only_equals_the_full_passes(
    policy, make_groups, apply_to, epochs
):
    """prepare_batch runs both visual-dependency passes on the rows the weights apply to; the weights
    equal those of the two passes over the whole batch (the reference below), and with several epochs
    the old log-probs are the full with-image pass."""
    from tgrl_lib.data.images import blank_images
    from tgrl_lib.models.collate import collate_sequences
    from tgrl_lib.models.logprobs import response_logprobs
    from tgrl_lib.rl.weighting import compute_token_weights

    config = TrainConfig(
        algorithm="tgrl", group_size=4, micro_batch_size=3, ppo_epochs=epochs, sampling={"max_new_tokens": 8},
        weighting={"kind": "visual_dependency", "apply_to": apply_to},
    )  # fmt: skip
    groups = make_groups(policy, [[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    for g in groups:  # the first response of each group plays the injected expert
        g.samples[0] = type(g.samples[0])(**{**vars(g.samples[0]), "is_expert": True})
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])
    batch = build_batch(policy.processor, groups, group_advantages(rewards), config.sampling.max_new_tokens)
    assert int(batch.expert_mask.sum()) == 3
    prepare_batch(batch, policy.model, policy.processor, config)
    with torch.no_grad():  # reference: both passes over every row, no prefix sharing
        with_image, _ = response_logprobs(policy.model, batch.seq, temperature=1.0)
        blank = collate_sequences(
            policy.processor, batch.prompts, blank_images(batch.images), batch.responses, 8
        )
        without, _ = response_logprobs(policy.model, blank, temperature=1.0)
    w = config.weighting
    expected = compute_token_weights(
        "visual_dependency", response_mask=batch.seq.response_mask, expert_mask=batch.expert_mask,
        logprobs_with_image=with_image, logprobs_blank=without, w_min=w.w_min, w_max=w.w_max,
        alpha=w.alpha, apply_to=apply_to, method=w.normalise,
    )  # fmt: skip
    torch.testing.assert_close(batch.token_weights, expected, atol=1e-4, rtol=1e-4)
    assert batch.token_weights[batch.seq.response_mask.bool()].std() > 0  # the weights are not all 1
    if epochs > 1:
        mask = batch.seq.response_mask.bool()
        torch.testing.assert_close(batch.old_logprobs[mask], with_image[mask], atol=1e-5, rtol=1e-5)


def test_visual_dependency_with_no_row_to_weigh_leaves_weights_at_one(policy, make_groups):
    """GRPO has no expert rows: with `apply_to: expert` the visual-dependency passes have nothing to score
    (the row-restricted passes crashed on an empty batch in the GRPO baseline pipeline)."""
    config = TrainConfig(algorithm="grpo", group_size=4, micro_batch_size=4, sampling={"max_new_tokens": 8},
                         weighting={"kind": "visual_dependency", "apply_to": "expert"})  # fmt: skip
    groups = make_groups(policy, [[1.0, 0.0, 0.0, 1.0]])
    rewards = torch.tensor([[s.reward for s in g.samples] for g in groups])
    batch = build_batch(policy.processor, groups, group_advantages(rewards), config.sampling.max_new_tokens)
    prepare_batch(batch, policy.model, policy.processor, config)
    assert torch.all(batch.token_weights[batch.seq.response_mask.bool()] == 1.0)
    both = config.model_copy(update={"weighting": config.weighting.model_copy(update={"apply_to": "both"})})
    prepare_batch(batch, policy.model, policy.processor, both)  # control: policy rows do get weights
    assert batch.token_weights[batch.seq.response_mask.bool()].std() > 0
