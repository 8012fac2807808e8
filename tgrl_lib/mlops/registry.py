"""Model registry: checkpoints as MLflow model versions, eval metrics as version tags, a promotion gate.

- `register_checkpoint` logs the checkpoint as the artifacts of a pyfunc model (so
  `mlflow.pyfunc.load_model("models:/NAME@champion")` answers questions with it) and registers a version
  with tags `eval.<benchmark>.<metric>` and alias `candidate`. `register_model("runs:/<id>/dir")` on a plain
  directory fails in MLflow 3, hence the pyfunc wrapper. The wrapper is logged as code (MLflow "models
  from code"), so the registered artifact holds no pickle; training state (`optimizer*`, `*.pt`, `*.pth`,
  `*.bin`, `*.ckpt`, `rng_state*`) is left out, and a `COMPLETE` marker with every file's sha256 is added
  and verified on every download (`storage.verify_checkpoint`).
- `promote` moves alias `champion` only when the candidate's mean primary metric (over the benchmarks it
  shares with the champion) beats the champion's by more than `margin` and no shared benchmark drops by
  more than `max_regression`; higher is better. The decision and its evidence are version tags
  (`promotion.decision|reason|compared_to|evidence|time`). Promoting the current champion again changes
  nothing ("already champion"); with no champion yet the first evaluated version is promoted; a version
  without `eval.*.<primary>` tags is refused. Aliases only: stages are deprecated.
- `download_model`/`load_champion` fetch a version's checkpoint into a local directory (paths checked to
  stay inside it, checksums verified).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
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
    from tgrl_lib.data.prompts import render_prompt
    from tgrl_lib.generation.hf import HFBackend

    backend = HFBackend(policy.model, policy.processor)
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
def _client(tracking_uri: str | None):
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
    client = _client(tracking_uri)
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


# ----------------------------------------------------------------------------------- promotion
@dataclass
class PromotionDecision:
    """The gate's verdict: `promoted` means `version` holds `@champion` now."""

    promoted: bool
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)
    model_name: str = ""
    version: str = ""
    previous_champion: str | None = None
    changed: bool = False

    def render(self) -> str:
        verdict = "PROMOTED" if self.promoted else "NOT PROMOTED"
        was = ""
        if self.previous_champion and self.previous_champion != self.version:
            was = f" (champion was v{self.previous_champion})"
        return (
            f"{verdict}: {self.model_name} v{self.version}{was}\n"
            f"reason: {self.reason}\n"
            f"evidence: {json.dumps(self.evidence, indent=2, sort_keys=True)}"
        )


def _mean(values: dict[str, float], keys: list[str] | None = None) -> float | None:
    keys = sorted(values) if keys is None else keys
    return sum(values[k] for k in keys) / len(keys) if keys else None


def _judge(
    cand: dict[str, float],
    champ: dict[str, float] | None,
    champion: str | None,
    margin: float,
    max_reg: float,
) -> tuple[bool, str, dict[str, Any]]:
    """(promote?, reason, comparison evidence) for primary-metric values per benchmark."""
    if not cand:
        return False, "not evaluated: no eval.<benchmark>.<primary> tags on this version", {}
    if champion is None:
        return True, "first evaluated version: there is no champion yet", {}
    if not champ:
        return False, f"champion v{champion} has no eval tags for the primary metric: evaluate it first", {}
    common = sorted(set(cand) & set(champ))
    if not common:
        return False, f"no benchmark in common with champion v{champion} ({sorted(champ)})", {}
    cand_mean, champ_mean = _mean(cand, common), _mean(champ, common)
    delta = cand_mean - champ_mean  # type: ignore[operator]
    drops = {b: champ[b] - cand[b] for b in common}
    regressions = {b: d for b, d in drops.items() if d > max_reg}
    evidence = {
        "benchmarks_compared": common,
        "candidate_mean": cand_mean,
        "champion_mean": champ_mean,
        "delta": delta,
        "drops": drops,
    }
    if regressions:
        worst = max(regressions, key=regressions.get)  # type: ignore[arg-type]
        return False, f"{worst} regresses by {regressions[worst]:.4f} > max_regression {max_reg}", evidence
    versus = f"mean {cand_mean:.4f} vs champion v{champion} {champ_mean:.4f}"
    if delta <= margin:
        return False, f"{versus}: {delta:+.4f} does not beat the margin {margin}", evidence
    return True, f"{versus}: {delta:+.4f} beats the margin {margin}", evidence


