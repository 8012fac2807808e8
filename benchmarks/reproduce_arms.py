"""The arms of `benchmarks/reproduce.py`: what each trains, in stages, and the one switch it changes.

A recipe lists the arms it runs (`reproduce.arms`); every arm starts from the seed's shared start model and
gets the same number of optimizer updates. Table v3's arms keep their names and meaning (its results stay
comparable); the v4 arms add the matched SFT baseline, LUFFY with verified experts (v3's `luffy` also used
unfiltered experts, so two switches were confounded), a CHORD-style arm, the fact-level reward (beyond the
paper) and one probe arm per new lever.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Stage:
    """One `train` call: `share` of the arm's update budget with `algorithm` on `experts` (or none)."""

    algorithm: str  # sft | grpo | tgrl
    share: float  # fraction of reproduce.steps
    experts: str | None  # "filtered" (after the recipe's filters) | "raw" (oracle output, faults in) | None
    changes: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys on top of the recipe's train
    # sft only: "group" = problems_per_step x group_size experts per update (as many sequences as an RL
    # update), "matched" = problems_per_step x mixing.n_expert (as many as TGRL injects at most)
    batch: Literal["group", "matched"] = "group"


@dataclass(frozen=True)
class Arm:
    name: str
    title: str
    switches: str  # what differs from TGRL full, for the results file
    stages: tuple[Stage, ...] = ()


NO_WEIGHTS = {"weighting": {"kind": "none"}}
NO_FILTER = {"in_loop_filter": {"require_verified": False}}
CHORD = {"loss": {"expert_sft_coef": 0.5, "expert_sft_coef_end": 0.05, "expert_sft_decay": "cosine",
                  "expert_sft_token_weight": "p(1-p)"}}  # fmt: skip
VPPO = {"weighting": {"kind": "visual_dependency", "apply_to": "both", "normalise": "top_k", "top_k": 0.2}}
V3_ARMS = ["untrained", "sft", "grpo", "sft_grpo", "luffy", "tgrl", "tgrl_no_reweight", "tgrl_no_filter"]
ARMS = {
    a.name: a
    for a in (
        Arm("untrained", "start model", "no training: the start model evaluated as is"),
        Arm(
            "sft",
            "SFT on expert trajectories",
            "sft loss on the filtered expert trajectories, no rollouts, no token weights",
            (Stage("sft", 1.0, "filtered", NO_WEIGHTS),),
        ),
        Arm(
            "sft_matched",
            "SFT, matched to TGRL's expert count",
            "sft on problems_per_step x n_expert filtered experts per update (what TGRL injects at most)",
            (Stage("sft", 1.0, "filtered", NO_WEIGHTS, batch="matched"),),
        ),
        Arm(
            "grpo",
            "GRPO",
            "no expert trajectories (n_expert 0), no token weights",
            (Stage("grpo", 1.0, None, NO_WEIGHTS),),
        ),
        Arm(
            "sft_grpo",
            "SFT then GRPO",
            "first half of the budget as `sft`, second half as `grpo` from the SFT model",
            (Stage("sft", 0.5, "filtered", NO_WEIGHTS), Stage("grpo", 0.5, None, NO_WEIGHTS)),
        ),
        Arm(
            "luffy",
            "mixing + shaping only (LUFFY-style, v3)",
            "no token weights and no trajectory filtering (raw experts, in-loop verified check off)",
            (Stage("tgrl", 1.0, "raw", NO_WEIGHTS | NO_FILTER),),
        ),
        Arm(
            "luffy_verified",
            "LUFFY (verified experts)",
            "no token weights; raw experts with only the in-loop verified check (no offline filters)",
            (Stage("tgrl", 1.0, "raw", NO_WEIGHTS),),
        ),
        Arm(
            "chord",
            "CHORD-style",
            "no token weights; (1-mu) RL + mu SFT on the injected experts, mu 0.5 -> 0.05 (cosine), p(1-p)",
            (Stage("tgrl", 1.0, "filtered", NO_WEIGHTS | CHORD),),
        ),
        Arm(
            "tgrl",
            "TGRL full",
            "mixing + shaping + visual-dependency token weights + filtered experts",
            (Stage("tgrl", 1.0, "filtered"),),
        ),
        Arm(
            "tgrl_no_reweight",
            "TGRL without token reweighting",
            "weighting.kind none",
            (Stage("tgrl", 1.0, "filtered", NO_WEIGHTS),),
        ),
        Arm(
            "tgrl_no_filter",
            "TGRL without trajectory filtering",
            "raw experts (faults in, no offline filters), in-loop verified check off",
            (Stage("tgrl", 1.0, "raw", NO_FILTER),),
        ),
        Arm(
            "tgrl_fact_reward",
            "TGRL + fact reward (beyond the paper)",
            "reward + 0.5 x share of true stated facts (a grounding signal the paper does not use)",
            (Stage("tgrl", 1.0, "filtered", {"fact_reward": 0.5}),),
        ),
        Arm(
            "tgrl_vppo",
            "TGRL + VPPO top-20% mask (probe)",
            "visual-dependency weights on all tokens as a top-20% mask (VPPO) instead of rank weights",
            (Stage("tgrl", 1.0, "filtered", VPPO),),
        ),
        Arm(
            "tgrl_relift",
            "TGRL, experts only for all-wrong groups (probe)",
            "mixing.inject_rule all_wrong (ReLIFT)",
            (Stage("tgrl", 1.0, "filtered", {"mixing": {"inject_rule": "all_wrong"}}),),
        ),
        Arm(
            "tgrl_chord",
            "TGRL + CHORD mu (probe)",
            "TGRL full plus the CHORD expert SFT term (mu 0.5 -> 0.05, p(1-p))",
            (Stage("tgrl", 1.0, "filtered", CHORD),),
        ),
    )
}
