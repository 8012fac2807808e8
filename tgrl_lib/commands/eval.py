"""`tgrl eval`: evaluate a model on one or more problem datasets. Argument translation only
(`tgrl_lib.evaluation.run.evaluate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from tgrl_lib.commands import add_overrides


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="evaluate a model on benchmarks (accuracy, pass@k, format, length, grounding)",
        description=(
            "Generate k responses per problem in batches (hf on CPU, vllm on GPU), score them with the "
            "training reward's own verifier and write OUT/results.json, OUT/report.md, PNG plots and "
            "per-problem scores. Metrics per benchmark and per task family: accuracy (avg@k), pass@k, "
            "format rate, mean response length and, where problems carry facts, the grounding score "
            "(true / stated visual facts). Greedy with k=1 by default."
        ),
    )
    parser.add_argument(
        "--model",
        required=True,
        help="model directory, file:// or s3:// URI, or a registered version: models:/NAME/VERSION or "
        "models:/NAME@ALIAS (downloaded from MLflow: --tracking-uri or $MLFLOW_TRACKING_URI)",
    )
    parser.add_argument(
        "--tracking-uri",
        help="MLflow for models:/ URIs; with it (or $MLFLOW_TRACKING_URI) the evaluation is logged as a run",
    )
    parser.add_argument("--experiment", default="tgrl-eval", help="MLflow experiment of the logged run")
    parser.add_argument(
        "--benchmark",
        action="append",
        required=True,
        metavar="NAME=DIR",
        help="a problems dataset to evaluate on, named NAME in the report (repeatable)",
    )
    parser.add_argument("--out", required=True, help="output directory for the report")
    parser.add_argument(
        "--config",
        help="recipe YAML (its `eval:` section) or a file of eval keys (default: configs/tiny-cpu.yaml if "
        "present, as `tgrl pipeline run`, so both evaluate alike)",
    )
    add_overrides(parser, "--set samples=8 --set sampling.temperature=0.7")
    parser.add_argument("--samples", type=int, help="k samples per problem (eval.samples)")
    parser.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy")
    parser.add_argument("--max-new-tokens", type=int, help="response budget in tokens")
    parser.add_argument("--batch-size", type=int, help="problems per generation batch")
    parser.add_argument("--backend", choices=("hf", "vllm"), help="generation backend (default hf)")
    parser.add_argument("--limit", type=int, help="evaluate only the first N problems of each benchmark")
    parser.set_defaults(func=_run)


DEFAULT_RECIPE = Path("configs/tiny-cpu.yaml")


def default_recipe(config: str | None) -> str | None:
    """`config`, else the tiny recipe when run from a checkout (the defaults `tgrl pipeline run` uses)."""
    return config if config is not None else str(DEFAULT_RECIPE) if DEFAULT_RECIPE.is_file() else None


def _run(args: argparse.Namespace) -> int:
    from tgrl_lib.config import EvalConfig
    from tgrl_lib.errors import TgrlError
    from tgrl_lib.evaluation.run import evaluate, flat_metrics, markdown_table
    from tgrl_lib.recipe import load_config

    benchmarks: dict[str, str] = {}
    for item in args.benchmark:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise TgrlError(
                f"--benchmark {item!r} must be NAME=DIR", hint="e.g. --benchmark synthetic=data/test"
            )
        if name in benchmarks:
            raise TgrlError(f"--benchmark name {name!r} given twice")
        benchmarks[name] = path
    flags = {
        "samples": args.samples,
        "sampling.temperature": args.temperature,
        "sampling.max_new_tokens": args.max_new_tokens,
        "sampling.batch_size": args.batch_size,
        "backend.kind": args.backend,
        "limit": args.limit,
    }
    flags = {k: v for k, v in flags.items() if v is not None}
    config = load_config(default_recipe(args.config), EvalConfig, args.overrides, section="eval", flags=flags)
    from tgrl_lib.env import read_env
    from tgrl_lib.mlops.model_uri import local_model

    model = local_model(args.model, tracking_uri=args.tracking_uri)
    uri = args.tracking_uri or read_env("MLFLOW_TRACKING_URI")
    if uri:  # logged like a pipeline's evaluate step: a child run under a parent of its own
        import logging
        import uuid

        # no system-metrics monitor and no MLflow INFO chatter: a failing eval stays a one-line error
        import mlflow  # noqa: F401  (its import sets its loggers to INFO: lower them after it)

        from tgrl_lib.config import TrackingConfig
        from tgrl_lib.mlops.tracking import Tracker

        logging.getLogger("mlflow").setLevel(logging.WARNING)
        cfg = TrackingConfig(tracking_uri=uri, system_metrics=False)
        tracker = Tracker(cfg, tracking_uri=uri, experiment=args.experiment)
        with tracker.step_run(uuid.uuid4().hex[:12], "eval", pipeline="tgrl-eval") as run:
            run.log_config(config, section="eval")
            run.log_params({"eval.model": args.model})
            results = evaluate(model, benchmarks, config, args.out)
            run.log_metrics(flat_metrics(results["benchmarks"]))
            run.log_artifacts(args.out, "eval")
    else:
        results = evaluate(model, benchmarks, config, args.out)
    print(markdown_table(results["benchmarks"]), end="")
    print(f"tgrl eval: report in {args.out}/report.md, results in {args.out}/results.json")
    return 0
