"""Model registry: checkpoints as MLflow model versions, eval metrics as version tags, artifact checks.

- `register_checkpoint` logs the checkpoint as the artifacts of a pyfunc model (so
  `mlflow.pyfunc.load_model("models:/NAME@champion")` answers questions with it) and registers a version
  with tags `eval.<benchmark>.<metric>` and alias `candidate`. `register_model("runs:/<id>/dir")` on a plain
  directory fails in MLflow 3, hence the pyfunc wrapper. The wrapper is logged as code (MLflow "models
  from code"), so the registered artifact holds no pickle; training state (`optimizer*`, `*.pt`, `*.pth`,
  `*.bin`, `*.ckpt`, `rng_state*`) is left out, and a `COMPLETE` marker with every file's sha256 is added
  and verified on every download (`storage.verify_checkpoint`).
- `verify_version` checks a version's artifacts where they are stored (the listing holds `MLmodel` and
  every file of the checkpoint's `COMPLETE` marker; with `checksums`, each file's sha256 after a download):
  the promotion gate (`mlops.promotion`) runs it before a version can become champion.
- `download_model`/`load_champion` fetch a version's checkpoint into a local directory (paths checked to
  stay inside it, checksums verified); a version whose artifacts are gone is a `TgrlError` naming it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

from tgrl_lib.env import read_env, scrub
from tgrl_lib.errors import TgrlError
from tgrl_lib.mlops.tracking import metric_key, mlflow_errors
from tgrl_lib.mlops.tracking_uri import current_tracking_uri

CHAMPION = "champion"
CANDIDATE = "candidate"
TRAINING_STATE = ("optimizer*", "scheduler*", "rng_state*", "*.pt", "*.pth", "*.bin", "*.ckpt", "*.pkl")
_PYFUNC_CODE = (
    '"""tgrl checkpoint as an MLflow pyfunc model (models from code: no pickle)."""\n'
    "import mlflow\n\nfrom tgrl_lib.mlops.registry import checkpoint_model\n\n"
    "mlflow.models.set_model(checkpoint_model())\n"
)


# ------------------------------------------------------------------------------------ the pyfunc
def checkpoint_model() -> Any:
    """A pyfunc `PythonModel` that answers `{"question", "image"}` rows greedily with the checkpoint in
    the model's artifacts. `image` is a file path or base64 image bytes; param `max_new_tokens` (64).
    (Built by a function so that importing this module does not import mlflow.)"""
    import mlflow.pyfunc

    class CheckpointModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context: Any) -> None:
            from tgrl_lib.models.policy import load_policy
            from tgrl_lib.store.artifacts import verify_checkpoint

            path = Path(context.artifacts["checkpoint"])
            verify_checkpoint(path)
            self.policy = load_policy(path)

        def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints as a schema
            rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else list(model_input)
            return generate_answers(self.policy, rows, int((params or {}).get("max_new_tokens", 64)))

    return CheckpointModel()


def _open_image(value: Any) -> Any:
    """A request's image: a file path (size-checked by `data.images.load_image`) or raw / base64 bytes, whose
    header size is checked against the same pixel limit before anything is decoded."""
    import base64
    import io

    from PIL import Image

    from tgrl_lib.data.images import DEFAULT_MAX_PIXELS, load_image

    if not isinstance(value, bytes):
        text = str(value)
        if Path(text).is_file():
            return load_image(text)
        try:
            value = base64.b64decode(text, validate=True)
        except ValueError as err:
            raise TgrlError(f"image {text[:60]!r} is neither a file nor base64 image bytes") from err
    try:
        image = Image.open(io.BytesIO(value))
        width, height = image.size
    except (OSError, Image.DecompressionBombError) as err:
        raise TgrlError(f"request image is not a readable image: {err}") from None
    if width * height > DEFAULT_MAX_PIXELS:
        raise TgrlError(f"request image is {width}x{height} pixels, over the {DEFAULT_MAX_PIXELS:,} limit")
    return image.convert("RGB")


def _choices(row: dict[str, Any]) -> list[str] | None:
    """A row's choices as a list of strings (a DataFrame gives arrays, or NaN where a row has none)."""
    value = row.get("choices")
    if value is None or isinstance(value, float | str):
        return None
    return [str(c) for c in value] or None


