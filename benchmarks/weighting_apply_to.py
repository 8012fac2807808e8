"""Which tokens should visual-dependency weights apply to? A short probe from the reproduction's warm start.

The first reproduction table (benchmarks/results/archive/reproduction-v1) showed the arms with
visual-dependency weights (`apply_to: both`) losing the answer format on 2 of 3 seeds. This script trains
TGRL for 40 updates from one of that recipe's warm starts with each weighting variant and prints the
on-policy format rate and accuracy per 10-step window (the trainer's own metrics), so the variants can be
compared in a few minutes. It uses that first recipe (kept beside its results), not the current one:

    V1=benchmarks/results/archive/reproduction-v1/repro-tiny-cpu.yaml
    .venv/bin/python benchmarks/reproduce.py --recipe $V1 --work /tmp/repro_work --results /tmp/repro_v1 \
        --arms untrained                                                         # data + warm starts
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/weighting_apply_to.py --work /tmp/repro_work \\
        --variant vd_both --seed 1

Results measured on this machine are in benchmarks/results/weighting_apply_to.md.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import yaml

from tgrl_lib.config import TrainConfig
from tgrl_lib.rl.trainer import train

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "benchmarks" / "results" / "archive" / "reproduction-v1" / "repro-tiny-cpu.yaml"
VARIANTS = {
    "vd_both": {"kind": "visual_dependency", "apply_to": "both"},
    "vd_expert": {"kind": "visual_dependency", "apply_to": "expert"},
    "vd_both_wmin09": {"kind": "visual_dependency", "apply_to": "both", "w_min": 0.9, "w_max": 1.5},
    "none": {"kind": "none"},
}


def main() -> None:
    raw = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=raw)
    parser.add_argument("--work", required=True, help="reproduce.py's work dir (data, experts, warm start)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), required=True)
    parser.add_argument("--seed", type=int, default=1, help="training seed (rollout sampling, data order)")
    parser.add_argument("--start", default="seed0/warm_start/final", help="start model, relative to --work")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--out", default="/tmp/weighting_apply_to")
    args = parser.parse_args()
    torch.set_num_threads(1)

    work = Path(args.work)
    base = yaml.safe_load(RECIPE.read_text())["train"]
    config = TrainConfig.model_validate(
        {
            **base,
            "weighting": VARIANTS[args.variant],
            "model": str(work / args.start),
            "output_dir": f"{args.out}/{args.variant}-{args.seed}",
            "seed": args.seed,
            "steps": args.steps,
            "lr": 2e-4,  # the reproduction's rate
            "checkpoint_every": 10_000,
        }
    )
    rows: list[tuple[float, float]] = []
    train(
        config,
        problems_dir=work / "data" / "train",
        experts_dir=work / "experts_filtered",
        on_step=lambda step, m: rows.append((m["reward/format"], m["reward/accuracy"])),
    )
    for lo in range(0, len(rows), 10):
        part = rows[lo : lo + 10]
        fmt, acc = statistics.mean(r[0] for r in part), statistics.mean(r[1] for r in part)
        window = f"steps {lo + 1}-{lo + len(part)}"
        print(f"{args.variant} seed {args.seed} {window}: format {fmt:.2f} acc {acc:.3f}")


if __name__ == "__main__":
    main()
