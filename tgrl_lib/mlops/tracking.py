"""MLflow tracking: one experiment per pipeline, a parent run per pipeline run, a child run per step.

Layout in MLflow (issue 5 item 2):

- experiment `tracking.experiment` (created on first use, with `tracking.artifact_location` if set);
- parent run, found by tags `tgrl.role=pipeline` + `tgrl.pipeline_run_id=<id>` or created, so each KFP
  component (its own process or container) attaches its step to the same parent;
- child run per step (`mlflow.parentRunId` = parent), tags `tgrl.step`, `tgrl.pipeline_run_id`,
  `tgrl.git_commit` (when known: `TGRL_GIT_COMMIT` or the source checkout), `tgrl.config_hash`,
  `tgrl.dataset_sha256`; params from the step's pydantic config, flattened, with secret-looking keys
  redacted (`env.redact`), secret env values scrubbed from every value (`env.scrub`), values cut at
  MLflow's 6000 characters, logged in batches of 100; metrics with step numbers (`MlflowLogger` streams
  the trainer's); reports and plots as artifacts; system metrics (CPU, memory, GPU when `pynvml` is
  present; needs `psutil`) when `tracking.system_metrics` is on.

Which server, and how a dead one fails fast: `tgrl_lib.mlops.tracking_uri`.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

from tgrl_lib.config import PipelineConfig, TrackingConfig, flatten
from tgrl_lib.env import read_env, redact, scrub
from tgrl_lib.errors import TgrlError
from tgrl_lib.mlops.tracking_uri import resolve_tracking_uri, use_tracking_uri

MAX_PARAM_VALUE = 6000  # mlflow.utils.validation.MAX_PARAM_VAL_LENGTH
MAX_KEY = 250
BATCH = 100
_RUN_ID_OK = re.compile(r"^[\w.:\-]{1,200}$")


# ----------------------------------------------------------------------------------- small pieces
def metric_key(name: str) -> str:
    """A name MLflow accepts for metrics, params and tags: `pass@4` -> `pass_at_4`, other characters
    outside `[/\\w.\\- :]` -> `_`, at most 250 characters."""
    return re.sub(r"[^/\w.\- :]", "_", str(name).replace("@", "_at_"))[:MAX_KEY]


@lru_cache(maxsize=1)
def git_commit() -> str | None:
    """`$TGRL_GIT_COMMIT` (set in images), else HEAD of the checkout tgrl_lib runs from, else None."""
    if commit := read_env("TGRL_GIT_COMMIT"):
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    commit = out.stdout.strip()
    return commit if out.returncode == 0 and re.fullmatch(r"[0-9a-f]{40}", commit) else None


def config_dict(config: Any) -> dict[str, Any]:
    return config.model_dump(mode="json") if hasattr(config, "model_dump") else dict(config)


def config_hash(config: Any) -> str:
    """sha256 of the config as canonical JSON: equal configs, equal hashes, and any changed value (a secret
    too) a different one. Only the digest leaves the process."""
    canonical = json.dumps(config_dict(config), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def clean_params(config: Any, section: str | None = None) -> dict[str, str]:
    """Flattened, redacted, scrubbed, truncated params: what `log_config` sends."""
    flat = flatten(redact(config_dict(config)), f"{section}." if section else "")
    params = {}
    for key, value in flat.items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        text = scrub(text)
        if len(text) > MAX_PARAM_VALUE:
            text = text[: MAX_PARAM_VALUE - 14] + "...[truncated]"
        params[metric_key(key)] = text
    return params


def numbers(report: Any, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of a report (dict or pydantic model), flattened with '/'; bools become 0/1."""
    if hasattr(report, "model_dump"):
        report = report.model_dump()
    out: dict[str, float] = {}
    if isinstance(report, dict):
        for key, value in report.items():
            out.update(numbers(value, f"{prefix}{key}/"))
    elif isinstance(report, bool | int | float) and prefix:
        out[prefix.rstrip("/")] = float(report)
    return out


