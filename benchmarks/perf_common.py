"""Shared pieces of the RL-step benchmarks (`perf_step.py`, `perf_weighting.py`, `perf_mfu.py`,
`profile_step.py`): one workload, one worker protocol, one report.

The workload is the tiny-cpu recipe's RL step on the tiny Qwen2.5-VL: 8 synthetic problems per step, G=8
responses each, 48 new tokens, one optimizer step per rollout batch (one epoch, one minibatch of 64, two
micro-batches of 32), fp32 on the CPU. Two things are changed so that two trainers do exactly the same work:

- every response is exactly `max_new_tokens` long: the benchmark's copy of the model has
  `min_new_tokens = max_new_tokens` in its generation config (end-of-turn and padding ids are masked until
  then), so neither side can finish a step early because its samples happened to stop sooner;
- the reward is the verifiable reward plus a deterministic per-response jitter in [0, 0.01) (a hash of the
  text), because the untrained tiny model never earns a reward and all-zero advantages would make every
  update a no-op. The same function scores both sides.

Each measured run is its own process (`spawn`), so peak RSS is per run and runs cannot warm each other's
caches. A run's step time is the median of the wall-clock intervals between consecutive step callbacks,
leaving out step 1 (warm-up: lazy imports, allocator growth) and the last step (our trainer checkpoints
there). Results are JSON files in `benchmarks/results/`; `write_report` renders all of them into
`benchmarks/results/perf.md`, so the markdown is always regenerated from the raw numbers.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PYTHON = sys.executable

# the tiny-cpu recipe's step (configs/tiny-cpu.yaml), fixed-length responses
WORKLOAD = {
    "problems_per_step": 8,
    "group_size": 8,
    "max_new_tokens": 48,
    "micro_batch_size": 32,
    "minibatch_size": 64,
    "lr": 1e-3,
    "temperature": 1.0,
    "format_reward": 0.1,
    "n_problems": 64,
}


# ------------------------------------------------------------------------------------------ machine
def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only",
    }


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("torch", "transformers", "accelerate", "trl"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


# ------------------------------------------------------------------------------------------ workload
def prepare_workdir(root: Path, max_new_tokens: int = WORKLOAD["max_new_tokens"]) -> dict[str, Path]:
    """Tiny model (seed 0), its fixed-length copy, synthetic problems and oracle expert trajectories."""
    from tgrl_lib.data.schema import Trajectory, load_dataset, write_dataset
    from tgrl_lib.data.synthetic import synthesize_splits
    from tgrl_lib.generation.oracle import oracle_response
    from tgrl_lib.models.tiny import build_tiny

    model = build_tiny(root / "model", seed=0)
    fixed = root / "model-fixed-length"
    shutil.copytree(model, fixed)
    config_path = fixed / "generation_config.json"
    generation = json.loads(config_path.read_text())
    generation["min_new_tokens"] = max_new_tokens  # end ids are masked until max_new_tokens
    config_path.write_text(json.dumps(generation, indent=2))
    synthesize_splits(root / "data", n_train=WORKLOAD["n_problems"], n_test=0, seed=0, difficulties=["easy"])
    problems = root / "data" / "train"
    records = load_dataset(problems, "problems").records
    experts = [Trajectory(problem_id=p.id, source="expert:oracle", text=oracle_response(p)) for p in records]
    write_dataset(root / "experts", "trajectories", experts)
    return {"model": fixed, "problems": problems, "experts": root / "experts"}


def jitter(text: str) -> float:
    """A deterministic value in [0, 0.01) from the text: breaks reward ties of the untrained model."""
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 2**32 * 0.01


def bench_reward(text: str, problem: Any, *, format_weight: float) -> Any:
    """The verifiable reward plus `jitter` (the same function scores our trainer and TRL's)."""
    from dataclasses import replace

    from tgrl_lib.scoring.rewards import reward

    result = reward(text, problem, format_weight=format_weight)
    return replace(result, reward=result.reward + jitter(text))


def install_bench_reward() -> None:
    """Make our trainer score with `bench_reward` (`rollout.score` looks `reward` up at call time)."""
    import tgrl_lib.scoring.rewards

    original = tgrl_lib.scoring.rewards.reward
    if getattr(original, "bench_reward", False):
        return

    def patched(text: str, problem: Any, *, format_weight: float = 0.1) -> Any:
        from dataclasses import replace

        result = original(text, problem, format_weight=format_weight)
        return replace(result, reward=result.reward + jitter(text))

    patched.bench_reward = True  # type: ignore[attr-defined]
    tgrl_lib.scoring.rewards.reward = patched


def ours_config(paths: dict[str, Path], output_dir: Path, steps: int, **overrides: Any) -> Any:
    from tgrl_lib.config import TrainConfig

    w = WORKLOAD
    values: dict[str, Any] = {
        "algorithm": "grpo",
        "model": str(paths["model"]),
        "output_dir": str(output_dir),
        "seed": 0,
        "steps": steps,
        "problems_per_step": w["problems_per_step"],
        "group_size": w["group_size"],
        "ppo_epochs": 1,
        "minibatch_size": w["minibatch_size"],
        "micro_batch_size": w["micro_batch_size"],
        "lr": w["lr"],
        "sampling": {
            "temperature": w["temperature"],
            "max_new_tokens": w["max_new_tokens"],
            "batch_size": 64,
        },
        "advantage_scale": "none",
        "format_reward": w["format_reward"],
        "loss": {"aggregation": "token_mean", "clip": True, "clip_low": 0.2, "clip_high": 0.28},
        "weighting": {"kind": "none"},
        "in_loop_filter": {"max_tokens": w["max_new_tokens"]},
        "backend": {"kind": "hf"},
        "checkpoint_every": 10**6,
        "keep_checkpoints": 1,
    }
    values.update(overrides)
    return TrainConfig(**values)


def run_ours(paths: dict[str, Path], steps: int, **overrides: Any) -> dict[str, Any]:
    """Train `steps` steps with our trainer in this process; step-callback times and per-step metrics."""
    from tgrl_lib.rl.trainer import train

    install_bench_reward()
    out = Path(tempfile.mkdtemp(prefix="perf_ours_"))
    config = ours_config(paths, out, steps, **overrides)
    stamps: list[float] = []
    metrics: list[dict[str, float]] = []

    def on_step(step: int, m: dict[str, float]) -> None:
        stamps.append(time.perf_counter())
        metrics.append(m)

    start = time.perf_counter()
    experts = paths["experts"] if config.algorithm == "tgrl" else None
    train(config, problems_dir=paths["problems"], experts_dir=experts, on_step=on_step)
    shutil.rmtree(out, ignore_errors=True)
    return {
        "intervals_s": intervals(start, stamps),
        "generated_tokens": [m.get("response/length_mean", 0.0) * _policy_rows(m, config) for m in metrics],
        "trained_tokens": [m.get("tokens/policy", 0.0) + m.get("tokens/expert", 0.0) for m in metrics],
        "grad_norm": [m.get("grad/norm", 0.0) for m in metrics],
        "rollout_s": [m["perf/rollout_time_s"] for m in metrics],
        "update_s": [m["perf/update_time_s"] for m in metrics],
        "step_time_s": [m["perf/step_time_s"] for m in metrics],
        "rollout_tokens_per_s": [m["perf/rollout_tokens_per_s"] for m in metrics],
        "tokens_per_s": [m["perf/tokens_per_s"] for m in metrics],
    }


def _policy_rows(m: dict[str, float], config: Any) -> float:
    return config.problems_per_step * config.group_size - m.get("expert/injected", 0.0)


def intervals(start: float, stamps: list[float]) -> list[float]:
    return [b - a for a, b in zip([start, *stamps], stamps, strict=False)]


def measured(values: list[float]) -> list[float]:
    """Leave out step 1 (warm-up) and the last step (final checkpoint)."""
    return values[1:-1] if len(values) > 2 else values


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ------------------------------------------------------------------------------------------ workers
def worker_main(run: Any) -> None:
    """`script --worker NAME --workdir W --steps N --threads T --out F [--set k=v ...]`: one measured run
    in this process; `run(name, paths, steps, overrides)` returns the result dict written to F."""
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--set", action="append", default=[], help="TrainConfig override as JSON k=v")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    root = Path(args.workdir)
    paths = {
        "model": root / "model-fixed-length",
        "problems": root / "data" / "train",
        "experts": root / "experts",
    }
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.set)}
    result = run(args.worker, paths, args.steps, overrides)
    result.update(worker=args.worker, threads=torch.get_num_threads(), peak_rss_mb=peak_rss_mb())
    Path(args.out).write_text(json.dumps(result))


