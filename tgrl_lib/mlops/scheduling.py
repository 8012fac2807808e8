"""Recurring pipeline runs on a Kubeflow Pipelines backend (`tgrl schedule create|replace|list|delete`).

A schedule is a KFP v2 recurring run: a cron trigger in KFP's 6-field form (seconds first, as in
robfig/cron: `0 0 3 * * *` is 03:00:00 every day, in the controller's time zone, UTC by default), a
`max_concurrency`, catch-up off (`no_catchup=True`: after a pause only the latest missed run starts, not
a backfill), an experiment, and the pipeline package compiled on the fly from `pipelines/` with the
recipe's YAML text as the `config` parameter. Schedules are found by display name.

KFP has no update call for recurring runs, so `replace_schedule` swaps: it first creates the new
recurring run and only then deletes the old one(s) with the same name. This order never leaves the
pipeline unscheduled: if the create fails (bad package, API down) the old schedule keeps running and the
error is raised; if a delete fails after the create, both exist for a moment, the error names the id left
behind, and running `replace` again converges (it deletes every same-named schedule except the one it
just created). The cost of the order is a short overlap in which both could fire; with a daily cron and
`max_concurrency` that is at most one extra run.

`kfp` is imported lazily; the functions take a `kfp.Client` so tests can point one at a loopback server.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgrl_lib.errors import TgrlError

CRON_FIELDS = ("second", "minute", "hour", "day-of-month", "month", "day-of-week")
_PAGE_SIZE = 100


def validate_cron(expr: str) -> str:
    """Return `expr` (whitespace normalised) if it has KFP's 6 fields, else raise TgrlError.

    >>> validate_cron("0 0 3 * * *")
    '0 0 3 * * *'
    """
    fields = expr.split()
    if len(fields) != len(CRON_FIELDS):
        hint = ""
        if len(fields) == 5:
            hint = f"; a 5-field cron needs a seconds field first: '0 {' '.join(fields)}'"
        raise TgrlError(
            f"cron {expr!r} has {len(fields)} fields, KFP expects 6 ({' '.join(CRON_FIELDS)}){hint}"
        )
    return " ".join(fields)


@dataclass(frozen=True)
class ScheduleSpec:
    """Everything a recurring run is made of, independent of the backend."""

    name: str
    cron: str
    pipeline: str = "tgrl_pipeline"
    config_path: str | None = None
    experiment: str = "tgrl"
    max_concurrency: int = 1
    profile: str = "cpu"
    image: str | None = None
    cuda_image: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    description: str | None = None
    service_account: str | None = None
    enabled: bool = True


@contextmanager
def api_errors(host: str) -> Iterator[None]:
    """A KFP API that cannot be reached or refuses a call is one `TgrlError` naming the host, not the
    client's traceback (urllib3 retries, then the API client's exception)."""
    from kfp_server_api.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    try:
        yield
    except (HTTPError, ConnectionError, TimeoutError) as err:
        reason = getattr(err, "reason", None) or err
        raise TgrlError(
            f"KFP API {host} is not reachable: {str(reason).splitlines()[0][:300]}",
            hint="check --host (in the cluster e.g. http://ml-pipeline.kubeflow:8888) and that KFP runs",
        ) from None
    except ApiException as err:
        raise TgrlError(f"KFP API {host} refused the call: HTTP {err.status} {err.reason}") from None


def connect(host: str, namespace: str | None = None, token_path: str | None = None):
    """A `kfp.Client` for `host` (e.g. http://ml-pipeline.kubeflow:8888 in the cluster).

    With a projected service-account token (`token_path`, default `$KF_PIPELINES_SA_TOKEN_PATH`, as the
    Helm chart's schedule Job mounts it) every request carries it as a bearer token; the client does not
    do that by itself when `host` is given."""
    import warnings

    import kfp

    from tgrl_lib.env import read_env

    token_path = token_path or read_env("KF_PIPELINES_SA_TOKEN_PATH")
    credentials = None
    if token_path:
        if not Path(token_path).is_file():
            raise TgrlError("service-account token file not found", path=token_path)
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        credentials = ServiceAccountTokenVolumeCredentials(path=token_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return kfp.Client(host=host, namespace=namespace or "kubeflow", credentials=credentials)


def ensure_experiment(client, name: str, namespace: str | None = None) -> str:
    """The id of experiment `name`, created if absent."""
    experiment = client.create_experiment(name=name, namespace=namespace)
    return experiment.experiment_id


def find_schedules(client, name: str, namespace: str | None = None) -> list[Any]:
    """Every recurring run whose display name is exactly `name` (all pages, oldest first)."""
    name_filter = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(
            page_token=token, page_size=_PAGE_SIZE, namespace=namespace, filter=name_filter
        )
        found += [r for r in page.recurring_runs or [] if r.display_name == name]
        token = page.next_page_token or ""
        if not token:
            return sorted(found, key=lambda r: str(r.created_at or ""))


def _config_text(path: str | None) -> str:
    """The recipe's YAML text, validated first so a bad recipe fails here, not at 3 a.m."""
    if path is None:
        return ""
    from tgrl_lib.config import PipelineConfig
    from tgrl_lib.recipe import load_config

    load_config(path, PipelineConfig)
    return Path(path).read_text(encoding="utf-8")


def _compile_package(spec: ScheduleSpec, out_dir: Path) -> Path:
    from tgrl_lib.kfp_pipelines.compile import PIPELINES, compile_pipeline, make_placement

    if spec.pipeline not in PIPELINES:
        raise TgrlError(f"unknown pipeline {spec.pipeline!r}: choose one of {', '.join(PIPELINES)}")
    try:
        placement = make_placement(spec.profile, spec.image, spec.cuda_image)
    except ValueError as err:
        raise TgrlError(str(err)) from None
    return compile_pipeline(spec.pipeline, out_dir / f"{spec.pipeline}.yaml", placement)


def create_schedule(client, spec: ScheduleSpec, namespace: str | None = None) -> Any:
    """Create the recurring run described by `spec`; returns KFP's `V2beta1RecurringRun`."""
    cron = validate_cron(spec.cron)
    if spec.max_concurrency < 1:
        raise TgrlError(f"--max-concurrency must be at least 1, got {spec.max_concurrency}")
    params = {"config": _config_text(spec.config_path), **dict(spec.params)}
    experiment_id = ensure_experiment(client, spec.experiment, namespace)
    with tempfile.TemporaryDirectory(prefix="tgrl-schedule-") as tmp:
        package = _compile_package(spec, Path(tmp))
        return client.create_recurring_run(
            experiment_id=experiment_id,
            job_name=spec.name,
            description=spec.description or f"tgrl {spec.pipeline} on cron '{cron}'",
            cron_expression=cron,
            max_concurrency=spec.max_concurrency,
            no_catchup=True,
            params=params,
            pipeline_package_path=str(package),
            enabled=spec.enabled,
            service_account=spec.service_account,
        )


def replace_schedule(client, spec: ScheduleSpec, namespace: str | None = None) -> tuple[Any, list[str]]:
    """Create the new recurring run, then delete every older one named `spec.name` (see module doc).

    Returns `(new_recurring_run, deleted_ids)`.
    """
    old = find_schedules(client, spec.name, namespace)
    new = create_schedule(client, spec, namespace)
    deleted = []
    for run in old:
        if run.recurring_run_id == new.recurring_run_id:
            continue
        try:
            client.delete_recurring_run(run.recurring_run_id)
        except Exception as err:
            raise TgrlError(
                f"created schedule {new.recurring_run_id} but could not delete the old one "
                f"{run.recurring_run_id} ({err}); both are active now",
                hint="rerun `tgrl schedule replace` or `tgrl schedule delete --id ...`",
            ) from err
        deleted.append(run.recurring_run_id)
    return new, deleted


def list_schedules(client, name: str | None = None, namespace: str | None = None) -> list[dict[str, Any]]:
    """Recurring runs (all, or those named `name`) as plain dicts for printing."""
    if name is not None:
        runs = find_schedules(client, name, namespace)
    else:
        runs, token = [], ""
        while True:
            page = client.list_recurring_runs(page_token=token, page_size=_PAGE_SIZE, namespace=namespace)
            runs += page.recurring_runs or []
            token = page.next_page_token or ""
            if not token:
                break
    return [_summary(r) for r in runs]


def _summary(run: Any) -> dict[str, Any]:
    trigger = run.trigger
    cron = trigger.cron_schedule.cron if trigger is not None and trigger.cron_schedule is not None else None
    return {
        "id": run.recurring_run_id,
        "name": run.display_name,
        "cron": cron,
        "mode": run.mode,
        "max_concurrency": run.max_concurrency,
        "no_catchup": run.no_catchup,
        "experiment_id": run.experiment_id,
        "created_at": str(run.created_at) if run.created_at else None,
    }


def delete_schedules(
    client, name: str | None = None, recurring_run_id: str | None = None, namespace: str | None = None
) -> list[str]:
    """Delete the recurring run `recurring_run_id`, or every one named `name`; returns the deleted ids."""
    if (name is None) == (recurring_run_id is None):
        raise TgrlError("give exactly one of --name or --id")
    ids = (
        [recurring_run_id]
        if recurring_run_id
        else [r.recurring_run_id for r in find_schedules(client, name, namespace)]
    )
    if not ids:
        raise TgrlError(f"no schedule named {name!r}", hint="`tgrl schedule list` shows the existing ones")
    for run_id in ids:
        client.delete_recurring_run(run_id)
    return ids
