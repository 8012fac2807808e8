"""Training on 2 processes (torchrun, gloo on CPU, the tiny VLM): (a) the update on a fixed batch equals the
single-process update on the same global batch; (b) a 2-rank run SIGKILLed mid-way and resumed ends with
the weights of an uninterrupted 2-rank run; (c) logged metrics are the mean over ranks. Plus the pieces
(sharding, reduction, RNG states per rank) on one process."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from servers import free_port

from tgrl_lib.data.schema import Trajectory, load_dataset, write_dataset
from tgrl_lib.generation.oracle import oracle_response
from tgrl_lib.rl import distributed
from tgrl_lib.rl.checkpoint import complete_checkpoints

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("distributed_update_worker.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TGRL_PROGRESS": "0", "PYTHONPATH": str(REPO)}


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), *args]  # fmt: skip


def _run(command: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# ------------------------------------------------------------------------------------- one process
def test_shard_keeps_whole_items_and_covers_the_draw_once():
    drawn = list(range(7))
    shares = [distributed.shard(drawn, r, 3) for r in range(3)]
    assert shares == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(x for s in shares for x in s) == drawn


def test_one_process_is_the_identity():
    one = SimpleNamespace(num_processes=1, process_index=0)
    metrics = {"loss/total": 0.5, "reward/mean": 0.25}
    assert distributed.reduce_metrics(one, metrics) is metrics
    state = {"torch": torch.get_rng_state()}
    assert distributed.gather_rng_states(one, state) is state
    assert distributed.rank_seed(0, "rollout", 3, 0, 1) != distributed.rank_seed(0, "rollout", 3, 0, 2)
    assert distributed.rank_seed(0, "rollout", 3, 0, 2) != distributed.rank_seed(0, "rollout", 3, 1, 2)


def test_rank_rng_state_picks_the_ranks_own_and_reads_single_process_checkpoints():
    saved = {"world_size": 2, "ranks": [{"r": 0}, {"r": 1}]}
    assert distributed.rank_rng_state(saved, 1, 2) == {"r": 1}
    assert distributed.rank_rng_state(saved, 2, 3) is None  # more ranks now: the new one keeps its own
    assert distributed.rank_rng_state({"torch": 1}, 0, 1) == {"torch": 1}  # a 1-process checkpoint
    assert distributed.rank_rng_state({"torch": 1}, 1, 2) is None


def test_launched_world_size_is_refused_when_not_an_integer(monkeypatch):
    from tgrl_lib.errors import TgrlError

    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(TgrlError, match="WORLD_SIZE='two'"):
        distributed.launched_world_size()
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.launched_world_size() == 2


def test_fsdp_refuses_what_would_hang_and_accepts_the_rest():
    from tgrl_lib.config import TrainConfig
    from tgrl_lib.errors import TgrlError

    fsdp = SimpleNamespace(distributed_type="DistributedType.FSDP", num_processes=2)
    distributed.check_supported(fsdp, TrainConfig(backend={"kind": "vllm"}))  # positive control
    distributed.check_supported(fsdp, TrainConfig(algorithm="sft"))  # no rollouts at all
    distributed.check_supported(SimpleNamespace(distributed_type="DistributedType.MULTI_CPU"), TrainConfig())
    with pytest.raises(TgrlError, match=r"backend\.kind hf would hang"):
        distributed.check_supported(fsdp, TrainConfig(backend={"kind": "hf"}))
    with pytest.raises(TgrlError, match="min_logprob would hang"):
        distributed.check_supported(
            fsdp, TrainConfig(backend={"kind": "vllm"}, in_loop_filter={"min_logprob": -5.0})
        )
    assert distributed.whole_state(SimpleNamespace(distributed_type="NO"), None, None) == (None, None)


# ------------------------------------------------------------------------------------- (a) update
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_rank_update_equals_the_single_process_update_on_the_global_batch(tiny_model_dir, tmp_path):
    _run([sys.executable, str(WORKER), str(tiny_model_dir), str(tmp_path / "one")])
    _run(torchrun(2, str(WORKER), str(tiny_model_dir), str(tmp_path / "two")))
    _run(torchrun(2, str(WORKER), str(tiny_model_dir), str(tmp_path / "plain"), "--plain"))
    start = load_file(tmp_path / "one" / "start.safetensors")
    one, two, plain = (load_file(tmp_path / d / "weights.safetensors") for d in ("one", "two", "plain"))
    moved = max(float((one[k] - start[k]).abs().max()) for k in start)
    assert moved > 1e-3  # the update did something
    worst = max(float((one[k] - two[k]).abs().max()) for k in one)
    assert worst < 1e-5 * max(moved, 1.0), f"2-rank update differs by {worst} (update size {moved})"
    # negative control: per-rank token means averaged by DDP are not the global token mean
    assert max(float((one[k] - plain[k]).abs().max()) for k in one) > 100 * max(worst, 1e-7)
    m1, m2 = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert m2["loss/total"] == pytest.approx(m1["loss/total"], rel=1e-5, abs=1e-7)
    assert m2["grad/norm"] == pytest.approx(m1["grad/norm"], rel=1e-4)
    assert m2["tokens/response"] == pytest.approx(m1["tokens/response"] / 2)  # the mean over ranks


# ---------------------------------------------------------------------------- (b), (c) the trainer
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from tgrl_lib.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("dist_data")
    synthesize(root / "problems", n=8, seed=0, split="train", difficulties=["easy"])
    problems = load_dataset(root / "problems", "problems").records
    experts = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in problems]
    write_dataset(root / "experts", "trajectories", experts)
    return root / "problems", root / "experts"


def _train_command(tiny_model_dir: Path, data: tuple[Path, Path], tmp_path: Path, out: Path) -> list[str]:
    keys = {
        "algorithm": "tgrl", "model": str(tiny_model_dir), "steps": 4, "problems_per_step": 2,
        "group_size": 3, "ppo_epochs": 2, "minibatch_size": 4, "micro_batch_size": 2,
        "sampling": {"max_new_tokens": 10},
        "lr": 1e-2, "checkpoint_every": 1, "keep_checkpoints": 2,
        "in_loop_filter": {"max_tokens": 64, "min_logprob": -50.0},
    }  # fmt: skip
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump({"train": keys}))
    problems, experts = data
    return torchrun(2, "-m", "tgrl_lib.cli", "train", "--config", str(config), "--problems", str(problems),
                    "--experts", str(experts), "--out", str(out))  # fmt: skip


def _kill_launch(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and its ranks at once, by pid (the ranks run in sessions of their own)."""
    import psutil

    launch = psutil.Process(proc.pid)
    ranks = launch.children(recursive=True)
    for p in [launch, *ranks]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    psutil.wait_procs(ranks, timeout=30)