def spawn(
    script: Path,
    name: str,
    workdir: Path,
    steps: int,
    threads: int,
    overrides: dict | None = None,
    code: Path | None = None,
) -> dict[str, Any]:
    """One worker run in a fresh process (OMP/MKL threads pinned to `threads`). `code`: a directory holding
    another `tgrl_lib` (e.g. `git archive COMMIT tgrl_lib | tar -x -C DIR`) that the worker imports
    instead of the checkout's, for before/after comparisons."""
    out = workdir / f"result-{name}-{time.monotonic_ns()}.json"
    cmd = [PYTHON, str(script), "--worker", name, "--workdir", str(workdir), "--steps", str(steps)]
    cmd += ["--threads", str(threads), "--out", str(out)]
    cmd += [f"--set={k}={json.dumps(v)}" for k, v in (overrides or {}).items()]
    env = os.environ | {
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TGRL_PROGRESS": "0",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "PYTHONPATH": str(code or REPO),
    }
    started = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result = json.loads(out.read_text())
    out.unlink()
    result["wall_s"] = time.perf_counter() - started
    if "intervals_s" in result:
        result["step_s"] = statistics.median(measured(result["intervals_s"]))
    return result


def interleaved(pairs: int, run_a: Any, run_b: Any, log: Any = print) -> list[tuple[dict, dict]]:
    """`pairs` runs of A and B alternating A B A B ...; the order flips every pair (AB, BA, AB, ...) so a
    load change between the two halves of a pair does not always favour the same side."""
    out = []
    for i in range(pairs):
        if i % 2 == 0:
            a = run_a()
            b = run_b()
        else:
            b = run_b()
            a = run_a()
        ratio = a["step_s"] / b["step_s"]
        log(f"pair {i + 1}/{pairs}: A {a['step_s']:.3f} s, B {b['step_s']:.3f} s, A/B {ratio:.3f}")
        out.append((a, b))
    return out


def command_line(script: str, argv: list[str]) -> str:
    return shlex.join([".venv/bin/python", script, *argv])


class Provenance:
    """Where, with what and how long a benchmark ran: made before the work, `fields` read after it."""

    def __init__(self, script: str, argv: list[str]) -> None:
        self.script, self.argv = script, argv
        self.load_start, self.started = load_average(), time.time()

    def fields(self, args: Any) -> dict[str, Any]:
        """The result keys every benchmark writes: command, machine, versions, load, duration, settings."""
        return {
            "command": command_line(self.script, self.argv),
            "machine": machine(),
            "versions": versions(),
            "load_average_start": self.load_start,
            "load_average_end": load_average(),
            "duration_s": time.time() - self.started,
            "settings": vars(args) | {"workload": WORKLOAD},
        }


def entry_point(main: Any, run_worker: Any = None) -> None:
    """A benchmark script's `__main__`: a `--worker` process runs one measured run, otherwise `main`."""
    if run_worker is not None and "--worker" in sys.argv:
        worker_main(run_worker)
    else:
        sys.exit(main(sys.argv[1:]))


def save_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"perf_{name}.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    from perf_report import write_report  # sibling module (benchmarks/ is the script's directory)

    write_report()
    return path
