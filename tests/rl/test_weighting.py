"""Token weights: raw scores, normalisation, blending, clipping, apply_to, edge cases, dispatch, stats."""

import pytest
import torch

from tgrl_lib.errors import TgrlError
from tgrl_lib.rl.weighting import (
    compute_token_weights,
    entropy_scores,
    normalise_weights,
    selected_tokens,
    visual_dependency,
    weight_stats,
)


def close(actual, expected):
    torch.testing.assert_close(actual, torch.tensor(expected), rtol=1e-6, atol=1e-6)


# two sequences, ragged: row 0 has 3 valid tokens, row 1 has 2
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)


def test_visual_dependency_is_the_clamped_logprob_drop_masked():
    with_image = torch.tensor([[-0.1, -2.0, -0.5, -9.0], [-1.0, -0.2, -3.0, -3.0]])
    blank = torch.tensor([[-1.1, -1.0, -0.5, -0.0], [-4.0, -0.7, -3.0, -9.0]])
    raw = visual_dependency(with_image, blank, MASK)
    # drops: 1.0, -1.0 -> 0 (more likely without the image), 0.0, padding -> 0 | 3.0, 0.5, padding, padding
    close(raw, [[1.0, 0.0, 0.0, 0.0], [3.0, 0.5, 0.0, 0.0]])


def test_visual_dependency_carries_no_gradient():
    with_image = torch.zeros(2, 4, requires_grad=True)
    raw = visual_dependency(with_image, torch.full((2, 4), -1.0), MASK)
    assert not raw.requires_grad


def test_entropy_scores_mask_and_clamp():
    entropy = torch.tensor([[0.5, 2.0, -1e-7, 7.0], [1.0, 0.0, 3.0, 3.0]])
    close(entropy_scores(entropy, MASK), [[0.5, 2.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]])


def test_normalise_to_mean_one_without_clipping():
    raw = torch.tensor([[1.0, 2.0, 3.0, 99.0], [2.0, 2.0, 99.0, 99.0]])
    w = normalise_weights(raw, MASK, w_min=0.0, w_max=10.0)
    # valid scores 1, 2, 3, 2, 2 -> mean 2 -> weights 0.5, 1, 1.5, 1, 1; padding -> 1
    close(w, [[0.5, 1.0, 1.5, 1.0], [1.0, 1.0, 1.0, 1.0]])
    assert w[MASK].mean().item() == pytest.approx(1.0)


def test_clipping_is_not_followed_by_renormalisation():
    raw = torch.tensor([[0.0, 1.0, 9.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    w = normalise_weights(raw, MASK, w_min=0.5, w_max=2.0)
    # mean over 5 valid tokens = 2 -> 0, 0.5, 4.5, 0, 0 -> clipped to 0.5, 0.5, 2.0, 0.5, 0.5
    close(w, [[0.5, 0.5, 2.0, 1.0], [0.5, 0.5, 1.0, 1.0]])
    assert w[MASK].mean().item() == pytest.approx(0.8)  # not renormalised to 1
    assert w[MASK].min().item() >= 0.5 and w[MASK].max().item() <= 2.0


def test_alpha_interpolates_between_uniform_and_full():
    raw = torch.tensor([[1.0, 2.0, 3.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    full = normalise_weights(raw, MASK, w_min=0.0, w_max=10.0, alpha=1.0)
    half = normalise_weights(raw, MASK, w_min=0.0, w_max=10.0, alpha=0.5)
    none = normalise_weights(raw, MASK, w_min=0.0, w_max=10.0, alpha=0.0)
    assert torch.equal(none, torch.ones(2, 4))
    assert half[0, :3].tolist() == pytest.approx([0.75, 1.0, 1.25])
    assert torch.allclose(half, 0.5 + 0.5 * full)
    assert half[MASK].mean().item() == pytest.approx(1.0)


def test_apply_to_expert_normalises_over_expert_tokens_only():
    raw = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 0.0, 0.0]])
    expert = torch.tensor([False, True])
    w = normalise_weights(raw, MASK, w_min=0.0, w_max=10.0, apply_to="expert", expert_mask=expert)
    # expert row scores 5, 1 -> mean 3; the on-policy row is untouched
    assert w[1, :2].tolist() == pytest.approx([5 / 3, 1 / 3])
    assert w[0].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_apply_to_policy_normalises_over_policy_tokens_only():
    raw = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 0.0, 0.0]])
    expert = torch.tensor([False, True])
    w = normalise_weights(raw, MASK, w_min=0.0, w_max=10.0, apply_to="policy", expert_mask=expert)
    assert w[0, :3].tolist() == pytest.approx([0.5, 1.5, 1.0])
    assert w[1].tolist() == [1.0, 1.0, 1.0, 1.0]


