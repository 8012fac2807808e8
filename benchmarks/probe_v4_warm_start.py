"""Probe for table v4 (issue 14): does the v4 warm start reach the start gate, judged on a validation split?

Runs the v4 recipe's data preparation and one seed's warm start exactly as `benchmarks/reproduce.py` does
(same work-directory layout, so a later table run can reuse both), then evaluates the start model greedy on a
validation split drawn with another data seed (never the test splits: nothing is tuned on them), and
writes `results/reproduction_probes/v4_warm_start/seed<N>.json`:

    .venv/bin/python benchmarks/probe_v4_warm_start.py --seed 0 --work /tmp/v4-probe
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
RECIPE = REPO / "benchmarks" / "configs" / "repro-v4-tiny-cpu.yaml"
OUT = REPO / "benchmarks" / "results" / "reproduction_probes" / "v4_warm_start"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--n-val", type=int, default=256)
    p.add_argument("--warm-steps", type=int, default=None, help="Override the recipe's warm-start updates.")
    args = p.parse_args()
    os.environ.setdefault("TGRL_PROGRESS", "0")
    import torch
    from reproduce import load_recipe, prepare_data, revision, start_model

    from tgrl_lib.data.synthetic import synthesize_splits
    from tgrl_lib.evaluation.run import evaluate

    torch.set_num_threads(1)
    recipe = load_recipe(RECIPE, quick=False)
    if args.warm_steps:  # a longer warm start continues from the shorter one's checkpoints (resume: auto)
        recipe.repro.warm_start.steps = args.warm_steps
    t0 = time.perf_counter()
    paths = prepare_data(recipe, args.work)
    t_data = time.perf_counter() - t0
    d = recipe.pipeline.data
    val_root = args.work / "validation"
    if not (
        val_root / "test" / "manifest.json"
    ).exists():  # another data seed: new scenes, same question types
        synthesize_splits(
            val_root,
            1,
            args.n_val,
            d.seed + 1000,
            image_size=d.image_size,
            families=d.families,
            difficulties=d.difficulties,
            ood_color=recipe.repro.splits.ood_color,
        )
    info = start_model(recipe, args.work, args.seed, paths)
    t_warm = time.perf_counter() - t0 - t_data
    result = evaluate(
        Path(info["start"]),
        {"validation": val_root / "test"},
        recipe.pipeline.eval,
        args.work / f"seed{args.seed}" / "eval_validation",
    )["benchmarks"]["validation"]
    pools = {}
    for name in ("filtered", "warm_filtered"):
        rows = (paths[name] / "records.jsonl").read_text().splitlines()
        problems = {json.loads(r)["problem_id"] for r in rows if r}
        pools[name] = {"kept": len(rows), "problems": len(problems), "per_problem": len(rows) / len(problems)}
    payload = {
        "recipe": RECIPE.name,
        "seed": args.seed,
        "revision": revision(),
        "warm_start": recipe.repro.warm_start.model_dump(),
        "validation": {
            "n": args.n_val,
            "data_seed": d.seed + 1000,
            "overall": result["overall"],
            "families": {g: m["accuracy"] for g, m in result["groups"].items()},
        },
        "experts": pools,
        "seconds": {"data": round(t_data, 1), "warm_start": round(t_warm, 1)},
        "load": os.getloadavg(),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"seed{args.seed}-warm{recipe.repro.warm_start.steps}"
    (OUT / f"{name}.json").write_text(json.dumps(payload, indent=1) + "\n")
    print(json.dumps(payload["validation"]["overall"], indent=1), payload["experts"], payload["seconds"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
