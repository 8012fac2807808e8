"""Group-relative advantages over a mixed group (on-policy rollouts + expert trajectories), and group stats.

Taken from GRPO (arXiv 2402.03300): the advantage of a response is its reward minus the mean reward of the
group of responses to the same prompt. Taken from LUFFY (arXiv 2504.14945): the group is the *mixed* group,
so an injected expert trajectory competes with the policy's own rollouts; with 7 failed rollouts and 1
correct expert the expert gets +0.875 and each rollout -0.125. LUFFY's released recipe does not divide by
the std, so `scale="none"` is the default here.

Our choices: the std is the population std (``correction=0``), which is defined for groups of one and does
not depend on a Bessel convention; `scale="batch"` divides the group-centred advantages by the std of all
rewards in the batch (as TRL's ``scale_rewards="batch"``). Division is by ``std + eps``, so a group whose
rewards are all equal gets advantage 0, never NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from tgrl_lib.errors import TgrlError


def _no_scale(rewards: Tensor, eps: float) -> Tensor:
    return torch.ones_like(rewards[:, :1])  # [N, 1]


def _group_std(rewards: Tensor, eps: float) -> Tensor:
    return rewards.std(dim=1, correction=0, keepdim=True) + eps  # [N, 1]


def _batch_std(rewards: Tensor, eps: float) -> Tensor:
    return (rewards.std(correction=0) + eps).expand(rewards.shape[0], 1)  # [N, 1]


# scale name -> the divisor of (reward - group mean), per group
ADVANTAGE_SCALES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "none": _no_scale,
    "group": _group_std,
    "batch": _batch_std,
}


def group_advantages(
    rewards: Tensor,
    *,
    group_size: int | None = None,
    scale: str = "none",
    eps: float = 1e-4,
) -> Tensor:
    """Per-response advantages ``(r - mean_group(r)) / divisor``, shape ``[N, G]``.

    `rewards` is ``[N, G]`` (N groups of G responses, one row per prompt) or flat ``[N*G]`` laid out group
    by group, in which case `group_size` is required. `scale` picks the divisor: ``"none"`` (1),
    ``"group"`` (std of the group + eps) or ``"batch"`` (std of all rewards + eps).

    >>> group_advantages(torch.tensor([[0.0] * 7 + [1.0]]))[0, -1].item()
    0.875
    """
    if scale not in ADVANTAGE_SCALES:
        raise TgrlError(f"advantages: unknown scale {scale!r}", hint=f"use one of {sorted(ADVANTAGE_SCALES)}")
    if rewards.dim() == 1:
        if group_size is None or group_size < 1 or rewards.numel() % group_size:
            raise TgrlError(
                f"advantages: flat rewards of length {rewards.numel()} need a group_size that divides it "
                f"(got {group_size})",
                hint="pass group_size=G or a [N, G] tensor",
            )
        rewards = rewards.view(-1, group_size)
    if rewards.dim() != 2:
        raise TgrlError(f"advantages: rewards must be [N, G] or [N*G], got shape {tuple(rewards.shape)}")
    if group_size is not None and rewards.shape[1] != group_size:
        raise TgrlError(f"advantages: groups of {rewards.shape[1]} rewards, but group_size={group_size}")
    rewards = rewards.float()
    if not torch.isfinite(rewards).all():
        raise TgrlError("advantages: rewards contain NaN or inf", hint="check the reward function's output")
    if rewards.numel() == 0:
        return rewards.clone()
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # [N, G]  r - mean_group(r)
    return centred / ADVANTAGE_SCALES[scale](rewards, eps)  # [N, G]
