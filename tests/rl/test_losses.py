"""The TGRL objective against hand-computed tensors and an independent, loop-based GRPO reference."""

from math import isfinite, log

import pytest
import torch

from tgrl_lib.errors import TgrlError
from tgrl_lib.rl import losses
from tgrl_lib.rl.advantages import group_advantages
from tgrl_lib.rl.losses import AGGREGATIONS, TGRLLoss, accumulation_totals, k3_kl, sft_loss
from tgrl_lib.rl.stats import LossTerm, StepSum, TokenMean, as_floats


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


def assert_stats(stats, want):
    stats = as_floats(stats)
    assert {key: stats[key] for key in want} == pytest.approx(want)


def test_clip_both_sides_with_positive_and_negative_advantages_and_clipfrac():
    # row 0: A = +1, row 1: A = -1; ratios 1.5, 0.5, 1.1 in both rows
    logp = torch.tensor([[log(1.5), log(0.5), log(1.1)]] * 2, requires_grad=True)
    old, adv = torch.zeros(2, 3), torch.tensor([1.0, -1.0])
    pg_loss, ratio, clipped = losses.clipped_surrogate(logp, old, adv, clip_low=0.2, clip_high=0.28)
    close(ratio.detach(), [[1.5, 0.5, 1.1]] * 2)
    # A>0: max(-1.5, -1.28) = -1.28 (clipped high); max(-0.5, -0.8) = -0.5; -1.1
    # A<0: max(1.5, 1.28) = 1.5; max(0.5, 0.8) = 0.8 (clipped low); 1.1
    close(pg_loss.detach(), [[-1.28, -0.5, -1.1], [1.5, 0.8, 1.1]])
    assert clipped.tolist() == [[True, False, False], [False, True, False]]
    pg_loss.sum().backward()
    # d(-A*ratio)/dlogp = -A*ratio where the unclipped branch is active, 0 where the clip is
    close(logp.grad, [[0.0, -0.5, -1.1], [1.5, 0.0, 1.1]])
    pg_loss, _, clipped = losses.clipped_surrogate(logp, old, adv, clip=False)  # LUFFY: raw ratio, no clip
    close(pg_loss.detach(), [[-1.5, -0.5, -1.1], [1.5, 0.5, 1.1]])
    assert not clipped.any()
    _, stats = TGRLLoss(clip_low=0.2, clip_high=0.28)(logp, old, adv, torch.ones(2, 3))
    want = {"policy/clipfrac": 2 / 6, "policy/clipfrac_low": 1 / 6, "policy/clipfrac_high": 1 / 6}
    assert_stats(stats, want | {"policy/ratio_mean": 3.1 / 3, "tokens/policy": 6.0, "tokens/expert": 0.0})
    _, unclipped = TGRLLoss(clip=False)(logp, old, adv, torch.ones(2, 3))
    assert as_floats(unclipped)["policy/clipfrac"] == 0.0


def test_expert_shaping_values_and_gradient_match_the_formula():
    gamma, a, p = 0.1, 2.0, torch.tensor([[0.1, 0.9, 0.01]])
    logp = p.log().requires_grad_()
    loss, prob, shaped = losses.expert_surrogate(logp, torch.tensor([a]), shaping="shaped", gamma=gamma)
    close(prob.detach(), p)
    close(shaped.detach(), [[0.5, 0.9, 0.01 / 0.11]])  # LUFFY f(p) = p / (p + gamma)
    close(loss.detach(), -a * shaped.detach())
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    close(grad, -a * gamma * p / (p + gamma) ** 2)  # d(-A f(p))/dlogp = -A * gamma*p/(p+gamma)^2
    close(grad, [[-a * 0.25, -a * 0.09, -a * 0.001 / 0.0121]])
    # "plain": importance sampling with the expert's prob taken as 1, f(p) = p, gradient -A*p
    plain, _, plain_shaped = losses.expert_surrogate(logp, torch.tensor([a]), shaping="plain", gamma=gamma)
    close(plain_shaped.detach(), p)
    (plain_grad,) = torch.autograd.grad(plain.sum(), logp)
    close(plain_grad, -a * p)
    # LUFFY: at p = 0.01 the shaped gradient weight is ~8.3x plain importance sampling's
    assert (grad[0, 2] / plain_grad[0, 2]).item() == pytest.approx(8.264, abs=1e-3)