def generate_answers(policy: Any, rows: list[dict[str, Any]], max_new_tokens: int = 64) -> list[str]:
    """Greedy answers of `policy` (`models.policy.Policy`) to `[{"question", "image", "choices"?}]` with the
    training prompt (system prompt, lettered choices), batched by the hf backend (greedy batched answers
    equal one-at-a-time ones: tests/evaluation/test_evaluate.py). Rows with and without an image go in
    separate batches."""
    from tgrl_lib.config import BackendConfig
    from tgrl_lib.data.prompts import render_prompt
    from tgrl_lib.generation.factory import make_backend

    backend = make_backend(BackendConfig(kind="hf"), policy, batch_size=64)
    answers: list[str] = [""] * len(rows)
    for with_image in (True, False):
        index = [i for i, row in enumerate(rows) if (row.get("image") is not None) == with_image]
        if not index:
            continue
        prompts = [
            render_prompt(
                policy.processor, str(rows[i]["question"]), _choices(rows[i]), with_image=with_image
            )
            for i in index
        ]
        images = [_open_image(rows[i]["image"]) for i in index] if with_image else None
        groups = backend.generate(prompts, images, samples=1, temperature=0.0, max_new_tokens=max_new_tokens)
        for i, group in zip(index, groups, strict=True):
            answers[i] = group[0].text
    return answers


# ------------------------------------------------------------------------------ eval metrics
def normalize_eval_metrics(metrics: dict[str, Any]) -> dict[str, dict[str, float]]:
    """`{benchmark: {metric: value}}` from any of: that form, `results.json` (`{"benchmarks": {b:
    {"overall": {...}}}}`), or flat `{"<benchmark>.<metric>": value}` (`evaluation.flat_metrics`)."""
    if isinstance(metrics.get("benchmarks"), dict):
        metrics = metrics["benchmarks"]
    out: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            inner = value.get("overall", value)
            pairs = [(str(key), str(m), v) for m, v in inner.items() if isinstance(v, int | float)]
        else:
            bench, _, metric = str(key).rpartition(".")
            if not bench:
                raise TgrlError(f"eval metric {key!r} must be named <benchmark>.<metric>")
            pairs = [(bench, metric, value)]
        for bench, metric, v in pairs:
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise TgrlError(f"eval metric {bench}.{metric} must be a finite number, got {v!r}")
            out.setdefault(bench, {})[metric] = float(v)
    return out


def eval_tags(metrics: dict[str, Any]) -> dict[str, str]:
    return {
        f"eval.{metric_key(b)}.{metric_key(m)}": repr(v)
        for b, ms in normalize_eval_metrics(metrics).items()
        for m, v in ms.items()
    }


def metrics_from_tags(tags: dict[str, str], metric: str) -> dict[str, float]:
    """`{benchmark: value}` of `eval.<benchmark>.<metric>` tags (unparsable or non-finite ones skipped)."""
    key, found = metric_key(metric), {}
    for tag, value in tags.items():
        bench, _, name = tag.removeprefix("eval.").rpartition(".")
        if tag.startswith("eval.") and bench and name == key:
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                found[bench] = number
    return found


# -------------------------------------------------------------------------------- registration
def registry_client(tracking_uri: str | None = None) -> Any:
    """An `MlflowClient` on `tracking_uri` (or the process's current one)."""
    from mlflow import MlflowClient

    current_tracking_uri(tracking_uri)
    return MlflowClient()


def _stage_checkpoint(src: Path, staged: Path) -> None:
    """Copy the inference files of `src` into `staged` (no training state) and add the COMPLETE marker."""
    from tgrl_lib.store.artifacts import CHECKPOINT_MARKER, checkpoint_marker, local_files

    for rel, path in local_files(src, exclude=(CHECKPOINT_MARKER,)).items():
        if any(Path(rel).match(pattern) for pattern in TRAINING_STATE):
            continue
        target = staged / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    if not any(staged.glob("*.safetensors")):
        raise TgrlError(
            "checkpoint has no *.safetensors weights", path=src, hint="only safetensors are loaded"
        )
    (staged / CHECKPOINT_MARKER).write_bytes(checkpoint_marker(staged))


