"""Group-relative advantages and group stats against hand-computed numbers."""

import math

import pytest
import torch

from tgrl_lib.errors import TgrlError
from tgrl_lib.rl.advantages import group_advantages


def test_luffy_example_seven_failures_one_correct_expert():
    adv = group_advantages(torch.tensor([[0.0] * 7 + [1.0]]))
    assert adv.shape == (1, 8)
    assert adv[0, 7].item() == pytest.approx(0.875)
    assert adv[0, :7].tolist() == pytest.approx([-0.125] * 7)


def test_mean_is_per_group_not_per_batch():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    adv = group_advantages(rewards)
    assert adv[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert adv[1].tolist() == pytest.approx([0.25, 0.25, 0.25, -0.75])
    assert adv.sum(dim=1).tolist() == pytest.approx([0.0, 0.0], abs=1e-7)


def test_flat_rewards_are_read_group_by_group():
    flat = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    assert torch.equal(group_advantages(flat, group_size=4), group_advantages(flat.view(2, 4)))


def test_group_std_uses_population_std_plus_eps():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    eps = 1e-4
    adv = group_advantages(rewards, scale="group", eps=eps)
    # group 1: mean 0.5, population std 0.5
    assert adv[0].tolist() == pytest.approx([0.5 / (0.5 + eps), -0.5 / (0.5 + eps)] * 2)
    # group 2: mean 0.5, population std sqrt((1.5^2 + 3 * 0.5^2) / 4) = sqrt(0.75)
    std = math.sqrt(0.75)
    assert adv[1].tolist() == pytest.approx([1.5 / (std + eps)] + [-0.5 / (std + eps)] * 3)


def test_batch_std_divides_group_centred_rewards_by_the_std_of_all_rewards():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    # all rewards: mean 0.75, population std sqrt(0.1875)
    std = math.sqrt(0.1875)
    adv = group_advantages(rewards, scale="batch", eps=0.0)
    assert adv[0].tolist() == pytest.approx([0.5 / std, -0.5 / std])
    assert adv[1].tolist() == pytest.approx([0.0, 0.0])


def test_zero_variance_groups_get_zero_not_nan():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    for scale in ("none", "group", "batch"):
        adv = group_advantages(rewards, scale=scale)
        assert torch.equal(adv, torch.zeros(2, 3)), scale
    single = group_advantages(torch.tensor([[1.0]]), scale="group")
    assert single.tolist() == [[0.0]]


def test_integer_rewards_are_accepted():
    adv = group_advantages(torch.tensor([[1, 0]]))
    assert adv.dtype == torch.float32
    assert adv.tolist() == [[0.5, -0.5]]


@pytest.mark.parametrize(
    ("rewards", "kwargs", "fragment"),
    [
        (torch.zeros(6), {}, "group_size"),
        (torch.zeros(6), {"group_size": 4}, "group_size"),
        (torch.zeros(2, 3), {"group_size": 4}, "group_size=4"),
        (torch.zeros(2, 3, 1), {}, "[N, G]"),
        (torch.tensor([[1.0, float("nan")]]), {}, "NaN"),
        (torch.zeros(2, 2), {"scale": "std"}, "unknown scale"),
    ],
)
def test_bad_inputs_raise_actionable_errors(rewards, kwargs, fragment):
    with pytest.raises(TgrlError) as info:
        group_advantages(rewards, **kwargs)
    assert fragment in str(info.value)
