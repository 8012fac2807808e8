"""Shared pieces of the rl/ tests: the tiny policy and groups of rollouts with chosen rewards."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from tgrl_lib.data.prompts import render_prompt
from tgrl_lib.data.schema import Problem
from tgrl_lib.models.policy import load_policy
from tgrl_lib.rl.rollout import Group, Sample

PROBLEM = Problem(id="p0", image="images/p0.png", question="How many red shapes are there?", answer="2",
                  answer_type="integer", facts=None)  # fmt: skip


@pytest.fixture(scope="module")
def policy(tiny_model_dir):
    return load_policy(tiny_model_dir)


@pytest.fixture
def problem():
    return PROBLEM


@pytest.fixture
def make_groups():
    return groups_with_rewards


def groups_with_rewards(policy, rewards: list[list[float]], seed: int = 0) -> list[Group]:
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
