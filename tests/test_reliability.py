"""Crash safety of `tgrl train` at several kill points in one run (issue 8, item 1).

One tiny tgrl run is SIGKILLed three times, each time in a different phase, and each time the same command
is run again: (1) while a checkpoint is being written (`step-N.tmp` present), (2) in the middle of a
training step after a resume, (3) right after the last checkpoint, while `final/` is published or the
process exits. After every kill nothing partial is readable: every `step-N` with its `COMPLETE` marker
holds a loadable model and state, `final/` is absent or whole, and no `.tmp` directory is ever read. The
run that was killed three times ends with a `final/` byte-identical to an uninterrupted run's, and the
same per-step metrics (timings aside).

Counts for the issue's acceptance line are printed (`-s`) and recorded as junit properties.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from tgrl_lib.rl.checkpoint import COMPLETE, STATE, complete_checkpoints

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "TGRL_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
STEPS = 5
POLL_S = 0.001


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from tgrl_lib.data.schema import Trajectory, load_dataset, write_dataset
    from tgrl_lib.data.synthetic import synthesize
    from tgrl_lib.generation.oracle import oracle_response

    root = tmp_path_factory.mktemp("reliability")
    synthesize(root / "problems", n=6, seed=3, split="train", difficulties=["easy"])
    problems = load_dataset(root / "problems", "problems").records
    experts = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in problems]
    write_dataset(root / "experts", "trajectories", experts)
    return root / "problems", root / "experts"


def _config(tiny_model_dir: Path, path: Path) -> Path:
    """Every random draw is exercised: sampling, data order, two PPO epochs of shuffled minibatches,
    expert rotation, visual-dependency weights; a checkpoint after every step, two kept."""
    train = {
        "algorithm": "tgrl", "model": str(tiny_model_dir), "steps": STEPS, "problems_per_step": 2,
        "group_size": 3, "ppo_epochs": 2, "minibatch_size": 4, "micro_batch_size": 2,
        "sampling": {"max_new_tokens": 10},
        "lr": 1e-2, "checkpoint_every": 1, "keep_checkpoints": 2,
        "in_loop_filter": {"max_tokens": 64, "min_logprob": -50.0},
    }  # fmt: skip
    path.write_text(yaml.safe_dump({"train": train}))
    return path


def _command(config: Path, problems: Path, experts: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "tgrl_lib.cli", "train", "--config", str(config),
            "--problems", str(problems), "--experts", str(experts), "--out", str(out)]  # fmt: skip


def _kill_when(command: list[str], due, *, limit_s: float = 300.0) -> float:
    """Start `command`, SIGKILL it as soon as `due()` is true; returns seconds from start to the kill.
    Fails when the process ends on its own first (the kill point was never reached)."""
    process = subprocess.Popen(command, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    start = time.monotonic()
    try:
        while process.poll() is None and time.monotonic() - start < limit_s:
            if due():
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(POLL_S)
        code = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    err = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    assert code == -signal.SIGKILL, f"the run ended (exit {code}) before the kill point: {err[-1500:]}"
    return time.monotonic() - start


def _nothing_partial_is_readable(out: Path) -> list[int]:
    """Every directory a reader would take is whole; returns the complete checkpoint steps."""
    steps = []
    for step, path in complete_checkpoints(out):
        state = json.loads((path / STATE).read_text())
        assert state["step"] == step, path
        load_file(path / "model.safetensors")  # a torn file would not parse
        assert all((path / f"{name}.pt").stat().st_size > 0 for name in ("optimizer", "scheduler", "rng"))
        steps.append(step)
    for path in out.glob("step-*"):
        if not path.name.endswith(".tmp") and (path / COMPLETE).is_file():
            assert int(path.name.removeprefix("step-")) in steps
    if (out / "final").exists():
        load_file(out / "final" / "model.safetensors")
    return steps


def _metrics(out: Path) -> dict[int, dict[str, float]]:
    """The last logged value of every deterministic metric per step (a resumed run appends; timings and
    memory differ from run to run)."""
    rows: dict[int, dict[str, float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        step = row.pop("step")
        kept = {k: v for k, v in row.items() if k != "time" and not k.startswith("perf/")}
        rows.setdefault(step, {}).update(kept)
    return rows


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.mark.timeout(900)
def test_train_killed_at_three_points_resumes_to_a_byte_identical_model(
    tiny_model_dir, data, tmp_path, record_property
):
    problems, experts = data
    config = _config(tiny_model_dir, tmp_path / "train.yaml")
    straight, out = tmp_path / "straight", tmp_path / "killed"
    rng = random.Random(int(os.environ.get("TGRL_KILL_SEED", "8")))
    save_step = 2  # (1) the save interrupted: step-000001 is complete, step-000002.tmp is torn
    mid_delay = rng.uniform(0.05, 0.5)  # (2) how far into the step after a completed checkpoint
    survived: list[str] = []

    # (1) inside a checkpoint save: step-N.tmp exists, step-N does not yet
    tmp_dir, done_dir = out / f"step-{save_step:06d}.tmp", out / f"step-{save_step:06d}"
    _kill_when(_command(config, problems, experts, out), lambda: tmp_dir.exists() and not done_dir.exists())
    steps = _nothing_partial_is_readable(out)
    assert steps == [1] and tmp_dir.exists() and not (out / "final").exists()
    survived.append(f"checkpoint save of step {save_step}")

    # (2) mid-step after a resume: the first new checkpoint lands, then a random moment inside the next step
    target = save_step + 1
    seen: list[float] = []

    def mid_step() -> bool:
        if not seen and (out / f"step-{target:06d}" / COMPLETE).is_file():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= mid_delay

    _kill_when(_command(config, problems, experts, out), mid_step)
    steps = _nothing_partial_is_readable(out)
    assert steps and steps[-1] >= target and steps[-1] < STEPS and not (out / "final").exists()
    survived.append(f"{mid_delay:.2f}s into step {steps[-1] + 1}")

    # (3) the last checkpoint is complete: the run is publishing final/ or exiting
    last = out / f"step-{STEPS:06d}" / COMPLETE
    _kill_when(_command(config, problems, experts, out), last.is_file)
    steps = _nothing_partial_is_readable(out)
    assert steps[-1] == STEPS
    final = "present" if (out / "final").exists() else "absent"
    survived.append(f"after the last checkpoint (final/ {final})")

    resumed = subprocess.run(
        _command(config, problems, experts, out), env=ENV, cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "already complete" in resumed.stdout  # nothing is trained twice
    done = subprocess.run(
        _command(config, problems, experts, straight), env=ENV, cwd=REPO, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]

    assert _files(out / "final") == _files(straight / "final")  # weights, config and processor, byte for byte
    assert _metrics(out) == _metrics(straight)  # every step's loss, reward, ratio ... as uninterrupted
    assert _nothing_partial_is_readable(out) == [STEPS - 1, STEPS]
    assert not list(out.glob("*.tmp"))

    record_property("kill_points_survived", len(survived))
    record_property("records_lost", 0)
    print(f"\ntrain: {len(survived)} kill points survived: {'; '.join(survived)}")
