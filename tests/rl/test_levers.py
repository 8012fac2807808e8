"""The method levers against hand-computed tensors: CHORD's expert SFT term and mu decay, VPPO's top-k
token mask, ReLIFT's all-wrong injection rule, the background-filled counterfactual image, and the fact-level
reward (beyond the paper). Each is off by default: the default path is tested elsewhere, unchanged."""

from __future__ import annotations

from math import cos, log, pi

import pytest
import torch
from PIL import Image

from tgrl_lib.data.images import background_color, blank_images
from tgrl_lib.errors import TgrlError
from tgrl_lib.rl.losses import TGRLLoss, accumulation_totals, chord_coef, expert_nll
from tgrl_lib.rl.mixing import wants_injection
from tgrl_lib.rl.stats import as_floats
from tgrl_lib.rl.weighting import compute_token_weights, normalise_weights, top_k_mask


def close(actual, expected, tol=1e-6):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=tol, atol=tol)


# ------------------------------------------------------------------------------------------- CHORD
# row 0 on-policy (A = 1, ratio 1), row 1 expert (A = 2, p = 0.5 and 0.8); all four tokens valid
P_EXPERT = [0.5, 0.8]
ADV = torch.tensor([1.0, 2.0])
EXPERT = torch.tensor([False, True])
MASK = torch.ones(2, 2, dtype=torch.bool)


def _logp():
    return torch.tensor([[log(0.5), log(0.5)], [log(0.5), log(0.8)]], requires_grad=True)


def test_chord_mixes_rl_and_expert_sft_as_hand_computed():
    gamma, mu = 0.1, 0.25
    shaped = [p / (p + gamma) for p in P_EXPERT]
    policy = (-1.0 - 1.0) / 4  # token mean over the 4 valid tokens
    expert = -2.0 * sum(shaped) / 4
    nll = -(log(0.5) + log(0.8)) / 2  # mean over the 2 expert tokens
    base, base_stats = TGRLLoss()(_logp(), _logp().detach(), ADV, MASK, expert_mask=EXPERT)
    assert float(base.detach()) == pytest.approx(policy + expert) and "loss/sft" not in as_floats(
        base_stats
    )  # off
    logp = _logp()
    loss, stats = TGRLLoss(sft_coef=mu)(logp, logp.detach(), ADV, MASK, expert_mask=EXPERT)
    want = (1 - mu) * (policy + expert) + mu * nll
    assert float(loss.detach()) == pytest.approx(want)
    got = as_floats(stats)
    assert got["loss/sft"] == pytest.approx(mu * nll) and got["expert/sft_coef"] == pytest.approx(mu)
    assert got["loss/policy"] + got["loss/expert"] + got["loss/sft"] == pytest.approx(got["loss/total"])
    loss.backward()
    # expert token t: (1-mu) * d(-A f(p))/dlogp / 4 + mu * d(-logp)/dlogp / 2
    grad_expert = [(1 - mu) * -2.0 * gamma * p / (p + gamma) ** 2 / 4 - mu / 2 for p in P_EXPERT]
    close(logp.grad, [[(1 - mu) * -1.0 / 4] * 2, grad_expert])


def test_chord_token_weight_p_one_minus_p_and_the_per_call_mu():
    mu = 0.5
    phi = [p * (1 - p) for p in P_EXPERT]  # 0.25, 0.16
    logp = _logp()
    loss_fn = TGRLLoss(sft_coef=0.9, sft_token_weight="p(1-p)")
    _, stats = loss_fn(logp, logp.detach(), ADV, MASK, expert_mask=EXPERT, sft_coef=mu)  # the call's mu wins
    got = as_floats(stats)
    assert got["loss/sft"] == pytest.approx(mu * -(phi[0] * log(0.5) + phi[1] * log(0.8)) / 2)
    assert got["expert/sft_phi_mean"] == pytest.approx(sum(phi) / 2)
    term, weight = expert_nll(torch.tensor([[log(0.5), log(0.8)]]), "p(1-p)")
    close(weight, [phi])
    close(term, [[-phi[0] * log(0.5), -phi[1] * log(0.8)]])
    with pytest.raises(TgrlError, match="sft_token_weight"):
        TGRLLoss(sft_coef=0.1, sft_token_weight="p2")


def test_chord_micro_batches_sum_to_the_full_batch():
    torch.manual_seed(0)
    logp = torch.randn(6, 3).clamp(max=-0.05)
    adv, expert = torch.randn(6), torch.tensor([False, True, False, True, True, False])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 1, 1]], dtype=torch.bool)
    fn = TGRLLoss(sft_coef=0.3)
    full, _ = fn(logp, logp, adv, mask, expert_mask=expert)
    totals = accumulation_totals(mask, expert)
    assert totals["num_expert_tokens_total"] == 8
    parts = [fn(logp[r], logp[r], adv[r], mask[r], expert_mask=expert[r], **totals)[0]
             for r in (slice(0, 2), slice(2, 6))]  # fmt: skip
    assert float(sum(parts)) == pytest.approx(float(full))


def test_chord_mu_decay():
    assert chord_coef(7, 10, 0.5, None) == 0.5  # constant without an end value
    assert chord_coef(1, 10, 0.9, 0.1, "linear") == pytest.approx(0.9)
    assert chord_coef(4, 10, 0.9, 0.1, "linear") == pytest.approx(0.9 - 0.8 * 3 / 9)
    assert chord_coef(4, 10, 0.9, 0.1, "cosine") == pytest.approx(0.1 + 0.8 * 0.5 * (1 + cos(pi * 3 / 9)))
    assert chord_coef(10, 10, 0.9, 0.1) == pytest.approx(0.1)
    with pytest.raises(TgrlError, match="decay"):
        chord_coef(2, 10, 0.9, 0.1, "step")