def test_mixed_weighted_batch_hand_computed():
    # row 0 on-policy, A=+1, ratios 1.5, 0.5; row 1 expert (LUFFY +0.875), p = 0.1, 0.9; weights 2 and 3
    logp = torch.tensor([[log(1.5), log(0.5)], [log(0.1), log(0.9)]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0], [float("nan"), float("nan")]])  # unused on expert rows
    adv, mask, weights = torch.tensor([1.0, 0.875]), torch.ones(2, 2), torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    expert = torch.tensor([False, True])
    loss, stats = TGRLLoss()(logp, old, adv, mask, expert_mask=expert, token_weights=weights)
    # policy: 2 * -1.28 + -0.5 = -3.06; expert: -0.875 * (0.5 + 3 * 0.9) = -2.8; token mean over 4 tokens
    assert loss.item() == pytest.approx((-3.06 - 2.8) / 4)
    want = {
        "loss/policy": -3.06 / 4,
        "loss/expert": -2.8 / 4,
        "policy/clipfrac": 0.5,
        "expert/prob_mean": 0.5,
    }
    want |= {"expert/shaped_weight_mean": 0.7, "expert/grad_weight_mean": (0.25 + 0.09) / 2}
    assert_stats(stats, want | {"tokens/policy": 2.0, "tokens/expert": 2.0})
    loss.backward()
    close(logp.grad, [[0.0, -0.5 / 4], [-0.875 * 0.25 / 4, -3 * 0.875 * 0.09 / 4]])
    _, plain = TGRLLoss(expert_shaping="plain")(logp, old, adv, mask, expert_mask=expert)
    assert_stats(plain, {"expert/shaped_weight_mean": 0.5, "expert/grad_weight_mean": 0.5})  # f(p) = p


def test_k3_values_and_kl_on_policy_tokens_only():
    logp = torch.tensor([log(0.5), log(0.25), log(0.3)])
    ref = torch.tensor([log(0.25), log(0.5), log(0.3)])
    # r = ref/pi: 0.5 -> 0.5 - ln 0.5 - 1; 2 -> 2 - ln 2 - 1; 1 -> 0
    close(k3_kl(logp, ref), [0.5 + log(2) - 1, 1 - log(2), 0.0])
    assert (k3_kl(torch.linspace(-5, 5, 101), torch.linspace(3, -4, 101)) >= 0).all()
    # in the loss: on-policy tokens only (k3 estimates KL(pi || ref) only for tokens sampled from pi)
    logp = torch.tensor([[log(0.5), log(0.25)], [log(0.5), log(0.5)]], requires_grad=True)
    ref = torch.tensor([[log(0.25), log(0.25)], [log(0.9), log(0.01)]])  # expert row: huge "KL", ignored
    adv, mask, expert = torch.zeros(2), torch.ones(2, 2), torch.tensor([False, True])
    loss, stats = TGRLLoss(kl_coef=0.1)(logp, logp.detach(), adv, mask, expert_mask=expert, ref_logprobs=ref)
    k3 = 0.5 + log(2) - 1
    assert_stats(stats, {"kl/mean": k3 / 2, "loss/kl": 0.1 * k3 / 4, "loss/total": loss.item()})
    assert loss.item() == pytest.approx(0.1 * k3 / 4)
    _, no_coef = TGRLLoss()(logp, logp.detach(), adv, mask, expert_mask=expert, ref_logprobs=ref)
    no_coef = as_floats(no_coef)
    assert no_coef["loss/kl"] == 0.0 and no_coef["kl/mean"] == pytest.approx(k3 / 2)


def test_entropy_bonus_lowers_the_loss_and_is_reported_per_token_kind():
    entropy = torch.tensor([[1.0, 2.0, 3.0], [4.0, 6.0, 99.0]], requires_grad=True)
    mask, expert, zeros = torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.tensor([False, True]), torch.zeros(2, 3)
    loss_fn = TGRLLoss(entropy_coef=0.01)
    loss, stats = loss_fn(zeros, zeros, torch.zeros(2), mask, expert_mask=expert, entropy=entropy)
    assert loss.item() == pytest.approx(-0.01 * 16 / 5)
    assert_stats(stats, {"loss/entropy_bonus": 0.01 * 16 / 5, "policy/entropy": 2.0, "expert/entropy": 5.0})
    loss.backward()
    close(entropy.grad, [[-0.002] * 3, [-0.002, -0.002, 0.0]])


