"""Problems in, scored groups out: the data cursor, prompts, rollouts and the verifiable reward.

A step takes `problems_per_step` problems from a `DataCursor` (every problem once per epoch, in an order
shuffled per epoch from the seed), renders the shared prompt (`tgrl_lib.data.prompts`), asks the generation
backend for G responses per problem and scores each with `tgrl_lib.scoring.rewards.reward`. The result is one
`Group` per problem whose `samples` later receive expert trajectories (`tgrl_lib.rl.mixing`).

Every random draw here is a pure function of (seed, epoch) or (seed, step): the cursor's order and the
sampling seed of each step. A resumed run therefore needs only the cursor's two integers to replay the
data order and rollouts of an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

from tgrl_lib.data.schema import Dataset, Problem
from tgrl_lib.errors import TgrlError


def derived_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed from `seed` and labels, e.g. `derived_seed(0, "rollout", step)` (stable across runs)."""
    text = "|".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


@dataclass
class DataCursor:
    """Position in an endless, epoch-shuffled stream of `n` problem indices."""

    n: int
    seed: int
    epoch: int = 0
    position: int = 0

    def __post_init__(self) -> None:
        if self.n < 1:
            raise TgrlError("the problems dataset is empty: nothing to train on")

    def order(self, epoch: int) -> list[int]:
        indices = list(range(self.n))
        random.Random(derived_seed(self.seed, "epoch", epoch)).shuffle(indices)
        return indices

    def take(self, k: int) -> list[int]:
        """The next `k` indices; an epoch boundary inside a step continues with the next epoch's order."""
        out: list[int] = []
        while len(out) < k:
            order = self.order(self.epoch)
            take = min(k - len(out), self.n - self.position)
            out += order[self.position : self.position + take]
            self.position += take
            if self.position == self.n:
                self.epoch, self.position = self.epoch + 1, 0
        return out

    def state_dict(self) -> dict[str, int]:
        return {"n": self.n, "seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if (state["n"], state["seed"]) != (self.n, self.seed):
            raise TgrlError(
                f"checkpoint data cursor is for {state['n']} problems (seed {state['seed']}), "
                f"but the run has {self.n} (seed {self.seed})",
                hint="resume with the same problems dataset and seed, or use a new output_dir",
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


@dataclass
class Sample:
    """One response in a group: an on-policy rollout or an injected expert trajectory."""

    text: str
    token_ids: tuple[int, ...] | None  # as generated; None for expert text (tokenised at collation)
    is_expert: bool = False
    source: str = "policy"
    reward: float = 0.0
    correct: bool = False
    formatted: bool = False
    truncated: bool = False  # hit max_new_tokens without closing the turn

    @property
    def response(self) -> str | tuple[int, ...]:
        """What `models.collate.collate_sequences` takes: the sampled ids, or the expert's text."""
        return self.token_ids if self.token_ids is not None else self.text


@dataclass
class Group:
    """A problem, its rendered prompt and image, and its responses (G of them after a rollout)."""

    problem: Problem
    prompt: str
    image: Any
    samples: list[Sample] = field(default_factory=list)

    @property
    def policy_samples(self) -> list[Sample]:
        return [s for s in self.samples if not s.is_expert]

    @property
    def accuracy(self) -> float:
        """On-policy accuracy (experts excluded); 0.0 for a group without rollouts."""
        own = self.policy_samples
        return sum(s.correct for s in own) / len(own) if own else 0.0


def make_groups(dataset: Dataset, problems: list[Problem], processor: Any) -> list[Group]:
    """One empty group per problem: the shared prompt and the problem's image (decoded, RGB)."""
    from tgrl_lib.data.images import load_image
    from tgrl_lib.data.prompts import render_prompt

    return [
        Group(p, render_prompt(processor, p.question, p.choices), load_image(dataset.image_path(p)))
        for p in problems
    ]


def rollout(
    backend: Any,
    groups: list[Group],
    *,
    samples: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    forbidden_ids: frozenset[int] = frozenset(),
) -> int:
    """Fill every group with `samples` on-policy responses; returns the number of generated tokens.

    A response whose ids contain one of `forbidden_ids` (image/video slots a backend failed to suppress)
    keeps only its text, which collation re-tokenises with special-token text split into plain bytes."""
    completions = backend.generate(
        [g.prompt for g in groups],
        [g.image for g in groups],
        samples=samples,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
    )
    generated = 0
    for group, row in zip(groups, completions, strict=True):
        for c in row:
            ids = tuple(c.token_ids) if c.token_ids else None
            if ids is not None and forbidden_ids.intersection(ids):
                ids = None
            group.samples.append(Sample(c.text, ids, truncated=c.finish_reason == "length"))
            generated += len(c.token_ids)
    return generated


def score(groups: list[Group], format_weight: float, fact_weight: float = 0.0) -> None:
    """Set reward / correct / formatted of every sample with the verifiable reward (plus the optional
    fact-level term, `scoring.rewards.fact_score`, when `fact_weight` > 0)."""
    from tgrl_lib.scoring.rewards import reward

    for group in groups:
        for sample in group.samples:
            result = reward(sample.text, group.problem, format_weight=format_weight, fact_weight=fact_weight)
            sample.reward, sample.correct, sample.formatted = result.reward, result.correct, result.formatted


def rollout_stats(groups: list[Group]) -> dict[str, float]:
    """reward/*, groups/* and response/* over the on-policy samples (experts excluded)."""
    own = [s for g in groups for s in g.policy_samples]
    if not own:
        return {}
    rewarded = [g for g in groups if g.policy_samples]
    lengths = [len(s.token_ids) if s.token_ids else 0 for s in own]
    return {
        "reward/mean": sum(s.reward for s in own) / len(own),
        "reward/accuracy": sum(s.correct for s in own) / len(own),
        "reward/format": sum(s.formatted for s in own) / len(own),
        "groups/all_correct": sum(all(s.correct for s in g.policy_samples) for g in rewarded) / len(rewarded),
        "groups/all_wrong": sum(not any(s.correct for s in g.policy_samples) for g in rewarded)
        / len(rewarded),
        "response/length_mean": sum(lengths) / len(lengths),
        "response/truncated_frac": sum(s.truncated for s in own) / len(own),
    }
