"""`tgrl filter`: keep the trajectories that pass the configured filters; every refused row, with its reason,
goes to the rejected dataset. Argument translation only (`tgrl_lib.filters.run.run_filters`)."""

from __future__ import annotations

import argparse

from tgrl_lib.commands import add_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "filter",
        help="filter expert trajectories (verified, format, length, repetition, grounding, likelihood ...)",
        description=(
            "Apply the filters listed in --config (section `filter`, or a file with a top-level `filters:` "
            "list; default: configs/filters.yaml's list) in order; the first that rejects gives the reason. "
            "Kept trajectories go to --out with report.json/report.md/PNG plots; rejected rows (including "
            "unreadable ones, named by file and line) go to --rejected, so input = kept + rejected. "
            "Problems come from --problems, else from the `problems` path that `tgrl generate` records in "
            "the trajectories' manifest. Rerunning after an interruption recomputes the same output."
        ),
    )
    parser.add_argument("--in", dest="in_dir", help="trajectories dataset directory")
    parser.add_argument("--out", help="output directory for kept trajectories and the report")
    parser.add_argument("--rejected", help="output directory for rejected rows with reasons")
    parser.add_argument("--config", help="recipe or filter YAML (default: the built-in filter list)")
    parser.add_argument(
        "--problems",
        help="problems dataset (default: the one recorded in the trajectories' manifest)",
    )
    parser.add_argument("--policy", help="policy checkpoint for the length tokenizer and likelihood filters")
    add_overrides(parser, "--set batch_size=8")
    parser.add_argument("--list", action="store_true", help="list the available filters and their parameters")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from tgrl_lib.errors import TgrlError

    if args.list:
        from tgrl_lib.filters import describe_filters

        for item in describe_filters():
            params = ", ".join(f"{k}={json.dumps(v)}" for k, v in item["params"].items()) or "-"
            print(f"{item['name']:<16} {item['kind']:<6} {item['doc']}\n{'':<23} params: {params}")
        return 0
    given = {"--in": args.in_dir, "--out": args.out, "--rejected": args.rejected}
    missing = [flag for flag, value in given.items() if not value]
    if missing:
        raise TgrlError(f"tgrl filter needs {', '.join(missing)}", hint="see tgrl filter --help")

    from tgrl_lib.config import FilterConfig
    from tgrl_lib.filters.run import run_filters
    from tgrl_lib.recipe import load_config

    config = load_config(args.config, FilterConfig, args.overrides, section="filter")
    report = run_filters(args.in_dir, args.out, args.rejected, config, args.problems, policy=args.policy)
    print(
        f"tgrl filter: {report.input} in = {report.kept} kept + {report.rejected} rejected "
        f"({', '.join(f'{k} {v}' for k, v in report.by_stage.items()) or 'none'}); report in {args.out}"
    )
    return 0