def dataset_sha256(root: str | Path) -> str | None:
    """Identity of a dataset directory: sha256 of its manifest.json (which lists every file's sha256)."""
    manifest = Path(root) / "manifest.json"
    return hashlib.sha256(manifest.read_bytes()).hexdigest() if manifest.is_file() else None


@contextmanager
def mlflow_errors(what: str) -> Iterator[None]:
    """Turn MLflow/HTTP failures into a `TgrlError` that says what was being logged and where."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        raise TgrlError(f"MLflow: {what} failed: {scrub(str(err).splitlines()[0][:400])}") from err


# ----------------------------------------------------------------------------------------- runs
class RunHandle:
    """One MLflow run (a step's child run or the pipeline's parent) and what steps log to it."""

    def __init__(self, run_id: str, parent_run_id: str | None = None):
        from mlflow import MlflowClient

        self.run_id = run_id
        self.parent_run_id = parent_run_id
        self.client = MlflowClient()

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        cleaned = clean_params(params)
        items = [Param(k, v) for k, v in cleaned.items()]
        with mlflow_errors(f"logging {len(items)} params to run {self.run_id}"):
            for i in range(0, len(items), BATCH):
                self.client.log_batch(self.run_id, params=items[i : i + BATCH])

    def log_config(self, config: Any, section: str | None = None) -> None:
        """The config as params (flattened under `section.`) and its hash as `tgrl.config_hash`."""
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in clean_params(config, section).items()]
        with mlflow_errors(f"logging the config to run {self.run_id}"):
            for i in range(0, len(items), BATCH):
                self.client.log_batch(self.run_id, params=items[i : i + BATCH])
        self.set_tags({"tgrl.config_hash": config_hash(config)})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        items = [Metric(metric_key(k), float(v), stamp, int(step or 0)) for k, v in metrics.items()]
        with mlflow_errors(f"logging {len(items)} metrics to run {self.run_id}"):
            for i in range(0, len(items), 1000):
                self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: dict[str, Any], run_id: str | None = None) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(metric_key(k), scrub(str(v))[:8000]) for k, v in tags.items()]
        with mlflow_errors(f"tagging run {run_id or self.run_id}"):
            for i in range(0, len(items), BATCH):
                self.client.log_batch(run_id or self.run_id, tags=items[i : i + BATCH])

    def set_parent_tags(self, tags: dict[str, Any]) -> None:
        self.set_tags(tags, run_id=self.parent_run_id or self.run_id)

    def parent(self) -> RunHandle:
        """The pipeline's parent run (this run when it has none): what "compare" in the MLflow UI reads."""
        return RunHandle(self.parent_run_id or self.run_id)

    def describe_parent(self, name: str, params: dict[str, Any], tags: dict[str, Any] | None = None) -> None:
        """Name the parent run (e.g. `tiny-cpu-tgrl-<id>`), log key `params` to it (params a user compares
        pipeline runs by) and set `tags`."""
        parent = self.parent()
        parent.log_params(params)
        parent.set_tags(tags or {})
        with mlflow_errors(f"renaming run {parent.run_id}"):
            self.client.set_tag(parent.run_id, "mlflow.runName", scrub(name)[:250])

    def sibling_run_id(self, step: str) -> str | None:
        """The newest finished run of `step` under the same parent (the train run of this pipeline run)."""
        if self.parent_run_id is None:
            return None
        with mlflow_errors(f"finding the {step!r} run of parent {self.parent_run_id}"):
            exp_id = self.client.get_run(self.run_id).info.experiment_id
            query = (
                f"tags.`mlflow.parentRunId` = '{self.parent_run_id}' and tags.`tgrl.step` = '{step}' "
                "and attributes.status = 'FINISHED'"
            )
            runs = self.client.search_runs(
                [exp_id], query, order_by=["attributes.start_time DESC"], max_results=1
            )
        return runs[0].info.run_id if runs else None

    def log_dataset_tags(self, datasets: dict[str, str | Path]) -> None:
        """`tgrl.dataset.<name>.sha256` per dataset directory and one `tgrl.dataset_sha256` over all."""
        shas = {name: sha for name, root in datasets.items() if (sha := dataset_sha256(root))}
        if not shas:
            return
        combined = next(iter(shas.values())) if len(shas) == 1 else hashlib.sha256(
            "\n".join(f"{k}:{v}" for k, v in sorted(shas.items())).encode()
        ).hexdigest()  # fmt: skip
        self.set_tags(
            {**{f"tgrl.dataset.{k}.sha256": v for k, v in shas.items()}, "tgrl.dataset_sha256": combined}
        )

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        with mlflow_errors(f"uploading {path.name} to run {self.run_id}"):
            if path.is_dir():
                sub = f"{artifact_path}/{path.name}" if artifact_path else path.name
                self.client.log_artifacts(self.run_id, str(path), sub)
            else:
                self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, paths: str | Path | list[str | Path], artifact_path: str | None = None) -> None:
        """A directory's content, or each file/directory of a list, under `artifact_path`."""
        if isinstance(paths, str | Path):
            with mlflow_errors(f"uploading {paths} to run {self.run_id}"):
                self.client.log_artifacts(self.run_id, str(paths), artifact_path)
            return
        for path in paths:
            if Path(path).exists():
                self.log_artifact(path, artifact_path)

    def metrics_logger(self) -> MlflowLogger:
        return MlflowLogger(self)