RAGGED = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
TERM = torch.tensor([[1.0, 2.0, 3.0, 50.0], [4.0, 50.0, 50.0, 50.0], [9.0, 9.0, 9.0, 9.0]])


@pytest.mark.parametrize(
    ("name", "expected"),
    [("token_mean", 10 / 4), ("seq_mean", (2 + 4) / 2), ("constant", 10 / (2 * 4))],
)
def test_each_aggregation_on_a_ragged_mask(name, expected):
    totals = accumulation_totals(RAGGED)
    assert totals == {"num_valid_tokens_total": 4, "num_sequences_total": 2}  # the empty row is no sequence
    assert losses.aggregate(TERM, RAGGED, name, max_response_len=4, **totals).item() == pytest.approx(
        expected
    )
    # the same through the loss: ratio 1, A = -1, no clip -> per-token term = weight
    logp = torch.zeros(3, 4)
    loss, _ = TGRLLoss(aggregation=name, max_response_len=4, clip=False)(
        logp, logp, -torch.ones(3), RAGGED, token_weights=TERM
    )
    assert loss.item() == pytest.approx(expected)


def _random_batch(seed=0, b=8, t=6):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([6, 1, 4, 3, 6, 2, 5, 4])[:b]
    mask = torch.arange(t)[None, :] < lengths[:, None]  # [B, T] ragged
    logp = (-torch.rand(b, t, generator=gen) * 3).requires_grad_()
    old = logp.detach() + 0.4 * torch.randn(b, t, generator=gen)  # wide ratios: both clips fire
    ref = logp.detach() + 0.3 * torch.randn(b, t, generator=gen)
    adv = group_advantages(torch.randint(0, 2, (b,), generator=gen).float(), group_size=4).flatten()  # [B]
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean", "constant"])
def test_two_micro_batches_sum_to_the_full_batch(aggregation):
    logp, old, ref, adv, mask = _random_batch(seed=1)
    weights = torch.linspace(0.5, 2.0, mask.numel()).view(mask.shape)
    entropy = torch.linspace(0.0, 1.5, mask.numel()).flip(0).view(mask.shape)
    expert = torch.tensor([False, False, False, True, False, False, True, False])
    loss_fn = TGRLLoss(aggregation=aggregation, max_response_len=6, kl_coef=0.05, entropy_coef=0.01)

    def run(rows, **totals):
        return loss_fn(
            logp[rows], old[rows], adv[rows], mask[rows], expert_mask=expert[rows],
            token_weights=weights[rows], ref_logprobs=ref[rows], entropy=entropy[rows], **totals,
        )  # fmt: skip

    full, _ = run(slice(None))
    (full_grad,) = torch.autograd.grad(full, logp)
    totals = accumulation_totals(mask)
    halves = [accumulation_totals(mask[:3]), accumulation_totals(mask[3:])]
    assert totals == {k: halves[0][k] + halves[1][k] for k in totals}  # counts add up over micro-batches
    micro = [run(slice(0, 3), **totals)[0], run(slice(3, 8), **totals)[0]]
    (micro_grad,) = torch.autograd.grad(micro[0] + micro[1], logp)
    assert (micro[0] + micro[1]).item() == pytest.approx(full.item(), abs=1e-6)
    close(micro_grad, full_grad)
    if aggregation == "token_mean":  # without the step totals, micro-batch means do not add up
        alone = run(slice(0, 3))[0] + run(slice(3, 8))[0]
        assert alone.item() != pytest.approx(full.item(), abs=1e-4)


