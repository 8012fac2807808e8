"""The training loop (`rl/trainer.py`) end to end on the tiny VLM: a real `train` call logs namespaced
metrics, checkpoints and a loadable final model; a tgrl run without experts is refused."""

from __future__ import annotations

import json

import pytest

from tgrl_lib.config import TrainConfig
from tgrl_lib.data.schema import Trajectory
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.oracle import oracle_response
from tgrl_lib.models.policy import load_policy


def _datasets(tmp_path, n: int = 6):
    from tgrl_lib.data.schema import load_dataset, write_dataset
    from tgrl_lib.data.synthetic import synthesize

    synthesize(tmp_path / "problems", n=n, seed=0, split="train", difficulties=["easy"])
    problems = load_dataset(tmp_path / "problems", "problems").records
    experts = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in problems]
    experts.append(
        Trajectory(problem_id=problems[0].id, source="expert:bad", text="<answer>nonsense</answer>")
    )
    write_dataset(tmp_path / "experts", "trajectories", experts)
    return tmp_path / "problems", tmp_path / "experts"


def test_train_tgrl_two_steps_logs_namespaced_metrics(tiny_model_dir, tmp_path):
    from tgrl_lib.rl.trainer import train

    problems, experts = _datasets(tmp_path)
    config = TrainConfig(
        algorithm="tgrl", model=str(tiny_model_dir), output_dir=str(tmp_path / "out"), steps=2,
        problems_per_step=2, group_size=3, minibatch_size=3, micro_batch_size=2,
        sampling={"max_new_tokens": 12},
        in_loop_filter={"max_tokens": 64, "min_logprob": -50.0}, checkpoint_every=1, keep_checkpoints=1,
        loss={"kl_coef": 0.05, "entropy_coef": 0.001},
    )  # fmt: skip
    seen = []
    result = train(config, problems_dir=problems, experts_dir=experts, on_step=lambda s, m: seen.append(s))
    assert seen == [1, 2] and result.steps_done == 2 and result.resumed_from == 0
    assert (result.final_dir / "model.safetensors").is_file()
    assert load_policy(result.final_dir).model is not None
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and rows[0]["expert_pool/rejected_unverified"] == 1
    last = rows[-1]
    for key in ("reward/mean", "reward/accuracy", "reward/format", "groups/all_correct", "groups/all_wrong",
                "expert/injected", "expert/filtered", "response/length_mean", "grad/norm", "weights/mean",
                "loss/policy", "loss/expert", "policy/clipfrac", "expert/shaped_weight_mean",
                "perf/step_time_s", "perf/rollout_time_s", "perf/update_time_s", "perf/tokens_per_s",
                "perf/peak_rss_mb", "kl/mean", "policy/entropy", "optim/lr"):  # fmt: skip
        assert key in last, key
    assert last["expert/injected"] == 2  # both groups were all wrong: one expert each (minibatches: 2)
    assert last["update/optimizer_steps"] == 2  # 6 rows / minibatch 3
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["final", "metrics.jsonl", "step-000002"]


def test_train_refuses_tgrl_without_experts(tiny_model_dir, tmp_path):
    from tgrl_lib.rl.trainer import train

    config = TrainConfig(algorithm="tgrl", model=str(tiny_model_dir), output_dir=str(tmp_path / "o"))
    with pytest.raises(TgrlError, match="needs expert trajectories"):
        train(config, problems_dir=tmp_path)


def test_train_with_every_lever_on_wires_them_in(tiny_model_dir, tmp_path):
    """CHORD mu (decayed), ReLIFT all-wrong injection, VPPO top-k on policy tokens with a background-filled
    counterfactual, and the fact-level reward, through a real two-step run."""
    from tgrl_lib.rl.trainer import train

    problems, experts = _datasets(tmp_path)
    config = TrainConfig(
        algorithm="tgrl", model=str(tiny_model_dir), output_dir=str(tmp_path / "levers"), steps=2,
        problems_per_step=2, group_size=3, minibatch_size=6, micro_batch_size=2,
        sampling={"max_new_tokens": 12}, in_loop_filter={"max_tokens": 64}, checkpoint_every=2,
        loss={"expert_sft_coef": 0.5, "expert_sft_coef_end": 0.1, "expert_sft_decay": "linear",
              "expert_sft_token_weight": "p(1-p)"},
        mixing={"inject_rule": "all_wrong"},
        weighting={"kind": "visual_dependency", "apply_to": "policy", "normalise": "top_k", "top_k": 0.5,
                   "blank_fill": "background"},
        fact_reward=0.5,
    )  # fmt: skip
    train(config, problems_dir=problems, experts_dir=experts)
    rows = [json.loads(line) for line in (tmp_path / "levers" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[1], rows[2]
    assert first["expert/injected"] == 2 and last["expert/injected"] == 2  # untrained: every group all wrong
    assert first["expert/sft_coef"] == pytest.approx(0.5) and last["expert/sft_coef"] == pytest.approx(0.1)
    assert 0.0 < last["expert/sft_phi_mean"] <= 0.25 and last["loss/sft"] > 0.0
    assert last["weights/min"] in (0.0, 1.0) and last["weights/max"] == 1.0  # a 0/1 mask on policy tokens
