"""Overhead of visual-dependency token weighting: TGRL step time with `weighting.kind: visual_dependency`
against the same step with `weighting.kind: none`.

    .venv/bin/python benchmarks/perf_weighting.py                  # 2 processes x 12 step pairs, ~4-6 min
    .venv/bin/python benchmarks/perf_weighting.py --runs 2 --pairs 12 --threads 1

Workload: `perf_common` (tiny Qwen2.5-VL, 8 problems x G=8 with one expert trajectory injected per group,
48-token rollouts, one optimizer step per rollout batch), algorithm `tgrl`. The weighted step adds what
`update.prepare_batch` does for it: a no-grad forward over the batch with the real images (the on-policy
update needs no old-log-prob forward otherwise) and one with blanked images, then the normalisation.

The two settings differ only inside one function, so they are interleaved step by step in one process
(one `trainer.setup`, then `trainer.train_step` with the weighted and the unweighted config in turn:
W U, U W, W U, ...), which samples the load of a shared machine every couple of seconds for both sides
instead of every minute. Each step pair gives one overhead, weighted / unweighted - 1; the headline is the
median over all pairs of `--runs` fresh processes (one warm-up pair per process is left out).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
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
    spawn,
)

SCRIPT = Path(__file__).resolve()
KINDS = {"weighted": "visual_dependency", "unweighted": "none"}


def run_worker(name: str, paths: dict[str, Path], pairs: int, overrides: dict) -> dict[str, Any]:
    """`pairs` + 1 step pairs (the first is a warm-up) alternating the weighted and unweighted config."""
    from tgrl_lib.rl import trainer

    install_bench_reward()
    out = Path(tempfile.mkdtemp(prefix="perf_weighting_"))
    configs = {
        side: ours_config(
            paths, out, 2 * (pairs + 1), algorithm="tgrl", weighting={"kind": kind}, **overrides
        )
        for side, kind in KINDS.items()
    }
    run = trainer.setup(configs["weighted"], paths["problems"], paths["experts"], None)
    times: dict[str, list[float]] = {side: [] for side in KINDS}
    phases: dict[str, list[dict[str, float]]] = {side: [] for side in KINDS}
    step, orders = 0, []
    for i in range(pairs + 1):
        order = list(KINDS) if i % 2 == 0 else list(reversed(KINDS))
        orders.append(order[0])
        for side in order:
            step += 1
            run.config = configs[side]
            start = time.perf_counter()
            metrics = trainer.train_step(run, step)
            times[side].append(time.perf_counter() - start)
            phases[side].append({k: metrics[k] for k in ("perf/rollout_time_s", "perf/update_time_s")})
    shutil.rmtree(out, ignore_errors=True)
    return {"step_s": times, "phases": phases, "first_of_pair": orders}


def summarise(runs: list[dict]) -> dict[str, Any]:
    weighted = [t for r in runs for t in r["step_s"]["weighted"][1:]]  # the warm-up pair left out
    unweighted = [t for r in runs for t in r["step_s"]["unweighted"][1:]]
    overheads = [a / b - 1 for a, b in zip(weighted, unweighted, strict=True)]

    def phase(side: str, key: str) -> float:
        return statistics.median(p[key] for r in runs for p in r["phases"][side][1:])

    return {
        "pairs": len(overheads),
        "overhead_median": statistics.median(overheads),
        "overhead_min": min(overheads),
        "overhead_max": max(overheads),
        "overhead_of_medians": statistics.median(weighted) / statistics.median(unweighted) - 1,
        "weighted_step_s_median": statistics.median(weighted),
        "unweighted_step_s_median": statistics.median(unweighted),
        "weighted_update_s_median": phase("weighted", "perf/update_time_s"),
        "unweighted_update_s_median": phase("unweighted", "perf/update_time_s"),
        "weighted_rollout_s_median": phase("weighted", "perf/rollout_time_s"),
        "unweighted_rollout_s_median": phase("unweighted", "perf/rollout_time_s"),
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=2, help="fresh processes")
    parser.add_argument("--pairs", type=int, default=12, help="timed step pairs per process (+1 warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each run")
    parser.add_argument(
        "--label", default="weighting", help="result name: benchmarks/results/perf_LABEL.json"
    )
    parser.add_argument("--code", help="directory with the tgrl_lib to measure (default: this checkout)")
    args = parser.parse_args(argv)
    run = Provenance("benchmarks/perf_weighting.py", argv)
    code = Path(args.code).resolve() if args.code else None
    with tempfile.TemporaryDirectory(prefix="perf_weighting_") as tmp:
        workdir = Path(tmp)
        prepare_workdir(workdir)
        runs = []
        for i in range(args.runs):
            runs.append(spawn(SCRIPT, "pairs", workdir, args.pairs, args.threads, code=code))
            print(
                f"run {i + 1}/{args.runs}: {summarise(runs[-1:])['overhead_median']:+.1%} (median of pairs)"
            )
    result = {
        "benchmark": "weighting",
        **run.fields(args),
        "runs": runs,
        "summary": summarise(runs),
    }
    path = save_result(args.label, result)
    print(f"wrote {path}; weighting overhead median {100 * result['summary']['overhead_median']:+.1f}%")
    return 0


if __name__ == "__main__":
    entry_point(main, run_worker)