def grpo_reference(logp, old, ref, adv, mask, *, eps, beta, per_sequence):
    """GRPO objective written out token by token (arXiv 2402.03300, eq. 3), independent of tgrl_lib."""
    total, n_tokens, n_seq = 0.0, 0, 0
    for i, row in enumerate(mask):
        valid = [j for j, m in enumerate(row) if m]
        if not valid:
            continue
        seq_total = 0.0
        for j in valid:
            ratio = torch.exp(logp[i, j] - old[i][j])
            surrogate = min(ratio * adv[i], min(max(ratio, 1 - eps), 1 + eps) * adv[i])
            log_r = ref[i][j] - logp[i, j]
            seq_total = seq_total + surrogate - beta * (torch.exp(log_r) - log_r - 1)
        total = total + (seq_total / len(valid) if per_sequence else seq_total)
        n_tokens, n_seq = n_tokens + len(valid), n_seq + 1
    return -total / (n_seq if per_sequence else n_tokens)


@pytest.mark.parametrize(("aggregation", "per_sequence"), [("seq_mean", True), ("token_mean", False)])
def test_all_weights_one_no_experts_equals_plain_grpo(aggregation, per_sequence):
    logp, old, ref, adv, mask = _random_batch(seed=3)
    loss_fn = TGRLLoss(aggregation=aggregation, clip_low=0.2, clip_high=0.2, kl_coef=0.04)
    no_experts, ones = torch.zeros(8, dtype=torch.bool), torch.ones(mask.shape)
    loss, stats = loss_fn(logp, old, adv, mask, expert_mask=no_experts, token_weights=ones, ref_logprobs=ref)
    assert 0 < as_floats(stats)["policy/clipfrac"] < 1  # the batch exercises the clip
    (grad,) = torch.autograd.grad(loss, logp)
    as_lists = [t.tolist() for t in (old, ref, adv, mask)]  # the reference sees plain python numbers
    expected = grpo_reference(logp, *as_lists, eps=0.2, beta=0.04, per_sequence=per_sequence)
    (expected_grad,) = torch.autograd.grad(expected, logp)
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)
    close(grad, expected_grad)


def test_stats_decompose_the_loss_and_stay_detached_tensors_with_their_rule():
    logp, old, ref, adv, mask = _random_batch(seed=4)
    expert = torch.tensor([True, False, False, False, True, False, False, False])
    loss, stats = TGRLLoss(kl_coef=0.1, entropy_coef=0.01)(
        logp, old, adv, mask, expert_mask=expert, ref_logprobs=ref, entropy=torch.rand(mask.shape)
    )
    raw, stats = stats, as_floats(stats)
    parts = stats["loss/policy"] + stats["loss/expert"] + stats["loss/kl"] - stats["loss/entropy_bonus"]
    assert parts == pytest.approx(loss.item(), abs=1e-6) and stats["loss/total"] == pytest.approx(loss.item())
    tensors = [t for v in raw.values() for t in ([v.value] if isinstance(v, StepSum) else [v.total, v.count])]
    assert all(not t.requires_grad and t.dim() == 0 for t in tensors)  # no host sync, no graph kept alive
    summed = {"loss/total", "loss/policy", "loss/expert", "loss/kl", "loss/entropy_bonus", "tokens/policy"}
    assert {k for k, v in raw.items() if isinstance(v, StepSum)} == summed | {
        "tokens/policy",
        "tokens/expert",
    }
    assert all(isinstance(v, TokenMean) for k, v in raw.items() if not k.startswith(("loss/", "tokens/")))
    assert {k for k, v in raw.items() if isinstance(v, LossTerm)} == summed - {"tokens/policy"}  # N-scaled
    assert stats["tokens/expert"] == 6 + 6 and stats["tokens/policy"] == mask.sum().item() - 12


def test_garbage_outside_its_domain_does_not_leak():
    logp, old, ref, adv, mask = _random_batch(seed=6)
    expert = torch.tensor([False, True, False, False, False, False, False, False])
    loss_fn = TGRLLoss(kl_coef=0.1)
    clean, _ = loss_fn(logp, old, adv, mask, expert_mask=expert, ref_logprobs=ref)
    old_bad, ref_bad = old.clone(), ref.clone()
    old_bad[1], ref_bad[1] = float("nan"), float("inf")  # expert row: old/ref unused
    old_bad[~mask], ref_bad[~mask] = float("nan"), float("nan")  # padding
    logp_bad = torch.where(mask, logp.detach(), float("-inf")).requires_grad_()  # padding log-probs -inf
    loss, stats = loss_fn(logp_bad, old_bad, adv, mask, expert_mask=expert, ref_logprobs=ref_bad)
    assert loss.item() == pytest.approx(clean.item())
    (grad,) = torch.autograd.grad(loss, logp_bad)
    assert torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert all(isfinite(v) for v in as_floats(stats).values())