# -------------------------------------------------------------------------------------------- VPPO
def test_top_k_mask_keeps_the_most_visually_dependent_tokens():
    close(top_k_mask(torch.tensor([0.1, 0.9, 0.0, 0.5, 0.5]), 0.4), [0.0, 1.0, 0.0, 1.0, 0.0])  # tie: first
    close(top_k_mask(torch.tensor([3.0, 1.0, 2.0]), 0.5), [1.0, 0.0, 1.0])  # ceil(0.5 * 3) = 2 tokens
    close(top_k_mask(torch.tensor([3.0, 1.0]), 0.5, alpha=0.5), [1.0, 0.5])  # blended towards 1
    with pytest.raises(TgrlError, match="top_k"):
        top_k_mask(torch.tensor([1.0]), 0.0)


def test_top_k_on_policy_tokens_only_from_the_logprob_drop():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    with_image = torch.tensor([[-0.1, -0.2, -0.3, 0.0], [-0.5, -0.1, 0.0, 0.0]])
    blank = torch.tensor([[-0.6, -0.2, -1.3, 0.0], [-2.5, -0.4, 0.0, 0.0]])  # drops 0.5, 0, 1.0 | 2.0, 0.3
    expert = torch.tensor([False, True])
    w = compute_token_weights("visual_dependency", response_mask=mask, expert_mask=expert,
                              logprobs_with_image=with_image, logprobs_blank=blank, apply_to="policy",
                              method="top_k", top_k=0.5)  # fmt: skip
    # policy row scores 0.5, 0, 1.0: ceil(1.5) = 2 kept (1.0 and 0.5); the expert row keeps weight 1
    close(w, [[1.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    with pytest.raises(TgrlError, match="normalisation"):
        normalise_weights(torch.ones(2, 4), mask, method="top")


# ----------------------------------------------------------------------------------------- ReLIFT
def test_relift_injects_only_into_all_wrong_groups():
    assert [wants_injection(a, inject_below=1.0, rule="all_wrong") for a in (0.0, 0.125, 1.0)] == [
        True, False, False]  # fmt: skip
    assert [wants_injection(a, inject_below=0.5) for a in (0.0, 0.25, 0.5)] == [True, True, False]
    assert wants_injection(0.99, inject_below=1.0) and not wants_injection(1.0, inject_below=1.0)


def test_trainer_rule_follows_the_config():
    from tgrl_lib.config import TrainConfig
    from tgrl_lib.rl.trainer import wants_experts

    class G:
        def __init__(self, accuracy):
            self.accuracy = accuracy

    relift = TrainConfig(mixing={"inject_rule": "all_wrong"})
    assert wants_experts(relift, G(0.0)) and not wants_experts(relift, G(0.125))
    assert wants_experts(TrainConfig(), G(0.875))  # default: always (inject_below 1.0)
    assert wants_experts(TrainConfig(algorithm="sft", mixing={"inject_rule": "all_wrong"}), G(1.0))


# ------------------------------------------------------------------------------ counterfactual image
def test_blank_images_fill_black_rgb_or_the_background():
    scene = Image.new("RGB", (8, 8), (255, 255, 255))
    scene.paste((230, 40, 40), (0, 0, 3, 3))  # 9 red pixels on 55 white
    chart = Image.new("RGB", (8, 8), (10, 20, 30))
    assert background_color(scene) == (255, 255, 255)
    black = blank_images([scene, chart])
    assert black[0] is black[1] and black[0].getpixel((0, 0)) == (0, 0, 0)  # default unchanged: black
    assert blank_images([scene], "black")[0].getpixel((4, 4)) == (0, 0, 0)
    assert blank_images([scene], (1, 2, 3))[0].getpixel((4, 4)) == (1, 2, 3)
    bg = blank_images([scene, chart, scene], "background")
    assert [b.getpixel((0, 0)) for b in bg] == [(255, 255, 255), (10, 20, 30), (255, 255, 255)]
    assert bg[0] is bg[2] and bg[0].size == scene.size  # same size and fill: one shared object


def test_weighting_config_takes_the_fill():
    from tgrl_lib.config import WeightingConfig

    assert WeightingConfig().blank_fill == "black"
    assert WeightingConfig(blank_fill=[255, 255, 255]).blank_fill == (255, 255, 255)
    with pytest.raises(ValueError):
        WeightingConfig(blank_fill="white-ish")


# ---------------------------------------------------------------------------- fact-level reward
def test_fact_reward_adds_the_share_of_true_stated_facts():
    from tgrl_lib.data.schema import Problem
    from tgrl_lib.scoring.rewards import reward

    red = {
        "shape": "circle",
        "color": "red",
        "size": "small",
        "px": 10,
        "bbox": [0, 0, 10, 10],
        "center": [5, 5],
    }
    facts = {"kind": "shapes", "width": 56, "height": 56, "bars": [], "objects": [red]}
    p = Problem(id="p", image="i.png", question="q", answer="1", answer_type="integer", facts=facts)
    half = "<think>I see 1 red circle, 1 blue square.</think><answer>1</answer>"
    assert reward(half, p).reward == pytest.approx(1.1)  # off by default
    assert reward(half, p, fact_weight=0.5).reward == pytest.approx(1.1 + 0.5 * 0.5)
    assert reward("<think>One.</think><answer>1</answer>", p, fact_weight=0.5).reward == pytest.approx(1.1)
    bare = p.model_copy(update={"facts": None})
    assert reward(half, bare, fact_weight=0.5).reward == pytest.approx(1.1)  # no facts: no term
    with pytest.raises(TgrlError):
        reward(half, p, fact_weight=-1.0)
