"""`tgrl generate`: expert trajectories for a problems dataset (`tgrl_lib.generation.run`).

Argument translation only: flags override the recipe's `generate:` section (or a file holding only those
keys); the library does the rest.
"""

from __future__ import annotations

import argparse

from tgrl_lib.commands import add_overrides

# flag -> GenerateConfig field (dotted inside its sub-models)
FLAGS = {
    "expert": "backend.kind",
    "model": "model",
    "samples": "samples_per_problem",
    "temperature": "sampling.temperature",
    "max_new_tokens": "sampling.max_new_tokens",
    "base_url": "backend.openai.base_url",
    "fault_rate": "fault_rate",
    "batch_size": "sampling.batch_size",
    "concurrency": "backend.openai.concurrency",
    "seed": "seed",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate expert trajectories (oracle, hf, vllm or an OpenAI-compatible server)",
        description=(
            "K responses per problem from the chosen expert, each scored with the verifiable reward, written "
            "as a trajectories dataset whose manifest records the problems dataset (so `tgrl filter` finds "
            "it). Rerunning the same command after an interruption resumes: complete problems are skipped, "
            "nothing is duplicated. Unreadable problem rows go to --rejected (default: OUT.rejected). "
            "The openai expert reads its API key from the env var named by "
            "generate.backend.openai.api_key_env (default OPENAI_API_KEY) and never prints it."
        ),
    )
    parser.add_argument("--problems", required=True, help="problems dataset directory")
    parser.add_argument("--out", required=True, help="output trajectories dataset directory")
    parser.add_argument("--rejected", help="dataset for refused problem rows (default: OUT.rejected)")
    parser.add_argument("--config", help="recipe YAML (section `generate`) or a file with those keys")
    parser.add_argument(
        "--expert", choices=("oracle", "hf", "vllm", "openai"), help="backend (default: oracle)"
    )
    parser.add_argument("--model", help="model directory (hf, vllm) or served model name (openai)")
    parser.add_argument("--samples", type=int, help="K responses per problem")
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    parser.add_argument("--max-new-tokens", type=int, help="response budget in tokens")
    parser.add_argument("--base-url", help="OpenAI-compatible server root, e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--fault-rate", type=float, help="oracle: fraction of trajectories with a fault")
    parser.add_argument("--batch-size", type=int, help="problems per batch (written together)")
    parser.add_argument("--concurrency", type=int, help="openai: requests in flight")
    parser.add_argument("--seed", type=int, help="sampling seed")
    add_overrides(parser, "--set backend.openai.max_retries=8")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tgrl_lib.config import GenerateConfig
    from tgrl_lib.generation.run import generate_trajectories
    from tgrl_lib.recipe import load_config

    flags = {field: getattr(args, flag) for flag, field in FLAGS.items() if getattr(args, flag) is not None}
    config = load_config(args.config, GenerateConfig, args.overrides, section="generate", flags=flags)
    out = Path(args.out)
    rejected = Path(args.rejected) if args.rejected else out.with_name(out.name + ".rejected")
    report = generate_trajectories(args.problems, out, config, rejected_dir=rejected)
    faults = ", ".join(f"{k} {v}" for k, v in report.faults.items())
    print(
        f"tgrl generate: {report.trajectories} trajectories for {report.readable} problems "
        f"({report.skipped} already done, {report.generated} generated, {report.rejected} rejected -> "
        f"{rejected}); accuracy {report.accuracy:.3f}{'; faults: ' + faults if faults else ''}; "
        f"{report.seconds:.1f} s"
    )
    return 0
