"""The loop learns on the tiny VLM and an easy synthetic task (a few CPU minutes; `slow`).

- sft on oracle trajectories raises held-out greedy accuracy above the untrained model.
- From the untrained model every rollout scores 0, so GRPO has no signal at all: its advantages are 0 and
  its weights do not move. TGRL gets its signal from the injected experts: the policy's probability of
  the expert's tokens rises step after step.
- From a weak model that writes the format but answers the counting questions with the colour they ask
  about (never right), GRPO's own samples never earn the correctness reward, so it learns the format and
  nothing else; TGRL's own samples start earning it within a few dozen steps and their reward rises.

Measured on this machine (see the trainer issue's learning-curve note): from random weights TGRL raises
the expert likelihood but needs far more steps than SFT before its own samples earn reward, hence the
weak start for the on-policy comparison.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tgrl_lib.config import TrainConfig
from tgrl_lib.data.schema import Trajectory, load_dataset, write_dataset
from tgrl_lib.generation.oracle import oracle_response
from tgrl_lib.rl.trainer import train

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def task(tmp_path_factory) -> dict[str, Path]:
    """256 easy training problems with one oracle trajectory each, 64 held-out problems (unseen images)."""
    from tgrl_lib.data.synthetic import synthesize_splits

    root = tmp_path_factory.mktemp("learning")
    synthesize_splits(root, n_train=256, n_test=64, seed=0, difficulties=["easy"])
    problems = load_dataset(root / "train", "problems").records
    experts = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in problems]
    write_dataset(root / "experts", "trajectories", experts)
    return {"problems": root / "train", "test": root / "test", "experts": root / "experts"}


def held_out(model_dir: Path, test_dir: Path) -> dict[str, float]:
    """Greedy accuracy and format rate on the held-out problems."""
    from tgrl_lib.data.images import load_image
    from tgrl_lib.data.prompts import render_prompt
    from tgrl_lib.generation.hf import HFBackend
    from tgrl_lib.models.policy import load_policy
    from tgrl_lib.scoring.rewards import reward

    policy = load_policy(model_dir)
    dataset = load_dataset(test_dir, "problems")
    prompts = [render_prompt(policy.processor, p.question, p.choices) for p in dataset.records]
    images = [load_image(dataset.image_path(p)) for p in dataset.records]
    out = HFBackend(policy.model, policy.processor).generate(
        prompts, images, samples=1, temperature=0.0, max_new_tokens=48
    )
    scores = [reward(group[0].text, p) for p, group in zip(dataset.records, out, strict=True)]
    return {
        "accuracy": statistics.mean(s.correct for s in scores),
        "format": statistics.mean(s.formatted for s in scores),
    }


def _config(algorithm: str, model: Path, out: Path, **changes) -> TrainConfig:
    base = {
        "algorithm": algorithm, "model": str(model), "output_dir": str(out), "lr": 1e-3,
        "sampling": {"max_new_tokens": 48}, "weighting": {"kind": "none"}, "checkpoint_every": 1000,
    }  # fmt: skip
    return TrainConfig.model_validate({**base, **changes})


def _metrics(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["step"] > 0]


def test_sft_raises_held_out_accuracy_above_the_untrained_model(tiny_model_dir, task, tmp_path):
    before = held_out(tiny_model_dir, task["test"])
    config = _config("sft", tiny_model_dir, tmp_path / "sft", steps=150, problems_per_step=32)
    result = train(config, problems_dir=task["problems"], experts_dir=task["experts"])
    after = held_out(result.final_dir, task["test"])
    losses = [r["loss/sft"] for r in _metrics(tmp_path / "sft")]
    assert statistics.mean(losses[-10:]) < 0.5 * statistics.mean(losses[:10])
    assert after["format"] >= 0.5 > before["format"]
    assert after["accuracy"] >= before["accuracy"] + 0.1, (before, after)


def test_tgrl_learns_from_experts_where_grpo_has_no_signal(tiny_model_dir, task, tmp_path):
    common = {"steps": 25, "problems_per_step": 8, "group_size": 8, "loss": {"shaping_gamma": 0.01}}
    start = load_file(Path(tiny_model_dir) / "model.safetensors")

    grpo = train(_config("grpo", tiny_model_dir, tmp_path / "grpo", **common), problems_dir=task["problems"])
    rows = _metrics(tmp_path / "grpo")
    assert all(r["reward/mean"] == 0.0 and r["groups/all_wrong"] == 1.0 for r in rows)
    after_grpo = load_file(grpo.final_dir / "model.safetensors")
    assert all(torch.equal(start[k], after_grpo[k]) for k in start)  # advantages all 0: nothing to learn

    tgrl = train(
        _config("tgrl", tiny_model_dir, tmp_path / "tgrl", **common),
        problems_dir=task["problems"],
        experts_dir=task["experts"],
    )
    rows = _metrics(tmp_path / "tgrl")
    assert all(r["expert/injected"] == 8 for r in rows)  # every group was all wrong: one expert each
    assert all(r["expert/advantage_mean"] > 0.9 for r in rows)  # 1.1 - 1.1/8 for a lone correct expert
    p = [r["expert/prob_mean"] for r in rows]
    assert statistics.mean(p[-5:]) > 3 * statistics.mean(p[:5]), p
    after_tgrl = load_file(tgrl.final_dir / "model.safetensors")
    assert any(not torch.equal(start[k], after_tgrl[k]) for k in start)


@pytest.fixture(scope="module")
def weak_start(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Easy counting problems (integer answers 1-6) with one oracle trajectory each, and a weak model: the
    tiny model after 100 SFT updates on the same trajectories with the answer replaced by the colour the
    question asks about ("<think>I see 2 red circles. Red shapes: 2.</think><answer>red</answer>"). It
    writes the think-then-answer format about half the time at temperature 1 but never a right answer."""
    from tgrl_lib.data.synthetic import synthesize_splits

    root = tmp_path_factory.mktemp("weak_start")
    synthesize_splits(
        root, n_train=256, n_test=0, seed=0, difficulties=["easy"], families=["count_color_arith"]
    )
    problems = load_dataset(root / "train", "problems").records
    right = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in problems]
    wrong = [
        Trajectory(
            problem_id=t.problem_id,
            source="expert:wrong",
            text=re.sub(r"<answer>.*</answer>", f"<answer>{p.meta['task']['color']}</answer>", t.text),
        )
        for p, t in zip(problems, right, strict=True)
    ]
    write_dataset(root / "experts", "trajectories", right)
    write_dataset(root / "wrong", "trajectories", wrong)
    config = _config(
        "sft", tiny_model_dir, root / "sft", steps=100, problems_per_step=32,
        in_loop_filter={"require_verified": False},
    )  # fmt: skip
    with _torch_threads(1):
        model = train(config, problems_dir=root / "train", experts_dir=root / "wrong").final_dir
    return {"problems": root / "train", "experts": root / "experts", "model": model}