def test_apply_to_both_without_expert_mask_uses_every_valid_token():
    raw = torch.tensor([[1.0, 3.0, 2.0, 0.0], [5.0, 1.0, 0.0, 0.0]])
    both = normalise_weights(raw, MASK, w_min=0.0, w_max=10.0)
    assert both[MASK].tolist() == pytest.approx([x / 2.4 for x in (1.0, 3.0, 2.0, 5.0, 1.0)])
    # apply_to="policy" with no expert rows is the same thing
    assert torch.equal(both, normalise_weights(raw, MASK, w_min=0.0, w_max=10.0, apply_to="policy"))


def test_all_zero_scores_give_all_ones():
    w = normalise_weights(torch.zeros(2, 4), MASK)
    assert torch.equal(w, torch.ones(2, 4))


def test_empty_masks_give_ones_and_no_nan():
    empty = torch.zeros(2, 4, dtype=torch.bool)
    w = normalise_weights(torch.rand(2, 4), empty)
    assert torch.equal(w, torch.ones(2, 4))
    # no expert rows but apply_to="expert": nothing selected
    w = normalise_weights(torch.rand(2, 4), MASK, apply_to="expert", expert_mask=torch.tensor([False, False]))
    assert torch.equal(w, torch.ones(2, 4))
    assert torch.equal(
        normalise_weights(torch.zeros(0, 0), torch.zeros(0, 0, dtype=torch.bool)), torch.ones(0, 0)
    )
    assert weight_stats(torch.ones(2, 4), empty) == {
        "weights/mean": 0.0,
        "weights/std": 0.0,
        "weights/min": 0.0,
        "weights/max": 0.0,
        "weights/clip_frac": 0.0,
    }


def test_scores_outside_the_selection_are_ignored_even_if_nan():
    raw = torch.tensor([[1.0, 3.0, 2.0, float("nan")], [float("nan"), float("nan"), 0.0, 0.0]])
    w = normalise_weights(
        raw, MASK, w_min=0.0, w_max=10.0, apply_to="policy", expert_mask=torch.tensor([0, 1])
    )
    assert w[0, :3].tolist() == pytest.approx([0.5, 1.5, 1.0])
    assert not torch.isnan(w).any()


def test_rank_weights_hand_values_with_ties():
    # valid scores 0, 0, 3 | 1, 0: three tied zeros share ranks 0-2 (mid 1), then 1 (rank 3), 3 (rank 4)
    raw = torch.tensor([[0.0, 0.0, 3.0, 99.0], [1.0, 0.0, 99.0, 99.0]])
    w = normalise_weights(raw, MASK, w_min=0.5, w_max=2.0, method="rank")
    # quantile (rank + 0.5) / 5 -> 0.3, 0.3, 0.9 | 0.7, 0.3; w = 1 + 0.5 * (2q - 1); padding -> 1
    close(w, [[0.8, 0.8, 1.4, 1.0], [1.2, 0.8, 1.0, 1.0]])


def test_rank_weights_keep_mean_one_where_mean_normalisation_collapses_to_w_min():
    torch.manual_seed(0)
    mask = torch.ones(16, 32, dtype=torch.bool)
    raw = torch.distributions.Exponential(1.0).sample((16, 32)) ** 4  # heavy-tailed, like the VD scores
    by_mean = normalise_weights(raw, mask, w_min=0.5, w_max=2.0)
    by_rank = normalise_weights(raw, mask, w_min=0.5, w_max=2.0, method="rank")
    assert weight_stats(by_mean, mask)["weights/clip_frac"] > 0.5  # the degeneracy rank avoids
    assert by_rank.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert weight_stats(by_rank, mask)["weights/clip_frac"] == 0.0
    assert by_rank.min().item() > 0.5 and by_rank.max().item() < 1.5
    # only the order matters: a monotone transform of the scores gives the same weights
    torch.testing.assert_close(normalise_weights(raw.sqrt(), mask, method="rank"), by_rank)
    order = raw.flatten().argsort()
    assert (by_rank.flatten()[order].diff() >= 0).all()


def test_rank_weights_alpha_and_asymmetric_bounds():
    raw = torch.tensor([[1.0, 2.0, 3.0, 0.0], [4.0, 5.0, 0.0, 0.0]])
    # quantiles 0.1, 0.3, 0.5, 0.7, 0.9; half span min(1 - 0.8, 3 - 1) = 0.2, alpha 0.5 -> +-0.08 at the ends
    w = normalise_weights(raw, MASK, w_min=0.8, w_max=3.0, alpha=0.5, method="rank")
    assert w[MASK].tolist() == pytest.approx([0.92, 0.96, 1.0, 1.04, 1.08])
    assert torch.equal(normalise_weights(torch.zeros(2, 4), MASK, method="rank"), torch.ones(2, 4))


