"""`tgrl schedule create|replace|list|delete`: recurring pipeline runs on a KFP backend.

Argument translation only; the work is in `tgrl_lib.mlops.scheduling`. Stdlib-only imports at top level.
"""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "schedule",
        help="Create, replace, list or delete recurring pipeline runs on Kubeflow Pipelines.",
        description="Recurring runs of a tgrl pipeline on a KFP backend. Cron has KFP's 6 fields "
        "(seconds first): '0 0 3 * * *' = 03:00:00 daily, UTC unless the controller sets a time zone. "
        "Catch-up is off. KFP has no update call: `replace` creates the new schedule, then deletes the old.",
    )
    sub = parser.add_subparsers(dest="schedule_command", metavar="ACTION", required=True)
    for action, text in (
        ("create", "Create a recurring run (one with the same name keeps running: use replace to swap)."),
        ("replace", "Create the new recurring run, then delete every older one with the same --name."),
    ):
        p = sub.add_parser(action, help=text, description=text)
        _connection(p)
        p.add_argument("--name", required=True, help="Display name of the recurring run (its identity).")
        p.add_argument("--cron", required=True, help="6-field cron, e.g. '0 0 3 * * *'.")
        p.add_argument(
            "--pipeline",
            default="tgrl_pipeline",
            choices=("tgrl_pipeline", "grpo_baseline_pipeline", "eval_pipeline"),
            help="Pipeline to schedule (compiled on the fly).",
        )
        p.add_argument("--config", help="Recipe YAML; its text becomes the pipeline's `config` parameter.")
        p.add_argument("--experiment", default="tgrl", help="KFP experiment (created if absent).")
        p.add_argument("--max-concurrency", type=int, default=1, help="Runs allowed at the same time.")
        p.add_argument("--profile", choices=("cpu", "gpu"), default="cpu", help="Compile profile.")
        p.add_argument("--image", help="CPU image reference (digest-pinnable: repo@sha256:...).")
        p.add_argument("--cuda-image", help="CUDA image reference for GPU steps.")
        p.add_argument(
            "--param",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="Extra pipeline parameter, e.g. base_model=s3://bucket/qwen (repeatable).",
        )
        p.add_argument("--service-account", help="Kubernetes service account of the runs.")
        p.add_argument("--disabled", action="store_true", help="Create the schedule paused.")
        p.set_defaults(func=_create_or_replace, replace=action == "replace")

    p = sub.add_parser("list", help="List recurring runs (all, or those with --name).")
    _connection(p)
    p.add_argument("--name", help="Only recurring runs with this display name.")
    p.set_defaults(func=_list)

    p = sub.add_parser("delete", help="Delete recurring runs by --name (all with that name) or by --id.")
    _connection(p)
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--name", help="Delete every recurring run with this display name.")
    group.add_argument("--id", dest="recurring_run_id", help="Delete this recurring run.")
    p.set_defaults(func=_delete)


def _connection(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline.kubeflow:8888.")
    p.add_argument("--namespace", help="Kubernetes namespace (multi-user KFP only).")


def _params(pairs: list[str]) -> tuple[tuple[str, str], ...]:
    from tgrl_lib.errors import TgrlError

    out = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TgrlError(f"--param expects KEY=VALUE, got {pair!r}")
        out.append((key, value))
    return tuple(out)


def _create_or_replace(args: argparse.Namespace) -> int:
    from tgrl_lib.mlops import scheduling

    spec = scheduling.ScheduleSpec(
        name=args.name,
        cron=args.cron,
        pipeline=args.pipeline,
        config_path=args.config,
        experiment=args.experiment,
        max_concurrency=args.max_concurrency,
        profile=args.profile,
        image=args.image,
        cuda_image=args.cuda_image,
        params=_params(args.param),
        service_account=args.service_account,
        enabled=not args.disabled,
    )
    scheduling.validate_cron(spec.cron)  # fail before connecting
    with scheduling.api_errors(args.host):
        client = scheduling.connect(args.host, args.namespace)
        if args.replace:
            new, deleted = scheduling.replace_schedule(client, spec, args.namespace)
        else:
            new, deleted = scheduling.create_schedule(client, spec, args.namespace), None
    print(f"created recurring run {new.recurring_run_id} ({spec.name!r}, cron '{spec.cron}')")
    if deleted is not None:
        print(f"deleted old: {', '.join(deleted) if deleted else 'none found'}")
    return 0


def _list(args: argparse.Namespace) -> int:
    from tgrl_lib.mlops import scheduling

    with scheduling.api_errors(args.host):
        client = scheduling.connect(args.host, args.namespace)
        rows = scheduling.list_schedules(client, args.name, args.namespace)
    for row in rows:
        print(json.dumps(row, default=str))
    return 0


def _delete(args: argparse.Namespace) -> int:
    from tgrl_lib.mlops import scheduling

    with scheduling.api_errors(args.host):
        client = scheduling.connect(args.host, args.namespace)
        ids = scheduling.delete_schedules(client, args.name, args.recurring_run_id, args.namespace)
    print(f"deleted recurring run(s): {', '.join(ids)}")
    return 0
