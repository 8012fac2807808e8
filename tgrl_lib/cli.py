"""The `tgrl` command: one subcommand per pipeline step, plus `pipeline` and `schedule`.

Each subcommand lives in `tgrl_lib/commands/<name>.py` with `register(subparsers)`; those modules import
only the standard library at top level, so `tgrl --help` starts fast. A `TgrlError` is printed on one
line (no traceback) and the exit code is 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from tgrl_lib.errors import TgrlError

COMMAND_MODULES = (
    "data",
    "model",
    "generate",
    "filter",
    "train",
    "eval",
    "promote",
    "serve",
    "pipeline",
    "schedule",
)


def _version() -> str:
    """The installed distribution's version (the checkout's own when run from source without install)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tgrl")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tgrl",
        description="Trajectory-Guided RL for vision-language models: data, expert trajectories, filtering, "
        "training, evaluation and promotion, locally or as Kubeflow pipelines.",
    )
    parser.add_argument("--version", action="version", version=f"tgrl {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"tgrl_lib.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name != f"tgrl_lib.commands.{name}":
                raise
            continue  # a step whose command is not installed in this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # tgrl draws its own progress bars; the hub's per-shard ones (weights load/save) are noise here.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        result = args.func(args)
    except TgrlError as err:
        from tgrl_lib.env import scrub

        text = " ".join(line.strip() for line in scrub(str(err)).splitlines() if line.strip())
        print(f"tgrl {args.command}: error: {text}", file=sys.stderr)  # one line, whatever the message
        return 2
    except KeyboardInterrupt:
        print(f"tgrl {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