@pytest.mark.parametrize(
    ("raw", "kwargs", "fragment"),
    [
        (torch.tensor([[1.0, -1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]), {}, ">= 0"),
        (torch.tensor([[1.0, float("nan"), 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]), {}, "finite"),
        (torch.ones(2, 4), {"w_min": 2.0, "w_max": 1.0}, "w_min <= w_max"),
        (torch.ones(2, 4), {"alpha": 1.5}, "alpha"),
        (torch.ones(2, 4), {"apply_to": "all"}, "apply_to"),
        (torch.ones(2, 3), {}, "shape"),
        (torch.ones(2, 4), {"apply_to": "expert", "expert_mask": torch.tensor([True])}, "expert_mask"),
        (torch.ones(2, 4), {"method": "softmax"}, "unknown normalisation"),
        (torch.ones(2, 4), {"method": "rank", "w_min": 1.2, "w_max": 2.0}, "w_min <= 1 <= w_max"),
    ],
)
def test_normalise_rejects_bad_inputs(raw, kwargs, fragment):
    with pytest.raises(TgrlError) as info:
        normalise_weights(raw, MASK, **kwargs)
    assert fragment in str(info.value)


def test_compute_token_weights_dispatch():
    with_image = torch.tensor([[-0.1, -2.0, -0.5, 0.0], [-1.0, -0.2, 0.0, 0.0]])
    blank = torch.tensor([[-1.1, -2.0, -0.5, 0.0], [-4.0, -0.7, 0.0, 0.0]])
    entropy = torch.tensor([[1.0, 2.0, 3.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    kw = {"response_mask": MASK, "w_min": 0.0, "w_max": 10.0}
    assert torch.equal(compute_token_weights("none", **kw), torch.ones(2, 4))
    vd = compute_token_weights(
        "visual_dependency", logprobs_with_image=with_image, logprobs_blank=blank, **kw
    )
    # drops 1, 0, 0, 3, 0.5 -> mean 0.9
    assert vd[MASK].tolist() == pytest.approx([1 / 0.9, 0.0, 0.0, 3 / 0.9, 0.5 / 0.9])
    ent = compute_token_weights("entropy", entropy=entropy, **kw)
    assert ent[MASK].tolist() == pytest.approx([0.5, 1.0, 1.5, 1.0, 1.0])


def test_compute_token_weights_passes_the_switches_through():
    entropy = torch.tensor([[1.0, 2.0, 3.0, 0.0], [2.0, 2.0, 0.0, 0.0]])
    expert = torch.tensor([True, False])
    got = compute_token_weights(
        "entropy", response_mask=MASK, entropy=entropy, expert_mask=expert, apply_to="expert", alpha=0.5
    )
    want = normalise_weights(
        entropy_scores(entropy, MASK), MASK, apply_to="expert", expert_mask=expert, alpha=0.5
    )
    assert torch.equal(got, want)
    assert got[0, :3].tolist() == pytest.approx([0.75, 1.0, 1.25])
    assert got[1].tolist() == [1.0] * 4


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [("visual_dependency", "logprobs_blank"), ("entropy", "entropy"), ("attention", "unknown kind")],
)
def test_compute_token_weights_names_missing_inputs(kind, fragment):
    with pytest.raises(TgrlError) as info:
        compute_token_weights(kind, response_mask=MASK)
    assert fragment in str(info.value)


def test_weight_stats_hand_values():
    weights = torch.tensor([[0.5, 1.0, 2.0, 7.0], [0.5, 2.0, 7.0, 7.0]])
    stats = weight_stats(weights, MASK, w_min=0.5, w_max=2.0)
    # valid: 0.5, 1, 2, 0.5, 2 -> mean 1.2, population var = (0.49+0.04+0.64+0.49+0.64)/5 = 0.46
    assert stats["weights/mean"] == pytest.approx(1.2)
    assert stats["weights/std"] == pytest.approx(0.46**0.5)
    assert stats["weights/min"] == pytest.approx(0.5)
    assert stats["weights/max"] == pytest.approx(2.0)
    assert stats["weights/clip_frac"] == pytest.approx(0.8)


def test_selected_tokens_for_stats():
    expert = torch.tensor([False, True])
    assert selected_tokens(MASK, "expert", expert).tolist() == [[False] * 4, [True, True, False, False]]
    assert selected_tokens(MASK, "policy", expert).tolist() == [[True, True, True, False], [False] * 4]
    assert torch.equal(selected_tokens(MASK, "both", None), MASK)