@contextlib.contextmanager
def _torch_threads(n: int):
    """Run with `n` intra-op threads (the same arithmetic whatever the machine's core count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _window(rows: list[dict], key: str, lo: int, hi: int) -> float:
    return statistics.mean(r[key] for r in rows[lo:hi])


def test_tgrl_earns_reward_from_a_weak_start_where_grpo_stays_at_zero(weak_start, tmp_path):
    # lr warm-up over the first 10 updates: without it TGRL's format collapsed in the first steps and did
    # not recover in 1 of 3 seeds (measured); with it 5 of 5 seeds averaged 0.17-0.24 on steps 31-40
    common = {"steps": 40, "problems_per_step": 8, "group_size": 8, "warmup_steps": 10}
    common["loss"] = {"shaping_gamma": 0.01}
    runs = {}
    with _torch_threads(1):
        for algorithm in ("grpo", "tgrl"):
            config = _config(algorithm, weak_start["model"], tmp_path / algorithm, **common)
            experts = weak_start["experts"] if algorithm == "tgrl" else None
            train(config, problems_dir=weak_start["problems"], experts_dir=experts)
            runs[algorithm] = _metrics(tmp_path / algorithm)
    grpo, tgrl = runs["grpo"], runs["tgrl"]
    curves = {a: [round(r["reward/accuracy"], 3) for r in rows] for a, rows in runs.items()}

    # GRPO: 40 steps x 64 samples and (almost) never a right answer, so no correctness signal; the format
    # bonus does vary within groups, and GRPO learns that (so the loop is not merely stuck)
    assert _window(grpo, "reward/accuracy", 0, 40) < 0.01, curves
    assert all(r["reward/mean"] <= 0.1 + 0.05 for r in grpo), curves  # the format bonus is all it earns
    assert _window(grpo, "reward/format", 30, 40) > _window(grpo, "reward/format", 0, 5) + 0.15

    # TGRL: the same weak start, one expert per all-wrong group; its own samples start answering right
    assert all(r["expert/injected"] >= 1 for r in tgrl)
    first, last = _window(tgrl, "reward/accuracy", 0, 5), _window(tgrl, "reward/accuracy", 30, 40)
    assert first < 0.05 and last > 0.1 and last > first + 0.1, curves
    assert _window(tgrl, "reward/mean", 30, 40) > _window(tgrl, "reward/mean", 0, 5) + 0.1, curves
    assert last > _window(grpo, "reward/accuracy", 30, 40) + 0.1, curves