def register_checkpoint(
    checkpoint_dir: str | Path,
    model_name: str,
    run_id: str | None,
    eval_metrics: dict[str, Any],
    *,
    tracking_uri: str | None = None,
    alias: str = CANDIDATE,
    tags: dict[str, Any] | None = None,
) -> Any:
    """Log `checkpoint_dir` as a pyfunc model of run `run_id` (the active run, or a new `register` run
    when None), register it as a new version of `model_name` tagged with the eval metrics, set `alias`.
    Returns the `ModelVersion`."""
    import mlflow
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    src = Path(checkpoint_dir)
    if not src.is_dir():
        raise TgrlError("checkpoint directory does not exist", path=src)
    version_tags = {
        **eval_tags(eval_metrics),
        **{metric_key(k): scrub(str(v)) for k, v in (tags or {}).items()},
    }
    client = registry_client(tracking_uri)
    signature = ModelSignature(
        inputs=Schema([ColSpec("string", "question"), ColSpec("string", "image", required=False)]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("max_new_tokens", "long", 64)]),
    )
    with tempfile.TemporaryDirectory(prefix="tgrl-register-") as tmp:
        staged, code = Path(tmp) / "checkpoint", Path(tmp) / "tgrl_pyfunc.py"
        _stage_checkpoint(src, staged)
        code.write_text(_PYFUNC_CODE, encoding="utf-8")
        with (
            _ActiveRun(run_id, model_name) as active_id,
            mlflow_errors(f"logging checkpoint {src} as a model"),
            warnings.catch_warnings(),
        ):
            for noise in (".*input example was not provided", ".*Add type hints to the `predict`"):
                warnings.filterwarnings("ignore", message=noise, category=UserWarning)
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(code),
                artifacts={"checkpoint": str(staged)},
                signature=signature,
                pip_requirements=[
                    f"mlflow=={mlflow.__version__}",
                    "torch",
                    "transformers",
                    "safetensors",
                    "pillow",
                ],
            )
    with mlflow_errors(f"registering a version of {model_name!r}"):
        version = mlflow.register_model(info.model_uri, model_name, tags=version_tags)
        client.set_model_version_tag(model_name, version.version, "tgrl.run_id", active_id)
        client.set_registered_model_alias(model_name, alias, version.version)
    return client.get_model_version(model_name, version.version)


class _ActiveRun:
    """Context: `run_id` active (fluent) for logging, started when needed; yields its id."""

    def __init__(self, run_id: str | None, model_name: str):
        self.run_id, self.model_name, self._started = run_id, model_name, False

    def __enter__(self) -> str:
        import mlflow

        active = mlflow.active_run()
        if active is not None and self.run_id in (None, active.info.run_id):
            return active.info.run_id
        if self.run_id is None:
            from tgrl_lib.config import TrackingConfig

            mlflow.set_experiment(TrackingConfig().experiment)
        run = mlflow.start_run(
            run_id=self.run_id, nested=active is not None, run_name=f"register-{self.model_name}"
        )
        self._started = True
        return run.info.run_id

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        import mlflow

        if self._started:
            mlflow.end_run("FAILED" if exc_type else "FINISHED")