def _rows(path: Path) -> dict[int, dict]:
    rows = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        rows[row["step"]] = row  # a resumed run appends: the last row of a step counts
    return rows


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_two_rank_run_killed_and_resumed_matches_and_logs_the_mean_over_ranks(tiny_model_dir, data, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    _run(_train_command(tiny_model_dir, data, tmp_path, straight), timeout=600)

    # (c) every logged value is the mean of the ranks' own values, and the ranks did differ
    logged = _rows(straight / "metrics.jsonl")
    ranks = [_rows(straight / "ranks" / f"rank-{r}.jsonl") for r in (0, 1)]
    differ = 0
    for step in range(1, 5):
        for key, value in logged[step].items():
            if key in ("step", "time") or value is None:
                continue
            own = [r[step][key] for r in ranks if r[step].get(key) is not None]
            assert value == pytest.approx(sum(own) / len(own), rel=1e-9, abs=1e-12), (step, key)
            differ += len(own) == 2 and own[0] != own[1]
    assert differ > 0 and "reward/mean" in logged[1]

    # (b) SIGKILL the whole launch (torchrun and both ranks) after the first checkpoint, then resume
    command = _train_command(tiny_model_dir, data, tmp_path, killed)
    proc = subprocess.Popen(command, env=ENV, cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 500
    while not complete_checkpoints(killed) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # inside step 2 (or its save)
    _kill_launch(proc)
    before = [s for s, _ in complete_checkpoints(killed)]
    assert before and before[-1] < 4 and not (killed / "final").exists(), before

    resumed = _run(command, timeout=600)
    assert "trained steps" in resumed.stdout
    a, b = (
        load_file(straight / "final" / "model.safetensors"),
        load_file(killed / "final" / "model.safetensors"),
    )
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ after resume, e.g. {different[:3]}"
    rng = torch.load(killed / "step-000004" / "rng.pt", weights_only=True)
    assert rng["world_size"] == 2 and len(rng["ranks"]) == 2
