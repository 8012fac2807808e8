"""Update statistics that stay on the device until the update ends, each with its own combining rule.

A loss returns its stats as detached 0-dim tensors wrapped in the rule that combines them over the
micro-batches of an update, so nothing calls `.item()` per micro-batch (a device sync each time):

- `StepSum`: adds up over the micro-batches of one optimizer step (a token count; `LossTerm`, a term of the
  loss), then is averaged over the update's optimizer steps.
- `TokenMean`: a mean over a set of tokens, kept as (sum, count) so micro-batches of different sizes
  combine exactly: the update's value is the sum of sums over the sum of counts (0.0 for no tokens; read
  it with its `tokens/*` count).

`StatsMeter.summary` turns everything into Python floats with one transfer at the end of the update.
The rule sits beside each stat where the loss builds it, never in its name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepSum:
    """A per-micro-batch contribution that adds up within an optimizer step."""

    value: Tensor  # [] detached


@dataclass(frozen=True)
class LossTerm(StepSum):
    """A step sum that is a term of the loss itself (loss/total, loss/policy, ...): under data parallelism
    it scales with the loss (`rl.distributed.GlobalTotals`), a token count does not."""


@dataclass(frozen=True)
class TokenMean:
    """A mean over tokens, as its sum and its count."""

    total: Tensor  # [] detached
    count: Tensor  # [] number of tokens behind `total`


Stat = StepSum | TokenMean


def token_mean(x: Tensor, mask: Tensor) -> TokenMean:
    """Mean of `x` over `mask` ([B, T] each), as a combinable `TokenMean`."""
    return TokenMean(torch.where(mask, x.detach().float(), 0.0).sum(), mask.sum().float())


def step_sum(x: Tensor) -> StepSum:
    return StepSum(x.detach().float())


def loss_term(x: Tensor) -> LossTerm:
    return LossTerm(x.detach().float())


def as_floats(stats: dict[str, Stat]) -> dict[str, float]:
    """The stats of one micro-batch as floats (tests, one-off calls); the update uses `StatsMeter`."""
    meter = StatsMeter()
    meter.add_micro(stats)
    meter.end_optimizer_step(None)
    return {k: v for k, v in meter.summary().items() if not k.startswith(("grad/", "update/"))}


class StatsMeter:
    """Combines micro-batch stats over an update: `StepSum`s summed per optimizer step and averaged over
    steps, `TokenMean`s pooled over all micro-batches, the gradient norm's mean and max over steps."""

    def __init__(self) -> None:
        self.step: dict[str, Tensor] = {}
        self.steps: list[dict[str, Tensor]] = []
        self.means: dict[str, tuple[Tensor, Tensor]] = {}
        self.grad_norms: list[Tensor] = []

    def add_micro(self, stats: dict[str, Stat]) -> None:
        for key, stat in stats.items():
            if isinstance(stat, StepSum):
                self.step[key] = self.step[key] + stat.value if key in self.step else stat.value
            else:
                total, count = self.means.get(key, (0.0, 0.0))
                self.means[key] = (stat.total + total, stat.count + count)  # [], []

    def end_optimizer_step(self, grad_norm: Tensor | float | None) -> None:
        self.steps.append(self.step)
        self.step = {}
        if grad_norm is not None:
            self.grad_norms.append(torch.as_tensor(grad_norm, dtype=torch.float32))

    def summary(self) -> dict[str, float]:
        """Everything as floats, through one device-to-host transfer."""
        n = len(self.steps)
        if not n:
            return {}
        names = list(dict.fromkeys(k for s in self.steps for k in s))
        values = [torch.stack([s[k] for s in self.steps if k in s]).sum() / n for k in names]
        values += [total / count.clamp(min=1) for total, count in self.means.values()]  # 0 for no tokens
        names += list(self.means)
        if self.grad_norms:
            norms = torch.stack([g.to(values[0].device if values else "cpu") for g in self.grad_norms])
            values += [norms.mean(), norms.max()]
            names += ["grad/norm", "grad/norm_max"]
        out: dict[str, float] = {}
        if values:
            device = values[0].device
            out = dict(zip(names, torch.stack([v.to(device) for v in values]).tolist(), strict=True))
        out["update/optimizer_steps"] = float(n)
        return out
