"""How step time and peak RSS grow with the work: G, response length and problems per step, ours and TRL's.

    .venv/bin/python benchmarks/perf_scaling.py                         # full sweeps: ~25-40 min
    .venv/bin/python benchmarks/perf_scaling.py --g 4 8 16 32 --length 32 48 96 --problems 4 8 16

Three one-factor sweeps around the `perf_common` workload (8 problems x G = 8 x 48 new tokens, fixed
length responses, fp32 CPU, one thread): G in `--g`, response length in `--length`, problems per step in
`--problems`, the other two factors at the workload's values. At each point our trainer and TRL's
`GRPOTrainer` run the same work (settings as in `perf_step.py`, one optimizer step per rollout batch,
micro-batches of min(32, rows)) in fresh processes, in the order ours, TRL, then TRL, ours at the next
point. A run's step time is the median step interval without the first (warm-up) and the last; its peak
RSS is the process's `ru_maxrss`. Ours also reports its rollout and update phases, TRL its `generate`.

"Bends away from linear": for each sweep and phase, the cost per unit of work (seconds per generated
token, per row) at each point over that at the sweep's smallest point; 1.0 all along is linear, a
rising value is super-linear growth. Results: `results/perf_scaling.json`, `results/perf_scaling.png`,
rendered into `perf.md`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from perf_common import WORKLOAD, Provenance, entry_point, prepare_workdir, run_ours, save_result, spawn

SCRIPT = Path(__file__).resolve()


def _apply(point: dict[str, int]) -> dict[str, Any]:
    """Set the workload of this worker process to `point`; the TrainConfig overrides that go with it."""
    rows = point["problems_per_step"] * point["group_size"]
    WORKLOAD.update(point, minibatch_size=rows, micro_batch_size=min(32, rows))
    return {"in_loop_filter": {"max_tokens": point["max_new_tokens"]}}


def run_worker(name: str, paths: dict[str, Path], steps: int, overrides: dict) -> dict[str, Any]:
    overrides = dict(overrides)
    point = overrides.pop("point")
    extra = _apply(point)
    if name == "ours":
        return run_ours(paths, steps, **extra, **overrides)
    from perf_step import run_trl

    generate: list[float] = []
    current = {"s": 0.0}

    def instrument(trainer: Any) -> None:
        inner = trainer._generate_single_turn

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                current["s"] += time.perf_counter() - start

        trainer._generate_single_turn = timed

    from transformers import TrainerCallback

    class Phase(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            generate.append(current["s"])
            current["s"] = 0.0

    out = run_trl(paths, steps, callbacks=[Phase()], instrument=instrument)
    return out | {"rollout_s": generate}


def sweep_points(args: Any) -> list[tuple[str, int, dict[str, int]]]:
    base = {k: WORKLOAD[k] for k in ("group_size", "max_new_tokens", "problems_per_step")}
    points = [("group_size", g, base | {"group_size": g}) for g in args.g]
    points += [("max_new_tokens", n, base | {"max_new_tokens": n}) for n in args.length]
    points += [("problems_per_step", p, base | {"problems_per_step": p}) for p in args.problems]
    return points


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--g", type=int, nargs="+", default=[4, 8, 16, 32], help="G values")
    parser.add_argument("--length", type=int, nargs="+", default=[32, 64, 128, 256], help="new tokens")
    parser.add_argument("--problems", type=int, nargs="+", default=[4, 8, 16, 32], help="problems per step")
    parser.add_argument("--steps", type=int, default=4, help="steps per run (first and last not timed)")
    parser.add_argument("--threads", type=int, default=1, help="torch/OpenMP threads of each run")
    parser.add_argument("--sides", nargs="+", default=["ours", "trl"], help="trainers to run")
    args = parser.parse_args(argv)
    provenance = Provenance("benchmarks/perf_scaling.py", argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="perf_scaling_") as tmp:
        workdirs: dict[int, Path] = {}
        for i, (factor, value, point) in enumerate(sweep_points(args)):
            n = point["max_new_tokens"]
            if n not in workdirs:  # the fixed-length model copy has min_new_tokens = n
                workdirs[n] = Path(tmp) / f"len{n}"
                prepare_workdir(workdirs[n], max_new_tokens=n)
            sides = args.sides if i % 2 == 0 else args.sides[::-1]
            for side in sides:
                r = spawn(SCRIPT, side, workdirs[n], args.steps, args.threads, overrides={"point": point})
                keep = ("step_s", "peak_rss_mb", "intervals_s", "rollout_s", "update_s", "wall_s")
                keep += ("generated_tokens", "trained_tokens")  # the equal-work check
                runs.append({"factor": factor, "value": value, "point": point, "side": side} | {
                    k: r[k] for k in keep if k in r
                })  # fmt: skip
                print(
                    f"{factor}={value} {side}: step {r['step_s']:.2f} s, {r['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
    result = provenance.fields(args) | {"benchmark": "scaling", "runs": runs, "summary": summarise(runs)}
    path = save_result("scaling", result)
    from perf_report_scaling import plot_scaling

    plot_scaling(result, path.with_suffix(".png"))
    print(path)
    return 0


def _median_phase(run: dict[str, Any], key: str) -> float | None:
    values = run.get(key)
    return statistics.median(values[1:-1] if len(values) > 2 else values) if values else None


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per factor and side: the points, step/phase seconds, peak RSS, and cost per token relative to the
    sweep's first point (1 = linear)."""
    out: dict[str, Any] = {}
    for factor in dict.fromkeys(r["factor"] for r in runs):
        for side in dict.fromkeys(r["side"] for r in runs):
            rows = sorted(
                (r for r in runs if r["factor"] == factor and r["side"] == side), key=lambda r: r["value"]
            )
            tokens = [
                r["point"]["group_size"] * r["point"]["problems_per_step"] * r["point"]["max_new_tokens"]
                for r in rows
            ]
            entry = {"values": [r["value"] for r in rows], "tokens": tokens}
            entry["step_s"] = [r["step_s"] for r in rows]
            entry["peak_rss_mb"] = [r["peak_rss_mb"] for r in rows]
            entry["rollout_s"] = [_median_phase(r, "rollout_s") for r in rows]
            entry["update_s"] = [_median_phase(r, "update_s") for r in rows]
            for key in ("step_s", "rollout_s", "update_s"):
                if all(v is not None for v in entry[key]) and entry[key]:
                    per = [v / t for v, t in zip(entry[key], tokens, strict=True)]
                    entry[f"{key}_per_token_rel"] = [p / per[0] for p in per]
            out[f"{factor}/{side}"] = entry
    return out


if __name__ == "__main__":
    entry_point(main, run_worker)
