"""`tgrl promote` (the promotion gate) and `tgrl register` (a checkpoint as a model version).

Exit codes: 0 when the gate ran, whether or not it promoted (read the printed decision, or `--json`);
2 on errors (unknown model or version, unreachable tracking server, bad metrics file, a margin that is not
a finite number, another promote holding the model's promotion lock for longer than the wait).
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    gate = subparsers.add_parser(
        "promote",
        help="move the `champion` alias to a model version if it beats the current champion",
        description=(
            "Compare a registered version's eval tags (eval.<benchmark>.<metric>) with the champion's and "
            "move alias `champion` only when the mean primary metric over shared benchmarks improves by "
            "more than --margin and no benchmark drops by more than --max-regression. The version's "
            "artifacts are verified first (listed, downloaded, sha256 checked). The decision and the alias "
            "move happen under a registry-side lock, so concurrent promotes serialise. The decision and "
            "evidence are recorded as version tags (promotion.*). Idempotent. With no champion the "
            "reference is the start model (--baseline-metrics); with neither, the first evaluated version "
            "wins. --floor sets a least mean on top. Exit 0 whether or not it promoted; 2 on errors."
        ),
    )
    gate.add_argument("--model", required=True, help="registered model name")
    gate.add_argument("--version", required=True, help="model version number to judge")
    gate.add_argument("--primary", default="accuracy", help="metric compared (default: accuracy)")
    # strings: the gate checks that they are finite numbers and says so in one line
    gate.add_argument("--margin", default="0", help="required improvement, a finite number (default: 0)")
    gate.add_argument(
        "--max-regression", default="0.05", help="largest allowed drop on any benchmark (default: 0.05)"
    )
    gate.add_argument(
        "--baseline-metrics",
        help="results.json of the start model's evaluation: the reference while there is no champion",
    )
    gate.add_argument("--floor", help="least mean primary metric a candidate may have (default: none)")
    gate.add_argument(
        "--listing-only",
        action="store_true",
        help="verify the version's artifact listing only, without downloading it to check sha256s",
    )
    gate.add_argument(
        "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db)"
    )
    gate.add_argument("--json", action="store_true", help="print the decision as JSON")
    gate.set_defaults(func=_promote)

    reg = subparsers.add_parser(
        "register",
        help="register a checkpoint directory as a new model version with its eval metrics",
        description="Log CHECKPOINT as a pyfunc model (loadable with mlflow.pyfunc.load_model), register "
        "it as a new version of --model tagged with eval.<benchmark>.<metric> from --metrics (an `tgrl eval` "
        "results.json or a flat {benchmark.metric: value} JSON), and point alias `candidate` at it.",
    )
    reg.add_argument("--checkpoint", required=True, help="checkpoint directory (safetensors weights)")
    reg.add_argument("--model", required=True, help="registered model name")
    reg.add_argument("--metrics", required=True, help="results.json written by `tgrl eval`")
    reg.add_argument("--run-id", help="MLflow run to attach the model to (default: a new `register` run)")
    reg.add_argument(
        "--tracking-uri", help="MLflow URI (default: $MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db)"
    )
    reg.set_defaults(func=_register)


def _promote(args: argparse.Namespace) -> int:
    import json

    from tgrl_lib.mlops.promotion import promote

    baseline = _read_metrics(args.baseline_metrics) if args.baseline_metrics else None
    decision = promote(
        args.model,
        args.version,
        primary=args.primary,
        margin=args.margin,
        max_regression=args.max_regression,
        tracking_uri=args.tracking_uri,
        checksums=not args.listing_only,
        baseline=baseline,
        floor=args.floor,
    )
    if args.json:
        print(json.dumps({**decision.__dict__}, indent=2, sort_keys=True))
    else:
        print(decision.render())
    return 0


def _read_metrics(file: str) -> dict:
    import json
    from pathlib import Path

    from tgrl_lib.errors import TgrlError

    path = Path(file)
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TgrlError(f"cannot read the metrics file ({err})", path=path) from None
    if not isinstance(metrics, dict):
        raise TgrlError("metrics file must hold a JSON object", path=path)
    return metrics


def _register(args: argparse.Namespace) -> int:
    from tgrl_lib.mlops.registry import register_checkpoint

    metrics = _read_metrics(args.metrics)
    version = register_checkpoint(
        args.checkpoint, args.model, args.run_id, metrics, tracking_uri=args.tracking_uri
    )
    uri = f"models:/{args.model}/{version.version}"
    print(f"registered {args.model} v{version.version} (alias candidate): {uri}")
    return 0
