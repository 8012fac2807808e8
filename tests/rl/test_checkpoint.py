"""Checkpoints and resume: a run SIGKILLed mid-way and restarted ends with bit-identical weights; partial
checkpoints are never read; finished, changed or conflicting runs are refused or reported, never silently
re-run."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tgrl_lib.config import TrainConfig
from tgrl_lib.data.schema import Trajectory, load_dataset, write_dataset
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.oracle import oracle_response
from tgrl_lib.rl.checkpoint import COMPLETE, complete_checkpoints, rng_state, set_rng_state
from tgrl_lib.rl.trainer import train

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from tgrl_lib.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("ckpt_data")
    synthesize(root / "problems", n=6, seed=0, split="train", difficulties=["easy"])
    problems = load_dataset(root / "problems", "problems").records
    experts = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in problems]
    write_dataset(root / "experts", "trajectories", experts)
    return root / "problems", root / "experts"


def _train_keys(tiny_model_dir: Path, out: Path, steps: int) -> dict:
    """A small tgrl run that exercises every random draw: sampling, data order, minibatch shuffles
    (two epochs, several minibatches: old log-probs), expert rotation, visual-dependency weights."""
    return {
        "algorithm": "tgrl", "model": str(tiny_model_dir), "output_dir": str(out), "steps": steps,
        "problems_per_step": 2, "group_size": 3, "ppo_epochs": 2, "minibatch_size": 4,
        "micro_batch_size": 2, "sampling": {"max_new_tokens": 10}, "lr": 1e-2, "checkpoint_every": 1,
        "keep_checkpoints": 2, "in_loop_filter": {"max_tokens": 64, "min_logprob": -50.0},
    }  # fmt: skip


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(directory / "model.safetensors")


def _assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def test_rng_state_round_trips():
    state = rng_state()
    draws = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    set_rng_state(state)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == draws


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_sigkilled_cli_run_resumes_to_bit_identical_weights(tiny_model_dir, data, tmp_path):
    problems, experts = data
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": _train_keys(tiny_model_dir, tmp_path / "unused", 5)}))
    env = {**os.environ, "TGRL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "tgrl_lib.cli", "train", "--config", str(config),
                "--problems", str(problems), "--experts", str(experts), "--out", str(out)]  # fmt: skip

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(command(straight), env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]

    proc = subprocess.Popen(
        command(killed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO
    )
    deadline = time.monotonic() + 240
    while not complete_checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(random.Random(os.getpid()).uniform(0.0, 0.8))  # somewhere inside a later step or save
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL, "the run finished before it could be killed"
    steps_before = [s for s, _ in complete_checkpoints(killed)]
    assert steps_before and steps_before[-1] < 5 and not (killed / "final").exists()

    resumed = subprocess.run(command(killed), env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    _assert_bit_identical(straight / "final", killed / "final")
    assert [s for s, _ in complete_checkpoints(killed)] == [4, 5]  # keep_checkpoints=2

    again = subprocess.run(command(killed), env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert again.returncode == 0 and "already complete" in again.stdout


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_resume_ignores_partial_checkpoints_and_matches_an_uninterrupted_run(tiny_model_dir, data, tmp_path):
    problems, experts = data

    def run(out: Path, steps: int, **changes):
        config = TrainConfig(**{**_train_keys(tiny_model_dir, out, steps), **changes})
        return train(config, problems_dir=problems, experts_dir=experts)

    straight = run(tmp_path / "a", 3)
    out = tmp_path / "b"
    assert run(out, 2).steps_done == 2
    # a kill while saving step 3 leaves a tmp dir; one without its marker must not be read either
    shutil.copytree(out / "step-000002", out / "step-000003.tmp")
    (out / "step-000003.tmp" / "model.safetensors").write_bytes(b"torn")
    shutil.copytree(out / "step-000002", out / "step-000004")
    (out / "step-000004" / COMPLETE).unlink()

    second = run(out, 3)
    assert second.resumed_from == 2 and second.steps_done == 3
    _assert_bit_identical(straight.final_dir, second.final_dir)
    names = sorted(p.name for p in out.iterdir() if p.name.startswith("step-"))
    assert names == ["step-000002", "step-000003"]

    # finished: nothing is trained again, and it says so
    finished = run(out, 3)
    assert finished.metrics == {} and finished.steps_done == 3 and "already complete" in finished.message
    _assert_bit_identical(straight.final_dir, finished.final_dir)

    # a changed recipe, a shorter run and resume: never are refused with the reason
    with pytest.raises(TgrlError, match=r"lr: 0\.01 -> 0\.5"):
        run(out, 4, lr=0.5)
    with pytest.raises(TgrlError, match=r"beyond train\.steps=2"):
        run(out, 2)
    with pytest.raises(TgrlError, match="resume is 'never'"):
        run(out, 4, resume="never")


def test_only_complete_checkpoints_count_and_pruning_keeps_the_newest(tmp_path):
    from tgrl_lib.rl.checkpoint import latest_checkpoint, prune

    for step, complete in ((1, True), (2, True), (3, True), (4, False)):
        (tmp_path / f"step-{step:06d}").mkdir()
        if complete:
            (tmp_path / f"step-{step:06d}" / COMPLETE).write_text("done")
    (tmp_path / "step-000005.tmp").mkdir()
    (tmp_path / "final.tmp").mkdir()
    (tmp_path / "metrics.jsonl").write_text("")
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000003"
    prune(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step-000002", "step-000003"]
    assert latest_checkpoint(tmp_path / "missing") is None