class MlflowLogger:
    """`metrics_log.MetricsLogger` that streams to an MLflow run (a `RunHandle` or a `Tracker`)."""

    def __init__(self, target: RunHandle | Tracker):
        self.target = target

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.target.log_metrics(metrics, step)

    def close(self) -> None:
        """Nothing buffered: every `log` is sent at once."""


class Tracker:
    """Runs of one pipeline in one experiment. `step_run` is what steps use; `start_pipeline_run` opens
    (or finds) the parent explicitly."""

    def __init__(
        self,
        cfg: TrackingConfig | PipelineConfig | None = None,
        *,
        tracking_uri: str | None = None,
        experiment: str | None = None,
        work_dir: str | Path | None = None,
    ):
        tracking = cfg.tracking if isinstance(cfg, PipelineConfig) else (cfg or TrackingConfig())
        self.cfg = tracking
        self.tracking_uri = use_tracking_uri(tracking_uri or resolve_tracking_uri(cfg, work_dir))
        self.experiment = experiment or tracking.experiment
        self.artifact_location = tracking.artifact_location
        if self.artifact_location is None and self.tracking_uri.startswith("sqlite:///"):
            self.artifact_location = (Path(self.tracking_uri[10:]).parent / "mlartifacts").resolve().as_uri()
        self._stack: list[RunHandle] = []
        self._parents: dict[str, RunHandle] = {}

    def experiment_id(self) -> str:
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        client = MlflowClient()
        with mlflow_errors(f"opening experiment {self.experiment!r}"):
            found = client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    return client.create_experiment(self.experiment, artifact_location=self.artifact_location)
                except MlflowException as err:
                    if "already exists" not in str(err).lower():  # another step created it meanwhile
                        raise
                    found = client.get_experiment_by_name(self.experiment)
        if found is None or found.lifecycle_stage == "deleted":
            raise TgrlError(
                f"MLflow experiment {self.experiment!r} is deleted",
                hint="restore it (`mlflow experiments restore`) or set tracking.experiment to another name",
            )
        return found.experiment_id

    def start_pipeline_run(
        self,
        pipeline_run_id: str | None = None,
        *,
        run_name: str | None = None,
        tags: dict[str, Any] | None = None,
    ) -> RunHandle:
        """The parent run of `pipeline_run_id` (found by tag, else created; a new id when None)."""
        from mlflow import MlflowClient

        pipeline_run_id = pipeline_run_id or uuid.uuid4().hex
        if not _RUN_ID_OK.match(pipeline_run_id):
            raise TgrlError(f"pipeline run id {pipeline_run_id!r} may hold only letters, digits and . _ : -")
        if pipeline_run_id in self._parents:
            return self._parents[pipeline_run_id]
        client, exp_id = MlflowClient(), self.experiment_id()
        query = f"tags.`tgrl.role` = 'pipeline' and tags.`tgrl.pipeline_run_id` = '{pipeline_run_id}'"

        def find() -> list[Any]:
            return client.search_runs([exp_id], query, order_by=["attributes.start_time ASC"], max_results=10)

        with mlflow_errors(f"opening the parent run of pipeline run {pipeline_run_id}"):
            runs = find()
            if not runs:
                base = {"tgrl.role": "pipeline", "tgrl.pipeline_run_id": pipeline_run_id}
                if commit := git_commit():
                    base["tgrl.git_commit"] = commit
                all_tags = {k: scrub(str(v)) for k, v in {**base, **(tags or {})}.items()}
                mine = client.create_run(
                    exp_id, run_name=run_name or f"pipeline-{pipeline_run_id[:12]}", tags=all_tags
                )
                runs = find()  # two steps may have raced to create it: keep the oldest, drop ours
                if runs and runs[0].info.run_id != mine.info.run_id:
                    client.delete_run(mine.info.run_id)
                runs = runs or [mine]
        parent = RunHandle(runs[0].info.run_id)
        self._parents[pipeline_run_id] = parent
        return parent

    @contextmanager
    def step_run(
        self,
        pipeline_run_id: str,
        step: str,
        *,
        pipeline: str | None = None,
        tags: dict[str, Any] | None = None,
        dataset_sha256: str | None = None,
    ) -> Iterator[RunHandle]:
        """A child run of the pipeline run for `step`, active (fluent API) while the block runs; FAILED if
        the block raises. System metrics are sampled while it is open when `tracking.system_metrics`."""
        import mlflow
        from mlflow import MlflowClient

        run_name = f"{pipeline}-{pipeline_run_id[:12]}" if pipeline else None
        parent = self.start_pipeline_run(pipeline_run_id, run_name=run_name)
        client = MlflowClient()
        base = {
            "mlflow.parentRunId": parent.run_id,
            "tgrl.role": "step",
            "tgrl.step": step,
            "tgrl.pipeline_run_id": pipeline_run_id,
        }
        if commit := git_commit():
            base["tgrl.git_commit"] = commit
        if dataset_sha256:
            base["tgrl.dataset_sha256"] = dataset_sha256
        with mlflow_errors(f"starting the run of step {step!r}"):
            all_tags = {k: scrub(str(v)) for k, v in {**base, **(tags or {})}.items()}
            exp_id = self.experiment_id()
            created = client.create_run(exp_id, run_name=step, tags=all_tags)
            client.update_run(parent.run_id, status="RUNNING")
            # The fluent API refuses a run outside the process's active experiment, which an earlier
            # caller in this process (another pipeline, the registry) may have set to another one.
            mlflow.set_experiment(experiment_id=exp_id)
            mlflow.start_run(
                run_id=created.info.run_id, nested=True, log_system_metrics=self.cfg.system_metrics
            )
        handle = RunHandle(created.info.run_id, parent.run_id)
        self._stack.append(handle)
        status = "FAILED"
        try:
            yield handle
            status = "FINISHED"
        finally:
            self._stack.pop()
            active = mlflow.active_run()
            if active is not None and active.info.run_id == handle.run_id:
                mlflow.end_run(status)
            else:
                client.set_terminated(handle.run_id, status)
            client.set_terminated(parent.run_id, status)

    # The brief's flat interface: log to the innermost open step run (else the newest parent).
    def active(self) -> RunHandle:
        if self._stack:
            return self._stack[-1]
        if self._parents:
            return list(self._parents.values())[-1]
        raise TgrlError("no MLflow run is open", hint="call start_pipeline_run() or use step_run()")

    def log_config(self, config: Any, section: str | None = None) -> None:
        self.active().log_config(config, section)

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.active().log_metrics(metrics, step)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.active().log_artifact(path, artifact_path)

    def log_artifacts(self, paths: str | Path | list[str | Path], artifact_path: str | None = None) -> None:
        self.active().log_artifacts(paths, artifact_path)