def promote(
    model_name: str,
    version: str | int,
    primary: str = "accuracy",
    margin: float = 0.0,
    max_regression: float = 0.05,
    *,
    tracking_uri: str | None = None,
) -> PromotionDecision:
    """Run the promotion gate for `model_name` version `version` (see the module docstring)."""
    client, version = _client(tracking_uri), str(version)
    with mlflow_errors(f"reading {model_name!r} v{version} from the registry"):
        candidate = client.get_model_version(model_name, version)
        champion = client.get_registered_model(model_name).aliases.get(CHAMPION)
        champ_tags = client.get_model_version(model_name, champion).tags if champion else {}
    cand = metrics_from_tags(candidate.tags, primary)
    evidence: dict[str, Any] = {
        "primary": metric_key(primary),
        "margin": margin,
        "max_regression": max_regression,
        "candidate": {"version": version, "per_benchmark": cand, "mean": _mean(cand)},
    }
    if champion is not None:
        champ = metrics_from_tags(champ_tags, primary)
        evidence["champion"] = {"version": champion, "per_benchmark": champ, "mean": _mean(champ)}
    decision = PromotionDecision(False, "", evidence, model_name, version, champion)
    if champion == version:
        decision.promoted, decision.reason = True, "already champion: nothing changed"
        return decision
    decision.promoted, decision.reason, comparison = _judge(
        cand, evidence.get("champion", {}).get("per_benchmark"), champion, margin, max_regression
    )
    evidence.update(comparison)
    with mlflow_errors(f"recording the promotion decision on {model_name!r} v{version}"):
        if decision.promoted:
            client.set_registered_model_alias(model_name, CHAMPION, version)
            if champion:
                client.set_model_version_tag(model_name, champion, "promotion.replaced_by", version)
        record = {
            "promotion.decision": "promoted" if decision.promoted else "refused",
            "promotion.reason": decision.reason,
            "promotion.compared_to": f"v{champion}" if champion else "none",
            "promotion.evidence": json.dumps(evidence, sort_keys=True)[:90_000],
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        for key, value in record.items():
            client.set_model_version_tag(model_name, version, key, value)
    decision.changed = decision.promoted
    return decision


# ------------------------------------------------------------------------------------ downloads
def resolve_version(model_uri: str, *, tracking_uri: str | None = None) -> tuple[str, str]:
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> (name, version)."""
    match = re.fullmatch(r"models:/(?P<name>[^@]+?)(?:/(?P<version>\d+)|@(?P<alias>[\w\-]+))", model_uri)
    if not match:
        raise TgrlError(f"model URI {model_uri!r} must be models:/NAME/VERSION or models:/NAME@ALIAS")
    name = match["name"]
    if match["version"]:
        return name, match["version"]
    client = _client(tracking_uri)
    with mlflow_errors(f"resolving {model_uri}"):
        return name, str(client.get_model_version_by_alias(name, match["alias"]).version)


def tag_version(model_uri: str, tags: dict[str, Any], *, tracking_uri: str | None = None) -> None:
    """Set tags on the version `model_uri` names (keys made MLflow-safe: `pass@1` -> `pass_at_1`)."""
    name, version = resolve_version(model_uri, tracking_uri=tracking_uri)
    client = _client(tracking_uri)
    with mlflow_errors(f"tagging {name!r} v{version}"):
        for key, value in tags.items():
            client.set_model_version_tag(name, version, metric_key(key), scrub(str(value)))


def download_model(model_uri: str, dest: str | Path, *, tracking_uri: str | None = None) -> Path:
    """The checkpoint of a registered version, downloaded into `dest` (must be absent or empty) and
    verified against its COMPLETE marker. Returns `dest`."""
    import mlflow
    import yaml

    from tgrl_lib.data.schema import resolve_inside
    from tgrl_lib.store.artifacts import verify_checkpoint

    name, version = resolve_version(model_uri, tracking_uri=tracking_uri)
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise TgrlError("download target exists and is not empty", path=dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = dest.parent / f".{dest.name}.download-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        with mlflow_errors(f"downloading models:/{name}/{version}"):
            local = Path(
                mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=str(staging))
            )
        mlmodel = yaml.safe_load((local / "MLmodel").read_text(encoding="utf-8"))
        try:
            rel = mlmodel["flavors"]["python_function"]["artifacts"]["checkpoint"]["path"]
        except (KeyError, TypeError):
            raise TgrlError(
                f"models:/{name}/{version} is not a tgrl checkpoint model (no checkpoint artifact)"
            ) from None
        checkpoint = resolve_inside(local, str(rel))
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
