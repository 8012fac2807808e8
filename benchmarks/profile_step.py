"""Profile of the RL step's hot path: where a step's wall time goes, phase by phase, and the top torch ops.

    .venv/bin/python benchmarks/profile_step.py --label after        # TGRL + visual-dependency weights
    .venv/bin/python benchmarks/profile_step.py --label grpo --algorithm grpo --weighting none

Runs the `perf_common` workload in this process with `trainer.setup` / `trainer.train_step`: one warm-up
step, `--steps` timed steps and one more step under `torch.profiler`. The phase table comes from wrapping
the functions the step calls (inclusive wall time, nested: `prepare_batch/batched_logprobs` is inside
`prepare_batch`); the op table is torch's self CPU time per aten op. The result goes to
`benchmarks/results/perf_profile_LABEL.json`; the report shows every label side by side, so a fix is
recorded by profiling before it (`--label before`) and after it (`--label after`).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_common import (
    Provenance,
    entry_point,
    install_bench_reward,
    ours_config,
    prepare_workdir,
    save_result,
)

# (module, attribute) pairs wrapped by the phase timer; names as they appear in the table
PHASES = [
    ("tgrl_lib.rl.trainer", "make_groups"),
    ("tgrl_lib.rl.trainer", "rollout"),
    ("tgrl_lib.rl.trainer", "score"),
    ("tgrl_lib.rl.trainer", "add_experts"),
    ("tgrl_lib.rl.update", "build_batch"),
    ("tgrl_lib.rl.update", "prepare_batch"),
    ("tgrl_lib.rl.update", "policy_update"),
    ("tgrl_lib.rl.update", "batched_logprobs"),
    ("tgrl_lib.rl.update", "collate_sequences"),
    ("tgrl_lib.rl.update", "blank_images"),
    ("tgrl_lib.rl.update", "compute_token_weights"),
    ("tgrl_lib.rl.update", "response_logprobs"),
    ("tgrl_lib.generation.base", "sync_weights"),
    ("accelerate.Accelerator", "backward"),
    ("accelerate.Accelerator", "clip_grad_norm_"),
    ("accelerate.optimizer.AcceleratedOptimizer", "step"),
]


class PhaseTimer:
    """Inclusive wall time per call path (`outer/inner`), summed per step."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.current: dict[str, float] = defaultdict(float)
        self.steps: list[dict[str, float]] = []

    def wrap(self, owner: Any, name: str) -> None:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self.stack.append(name)
            path = "/".join(self.stack)
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.current[path] += time.perf_counter() - start
                self.stack.pop()

        setattr(owner, name, timed)

    def end_step(self, seconds: float) -> None:
        self.current["step"] = seconds
        self.steps.append(dict(self.current))
        self.current = defaultdict(float)


def _owner(path: str) -> Any:
    import importlib

    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(path)


def profile(paths: dict[str, Path], steps: int, overrides: dict) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from tgrl_lib.rl import trainer

    install_bench_reward()
    out = Path(tempfile.mkdtemp(prefix="profile_step_"))
    config = ours_config(paths, out, steps + 2, **overrides)
    experts = paths["experts"] if config.algorithm == "tgrl" else None
    run = trainer.setup(config, paths["problems"], experts, None)
    timer = PhaseTimer()
    for owner, name in PHASES:
        timer.wrap(_owner(owner), name)
    trainer.train_step(run, 1)  # warm-up
    timer.current.clear()
    for step in range(2, steps + 2):
        start = time.perf_counter()
        trainer.train_step(run, step)
        timer.end_step(time.perf_counter() - start)
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.train_step(run, steps + 2)
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total_us = sum(e.self_cpu_time_total for e in ops)
    top_ops = [
        {
            "op": e.key,
            "calls": e.count,
            "self_ms": e.self_cpu_time_total / 1e3,
            "share": e.self_cpu_time_total / total_us,
        }
        for e in ops[:15]
    ]
    shutil.rmtree(out, ignore_errors=True)
    keys = sorted({k for s in timer.steps for k in s})
    phases = {k: statistics.median(s.get(k, 0.0) for s in timer.steps) for k in keys}
    return {"phases_s": phases, "per_step": timer.steps, "top_ops": top_ops}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", default="current", help="result name: perf_profile_LABEL.json")
    parser.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads")
    parser.add_argument("--algorithm", default="tgrl", choices=["grpo", "tgrl"])
    parser.add_argument("--weighting", default="visual_dependency", choices=["none", "visual_dependency"])
    parser.add_argument("--note", default="", help="what this profile is of (e.g. the commit it ran on)")
    args = parser.parse_args(argv)
    import os

    import torch

    os.environ.setdefault("TGRL_PROGRESS", "0")
    torch.set_num_threads(args.threads)
    run = Provenance("benchmarks/profile_step.py", argv)
    overrides = {"algorithm": args.algorithm, "weighting": {"kind": args.weighting}}
    with tempfile.TemporaryDirectory(prefix="profile_step_") as tmp:
        paths = prepare_workdir(Path(tmp))
        result = profile(paths, args.steps, overrides)
    result |= {
        "benchmark": "profile",
        "label": args.label,
        "note": args.note,
        **run.fields(args),
    }
    path = save_result(f"profile_{args.label}", result)
    print(f"wrote {path}")
    for key, seconds in result["phases_s"].items():
        print(f"  {key:60s} {seconds * 1e3:8.1f} ms")
    return 0


if __name__ == "__main__":
    entry_point(main)
