"""Update statistics (`rl/stats.py`) against hand-computed numbers: step sums add within an optimizer step and
average over steps, token means pool over micro-batches by their token counts, the rule travels with the
stat and not its name."""

from __future__ import annotations

import pytest
import torch

from tgrl_lib.rl.stats import StatsMeter, StepSum, TokenMean, as_floats, step_sum, token_mean


def test_token_mean_is_sum_and_count_over_the_mask():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[True, True, False], [True, False, False]])
    stat = token_mean(x, mask)
    assert (stat.total.item(), stat.count.item()) == (6.0, 3.0)
    assert as_floats({"m": stat}) == {"m": pytest.approx(2.0)}
    assert as_floats({"m": token_mean(x, torch.zeros_like(mask))}) == {"m": 0.0}  # no tokens: 0, not NaN


def test_meter_sums_within_a_step_averages_steps_and_pools_means():
    meter = StatsMeter()
    # optimizer step 1: two micro-batches; a loss that adds up and a mean over 1 and 3 tokens
    meter.add_micro(
        {
            "loss/total": step_sum(torch.tensor(0.5)),
            "p/ratio": TokenMean(torch.tensor(2.0), torch.tensor(1.0)),
        }
    )
    meter.add_micro(
        {
            "loss/total": step_sum(torch.tensor(0.25)),
            "p/ratio": TokenMean(torch.tensor(3.0), torch.tensor(3.0)),
        }
    )
    meter.end_optimizer_step(torch.tensor(4.0))
    # optimizer step 2: one micro-batch
    meter.add_micro(
        {
            "loss/total": step_sum(torch.tensor(1.25)),
            "p/ratio": TokenMean(torch.tensor(5.0), torch.tensor(4.0)),
        }
    )
    meter.end_optimizer_step(torch.tensor(2.0))
    out = meter.summary()
    assert out["loss/total"] == pytest.approx((0.75 + 1.25) / 2)  # per step summed, then averaged over steps
    assert out["p/ratio"] == pytest.approx((2 + 3 + 5) / (1 + 3 + 4))  # pooled, not a mean of means (1.4)
    assert (out["grad/norm"], out["grad/norm_max"], out["update/optimizer_steps"]) == (3.0, 4.0, 2.0)
    assert all(type(v) is float for v in out.values())


def test_the_rule_is_the_stats_type_not_its_name():
    """A summed stat named like a mean and a mean named like a sum combine by their types."""
    meter = StatsMeter()
    for value in (1.0, 3.0):
        summed, pooled = StepSum(torch.tensor(value)), TokenMean(torch.tensor(value), torch.tensor(1.0))
        meter.add_micro({"policy/looks_like_a_mean": summed, "loss/looks_like_a_sum": pooled})
    meter.end_optimizer_step(None)
    out = meter.summary()
    assert out["policy/looks_like_a_mean"] == 4.0 and out["loss/looks_like_a_sum"] == 2.0
    assert "grad/norm" not in out  # no gradient norm was given


def test_an_empty_meter_reports_nothing():
    assert StatsMeter().summary() == {}
