"""One-off pipeline runs on a Kubeflow Pipelines backend (`tgrl pipeline submit --host`), beside the
recurring ones of `tgrl_lib.mlops.scheduling`: the same compiled package (profile, images), the recipe's
YAML text as the `config` parameter (validated here first), extra `--param KEY=VALUE` pipeline
parameters, one experiment. `kfp` is imported lazily; the functions take a `kfp.Client`."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tgrl_lib.mlops.scheduling import ScheduleSpec, _compile_package, _config_text, ensure_experiment


def submit_run(client: Any, spec: ScheduleSpec, namespace: str | None = None) -> Any:
    """Start one run of `spec.pipeline` (named `spec.name`) now; returns KFP's `V2beta1Run`."""
    params = {"config": _config_text(spec.config_path), **dict(spec.params)}
    experiment_id = ensure_experiment(client, spec.experiment, namespace)
    with tempfile.TemporaryDirectory(prefix="tgrl-submit-") as tmp:
        package = _compile_package(spec, Path(tmp))
        return client.run_pipeline(
            experiment_id=experiment_id,
            job_name=spec.name,
            pipeline_package_path=str(package),
            params=params,
            service_account=spec.service_account,
        )
