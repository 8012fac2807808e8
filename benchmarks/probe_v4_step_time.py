"""Probe for table v4: seconds per optimizer update of the main arms at the v4 recipe's sizes, to size the
table's budget (no accuracy is measured). Needs the work directory of `probe_v4_warm_start.py` (its data,
experts and warm-started seed). Writes `results/reproduction_probes/v4_step_time.json`:

    .venv/bin/python benchmarks/probe_v4_step_time.py --work /tmp/v4-probe --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
RECIPE = REPO / "benchmarks" / "configs" / "repro-v4-tiny-cpu.yaml"
OUT = REPO / "benchmarks" / "results" / "reproduction_probes" / "v4_step_time.json"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--arms", nargs="*", default=["grpo", "tgrl", "sft"])
    args = p.parse_args()
    os.environ.setdefault("TGRL_PROGRESS", "0")
    import torch
    from reproduce import ARMS, data_paths, load_recipe, revision, run_stage

    torch.set_num_threads(1)
    recipe = load_recipe(RECIPE, quick=False)
    paths = data_paths(args.work)
    start = args.work / f"seed{args.seed}" / "warm_start" / "final"
    out: dict = {"recipe": RECIPE.name, "revision": revision(), "steps": args.steps, "arms": {}}
    for name in args.arms:
        run_dir = args.work / "step_time" / name
        t0 = time.perf_counter()
        run_stage(recipe, ARMS[name].stages[0], start, run_dir, args.seed, args.steps, paths)
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
        times = [r["perf/step_time_s"] for r in rows if "perf/step_time_s" in r]
        out["arms"][name] = {"step_time_s_median": statistics.median(times), "step_times_s": times,
                             "wall_s": round(time.perf_counter() - t0, 1)}  # fmt: skip
        print(name, out["arms"][name], flush=True)
    out["load"] = os.getloadavg()
    OUT.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