def test_empty_mask_gives_zero_loss_and_finite_stats():
    logp = torch.randn(2, 3, requires_grad=True)
    empty = torch.zeros(2, 3, dtype=torch.bool)
    expert = torch.tensor([True, False])
    for aggregation in AGGREGATIONS:
        loss_fn = TGRLLoss(aggregation=aggregation, max_response_len=3)
        loss, stats = loss_fn(logp, logp.detach(), torch.ones(2), empty, expert_mask=expert)
        assert loss.item() == 0.0 and all(v == 0.0 for v in as_floats(stats).values())
        assert (torch.autograd.grad(loss, logp)[0] == 0).all()


def test_low_precision_inputs_give_float32_loss():
    logp = torch.tensor([[log(0.5), log(0.25)]], dtype=torch.bfloat16, requires_grad=True)
    loss, _ = TGRLLoss()(logp, logp.detach(), torch.tensor([1.0]), torch.ones(1, 2))
    assert loss.dtype == torch.float32
    loss.backward()
    assert logp.grad.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("loss_kwargs", "call_kwargs", "fragment"),
    [
        ({"aggregation": "sum"}, None, "unknown aggregation"),  # None: fails when constructed
        ({"expert_shaping": "sft"}, None, "unknown expert_shaping"),
        ({"aggregation": "constant"}, None, "max_response_len"),
        ({"clip_low": -0.1}, None, ">= 0"),
        ({"shaping_gamma": 0.0}, None, "shaping_gamma"),
        ({"kl_coef": 0.1}, {}, "ref_logprobs"),
        ({"entropy_coef": 0.1}, {}, "entropy"),
        ({}, {"advantages": torch.zeros(3)}, "advantages has shape (3,)"),
        ({}, {"expert_mask": torch.zeros(2, 4, dtype=torch.bool)}, "expert_mask"),
        ({}, {"token_weights": torch.ones(2, 3)}, "token_weights has shape (2, 3), expected (2, 4)"),
        ({}, {"old_logprobs": torch.zeros(2, 5)}, "old_logprobs"),
        ({}, {"logprobs": torch.zeros(8)}, "[B, T]"),
    ],
)
def test_bad_switches_and_inputs_raise_naming_the_culprit(loss_kwargs, call_kwargs, fragment):
    inputs = {"logprobs": torch.zeros(2, 4), "old_logprobs": torch.zeros(2, 4), "advantages": torch.zeros(2)}
    inputs.update(response_mask=torch.ones(2, 4), **(call_kwargs or {}))
    with pytest.raises(TgrlError) as info:
        loss_fn = TGRLLoss(**loss_kwargs)
        assert call_kwargs is not None, "constructor should have raised"
        loss_fn(**inputs)
    assert fragment in str(info.value)


def test_sft_loss_is_weighted_token_mean_nll():
    logp = torch.tensor([[log(0.5), log(0.25), 0.0], [log(0.1), -99.0, -99.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    loss, stats = sft_loss(logp, mask)
    nll = [log(2), log(4), 0.0, log(10)]
    want = {"loss/sft": sum(nll) / 4, "sft/nll_mean": sum(nll) / 4, "tokens/sft": 4.0}
    stats = as_floats(stats)
    assert stats == pytest.approx(want) and loss.item() == pytest.approx(stats["loss/sft"])
    weights = torch.tensor([[2.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    weighted, _ = sft_loss(logp, mask, weights)
    assert weighted.item() == pytest.approx((2 * log(2) + log(4) + 0.5 * log(10)) / 4)
    weighted.backward()
    close(logp.grad, [[-0.5, -0.25, -0.25], [-0.125, 0.0, 0.0]])
    # micro-batches given the step's token count sum to the full batch
    logp, _, _, _, mask = _random_batch(seed=7)
    full, _ = sft_loss(logp, mask)
    n = accumulation_totals(mask)["num_valid_tokens_total"]
    parts = [sft_loss(logp[r], mask[r], num_valid_tokens_total=n)[0] for r in (slice(0, 5), slice(5, 8))]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-6)
