"""`tgrl train`: run the training loop (sft, grpo or tgrl) from a recipe. Argument translation only
(`tgrl_lib.rl.trainer.train`)."""

from __future__ import annotations

import argparse

from tgrl_lib.commands import add_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a policy with TGRL, GRPO or SFT (checkpoints, resume, metrics.jsonl)",
        description=(
            "Train the recipe's `train.model` on a problems dataset; tgrl and sft also read expert "
            "trajectories (--experts). Checkpoints go to train.output_dir (or --out) every "
            "train.checkpoint_every steps; rerunning the same command resumes from the newest complete "
            "checkpoint (train.resume: auto), and a finished run says so and exits 0. The trained model "
            "ends up in OUT/final and per-step metrics in OUT/metrics.jsonl."
        ),
    )
    parser.add_argument(
        "--config",
        help="recipe YAML (its `train:` section) or a file of train keys (default: configs/tiny-cpu.yaml "
        "if present)",
    )
    add_overrides(parser, "--set lr=1e-4 or --set train.loss.clip=false")
    parser.add_argument("--problems", help="problems dataset directory (tgrl data synth / import)")
    parser.add_argument("--experts", help="expert trajectories dataset (tgrl generate / filter)")
    parser.add_argument("--out", help="output directory (overrides train.output_dir)")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from tgrl_lib.commands.eval import default_recipe
    from tgrl_lib.config import TrainConfig
    from tgrl_lib.errors import TgrlError
    from tgrl_lib.progress import progress_bar, step_printer
    from tgrl_lib.recipe import load_config
    from tgrl_lib.rl.trainer import train

    if not args.problems:
        raise TgrlError("tgrl train needs --problems DIR", hint="see tgrl train --help")
    flags = {"output_dir": args.out} if args.out else {}
    config = load_config(
        default_recipe(args.config), TrainConfig, args.overrides, section="train", flags=flags
    )
    show = step_printer(config.steps, lines=20)

    with progress_bar(f"train {config.algorithm}", config.steps) as advance:
        done = 0

        def on_step(step: int, metrics: dict[str, float]) -> None:
            nonlocal done
            advance(step - done)  # a resumed run starts past 0
            done = step
            show(step, metrics)

        result = train(config, problems_dir=args.problems, experts_dir=args.experts, on_step=on_step)
    print(f"tgrl train: {result.message}")
    return 0