# ------------------------------------------------------------------------------------ downloads
def resolve_version(model_uri: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> (name, version)."""
    match = re.fullmatch(r"models:/(?P<name>[^@]+?)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))", model_uri)
    if not match:
        raise TgrlError(f"model URI {model_uri!r} must be models:/NAME/VERSION or models:/NAME@ALIAS")
    name = match["name"]
    if match["version"]:
        return name, match["version"]
    client = registry_client(tracking_uri)
    with mlflow_errors(f"resolving {model_uri}"):
        return name, str(client.get_model_version_by_alias(name, match["alias"]).version)


def tag_version(model_uri: str, tags: dict[str, Any], *, tracking_uri: str | None = None) -> None:
    """Set tags on the version `model_uri` names (keys made MLflow-safe: `pass@1` -> `pass_at_1`)."""
    name, version = resolve_version(model_uri, tracking_uri=tracking_uri)
    client = registry_client(tracking_uri)
    with mlflow_errors(f"tagging {name!r} v{version}"):
        for key, value in tags.items():
            client.set_model_version_tag(name, version, metric_key(key), scrub(str(value)))


def _listing(repo: Any, path: str | None = None) -> dict[str, int | None]:
    """`{relative path: size}` of every file under `path` of an artifact repository (recursive)."""
    found: dict[str, int | None] = {}
    for entry in repo.list_artifacts(path):
        if entry.is_dir:
            found.update(_listing(repo, entry.path))
        else:
            found[entry.path] = entry.file_size
    return found


def _read_artifact(repo: Any, path: str, where: str) -> bytes:
    with tempfile.TemporaryDirectory(prefix="tgrl-verify-") as tmp:
        with mlflow_errors(f"reading {path} of {where}"):
            local = Path(repo.download_artifacts(path, tmp))
        return local.read_bytes()


def _checkpoint_path(mlmodel: bytes, where: str) -> str:
    """The checkpoint's directory inside a version's artifacts, from its MLmodel file."""
    import yaml

    try:
        return str(yaml.safe_load(mlmodel)["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"])
    except (KeyError, TypeError, yaml.YAMLError):
        raise TgrlError(f"{where} is not a tgrl checkpoint model (no checkpoint artifact)") from None


def verify_version(
    model_name: str, version: str | int, *, checksums: bool = True, tracking_uri: str | None = None
) -> dict[str, str]:
    """Check the artifacts of `model_name` v`version` where the registry keeps them: listable, with
    `MLmodel` and every file the checkpoint's `COMPLETE` marker names; with `checksums`, also downloaded
    (to a temporary directory) and matched to the marker's sha256. Returns the marker's file map; raises a
    `TgrlError` saying what is missing or wrong."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

    from tgrl_lib.store.artifacts import CHECKPOINT_MARKER

    where = f"models:/{model_name}/{version}"
    registry_client(tracking_uri)  # the repository resolves `models:/` through the current tracking URI
    with mlflow_errors(f"listing the artifacts of {where}"):
        repo = get_artifact_repository(where)
        listed = _listing(repo)
    if "MLmodel" not in listed:
        raise TgrlError(f"{where} has no MLmodel in its artifacts (deleted?): it cannot be loaded")
    rel = _checkpoint_path(_read_artifact(repo, "MLmodel", where), where).strip("/")
    if f"{rel}/{CHECKPOINT_MARKER}" not in listed:
        raise TgrlError(f"{where} has no {rel}/{CHECKPOINT_MARKER} marker: the checkpoint is incomplete")
    try:
        files = json.loads(_read_artifact(repo, f"{rel}/{CHECKPOINT_MARKER}", where))["files"]
        missing = sorted(name for name in files if f"{rel}/{name}" not in listed)
    except (ValueError, KeyError, TypeError):
        raise TgrlError(f"{where}: {rel}/{CHECKPOINT_MARKER} is not a checkpoint marker") from None
    if missing:
        raise TgrlError(
            f"{where}: {len(missing)} checkpoint file(s) missing from the registry: {missing[:3]}"
        )
    if checksums:
        with tempfile.TemporaryDirectory(prefix="tgrl-verify-") as tmp:
            download_model(where, Path(tmp) / "checkpoint", tracking_uri=tracking_uri)
    return files


def download_model(model_uri: str, dest: str | Path, *, tracking_uri: str | None = None) -> Path:
    """The checkpoint of a registered version, downloaded into `dest` (must be absent or empty) and
    verified against its COMPLETE marker. Returns `dest`."""
    import mlflow

    from tgrl_lib.data.schema import resolve_inside
    from tgrl_lib.store.artifacts import verify_checkpoint

    name, version = resolve_version(model_uri, tracking_uri=tracking_uri)
    where = f"models:/{name}/{version}"
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise TgrlError("download target exists and is not empty", path=dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.download-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        with mlflow_errors(f"downloading {where}"):
            local = Path(mlflow.artifacts.download_artifacts(where, dst_path=str(staging)))
        if not (local / "MLmodel").is_file():
            raise TgrlError(
                f"{where} has no MLmodel in its artifacts (deleted?): it cannot be loaded",
                hint="promote a version whose artifacts are intact",
            )
        checkpoint = resolve_inside(local, _checkpoint_path((local / "MLmodel").read_bytes(), where))
        verify_checkpoint(checkpoint)
        if dest.exists():
            dest.rmdir()
        checkpoint.rename(dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return dest


def load_champion(
    model_name: str, dest: str | Path | None = None, *, tracking_uri: str | None = None
) -> Path:
    """Local checkpoint directory of `models:/NAME@champion` (cached per version under `TGRL_CACHE_DIR`,
    default `~/.cache/tgrl/models`, and re-verified on reuse)."""
    from tgrl_lib.store.artifacts import verify_checkpoint

    name, version = resolve_version(f"models:/{model_name}@{CHAMPION}", tracking_uri=tracking_uri)
    if dest is None:
        root = Path(read_env("TGRL_CACHE_DIR") or Path.home() / ".cache" / "tgrl")
        dest = root / "models" / re.sub(r"[^\w.\-]", "_", name) / f"v{version}"
        if (Path(dest) / "COMPLETE").is_file():
            verify_checkpoint(dest)
            return Path(dest)
    return download_model(f"models:/{name}/{version}", dest, tracking_uri=tracking_uri)
