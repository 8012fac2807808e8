"""Subcommands of `tgrl`, one module per step. Each module: `register(subparsers)`; stdlib-only imports at
top level; the work is done by one `tgrl_lib` entry point imported inside the handler."""

from __future__ import annotations

import argparse


def add_overrides(parser: argparse.ArgumentParser, example: str) -> None:
    """The repeatable `--set KEY=VALUE` option every recipe-driven command takes (into `args.overrides`)."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a recipe value, e.g. {example} (repeatable)",
    )
