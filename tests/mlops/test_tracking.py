"""MLflow tracking against a real `mlflow server` whose artifacts land in a real S3 endpoint (moto);
the metrics-logger protocol; secrets never reaching params or tags; a down or hung server fails fast.
Tests that use the server run once on SQLite and once on PostgreSQL (conftest `mlflow_backends`)."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from servers import free_port

from tgrl_lib.config import PipelineConfig, TrackingConfig
from tgrl_lib.errors import TgrlError
from tgrl_lib.metrics_log import FanoutLogger, JsonlLogger, MetricsLogger, read_jsonl_metrics
from tgrl_lib.mlops.tracking import MlflowLogger, Tracker, clean_params, metric_key
from tgrl_lib.mlops.tracking_uri import resolve_tracking_uri
from tgrl_lib.store.s3 import s3_client

pytestmark = pytest.mark.mlflow_backends  # server tests: [sqlite] and [postgres]

SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "dummy-aws-secret-0xDEADBEEF",
    "MLFLOW_TRACKING_PASSWORD": "dummy-mlflow-password-31337",
    "OPENAI_API_KEY": "sk-dummy-openai-key-424242",
}


def test_metric_keys_and_params_are_mlflow_safe():
    assert metric_key("synthetic.pass@4") == "synthetic.pass_at_4"
    assert metric_key("loss/policy") == "loss/policy"
    params = clean_params({"a": {"long": "x" * 7000, "items": [1, 2]}, "db_password": "hunter22"}, "train")
    assert len(params["train.a.long"]) == 6000 and params["train.a.long"].endswith("...[truncated]")
    assert params["train.a.items"] == "[1, 2]" and params["train.db_password"] == "***"


def test_jsonl_and_fanout_loggers(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    sink: list[tuple[dict, int]] = []

    class Collect:
        def log(self, metrics, step):
            sink.append((metrics, step))

        def close(self):
            sink.append(({}, -1))

    jsonl = JsonlLogger(path)
    assert isinstance(jsonl, MetricsLogger) and isinstance(MlflowLogger(None), MetricsLogger)
    logger = FanoutLogger(jsonl, Collect())
    logger.log({"loss/policy": 0.5, "reward/mean": float("nan")}, step=1)
    logger.log({"loss/policy": 0.25}, step=2)
    logger.close()
    rows = read_jsonl_metrics(path)
    assert [(r["step"], r["loss/policy"]) for r in rows] == [(1, 0.5), (2, 0.25)]
    assert rows[0]["reward/mean"] is None and sink[-1] == ({}, -1) and len(sink) == 3
    with open(path, "a") as handle:  # a writer killed mid-line leaves a torn tail: dropped on read
        handle.write('{"step": 3, "loss/po')
    assert len(read_jsonl_metrics(path)) == 2


def test_default_tracking_uri_is_local_sqlite(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = PipelineConfig(work_dir=str(tmp_path / "work"))
    assert resolve_tracking_uri(cfg) == f"sqlite:///{(tmp_path / 'work' / 'mlflow.db').resolve()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert resolve_tracking_uri(cfg) == "http://example.invalid:5000"
    cfg.tracking.tracking_uri = "sqlite:///x.db"
    assert resolve_tracking_uri(cfg) == "sqlite:///x.db"


def _all_logged_text(client, run_ids: list[str]) -> str:
    chunks = []
    for run_id in run_ids:
        data = client.get_run(run_id).data
        chunks += [f"{k}={v}" for k, v in {**data.params, **data.tags}.items()]
    return "\n".join(chunks)


def test_pipeline_runs_on_server_with_artifacts_in_s3(mlflow_server, s3_env, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    for key, value in SECRETS.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")
    cfg = PipelineConfig(
        tracking=TrackingConfig(tracking_uri=mlflow_server, experiment=f"exp-{uuid.uuid4().hex[:8]}")
    )
    cfg.generate.backend.openai.api_key_env = "OPENAI_API_KEY"
    hostile = {
        "openai": {"api_key": "sk-inline-secret-777", "base_url": "http://h/v1"},
        "note": f"copied by mistake: {SECRETS['OPENAI_API_KEY']}",
        **{f"many.k{i:03d}": i for i in range(150)},  # > 100 params: several batches
    }
    pipeline_run_id = f"run-{uuid.uuid4().hex[:8]}"
    dataset = tmp_path / "ds"
    dataset.mkdir()
    (dataset / "manifest.json").write_text('{"kind": "problems"}')
    report = tmp_path / "report.md"
    report.write_text("# report\n")

    tracker = Tracker(cfg)
    with tracker.step_run(pipeline_run_id, "train", pipeline=cfg.name) as train:
        train.log_config(cfg.train, section="train")
        train.log_config(hostile, section="extra")
        train.log_dataset_tags({"train": dataset})
        logger = train.metrics_logger()
        for step in range(3):
            logger.log({"loss/policy": 1.0 / (step + 1), "eval.pass@4": 0.5}, step)
        train.log_artifacts([report], "reports")
        time.sleep(1.5)  # let the system-metrics monitor take samples
    other_process = Tracker(cfg)  # a later step in another component: same parent, found by tag
    with other_process.step_run(pipeline_run_id, "evaluate") as evaluate:
        evaluate.log_config(cfg.generate, section="generate")
        evaluate.set_parent_tags({"tgrl.model_version": "models:/x/1"})
    with pytest.raises(RuntimeError), other_process.step_run(pipeline_run_id, "broken") as broken:
        raise RuntimeError("step failed")

    client = MlflowClient(mlflow_server)
    run = client.get_run(train.run_id)
    assert run.info.status == "FINISHED" and client.get_run(broken.run_id).info.status == "FAILED"
    assert run.data.tags["mlflow.parentRunId"] == train.parent_run_id == evaluate.parent_run_id
    assert run.data.tags["tgrl.step"] == "train" and run.data.tags["tgrl.pipeline_run_id"] == pipeline_run_id
    assert len(run.data.tags["tgrl.config_hash"]) == 64 and len(run.data.tags["tgrl.dataset_sha256"]) == 64
    assert run.data.params["train.lr"] == str(cfg.train.lr) and run.data.params["extra.many.k149"] == "149"
    assert run.data.params["extra.openai.api_key"] == "***" and "***" in run.data.params["extra.note"]
    history = client.get_metric_history(train.run_id, "loss/policy")
    assert [(m.step, round(m.value, 3)) for m in history] == [(0, 1.0), (1, 0.5), (2, 0.333)]
    assert "eval.pass_at_4" in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics), "system metrics were not logged"
    parent = client.get_run(train.parent_run_id)
    assert (
        parent.data.tags["tgrl.role"] == "pipeline"
        and parent.data.tags["tgrl.model_version"] == "models:/x/1"
    )

    artifact_uri = run.info.artifact_uri
    assert artifact_uri.startswith("mlflow-artifacts:"), artifact_uri
    keys = [
        obj["Key"]
        for page in s3_client()
        .get_paginator("list_objects_v2")
        .paginate(Bucket=s3_env["bucket"], Prefix="mlflow/")
        for obj in page.get("Contents", [])
    ]
    assert any(train.run_id in k and k.endswith("reports/report.md") for k in keys), keys[:20]

    logged = _all_logged_text(client, [train.run_id, evaluate.run_id, broken.run_id, train.parent_run_id])
    for secret in [*SECRETS.values(), "sk-inline-secret-777"]:
        assert secret not in logged, f"secret leaked into MLflow params/tags: {secret}"


def test_server_down_at_start_is_a_clear_error_within_bounds():
    uri = f"http://127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(TgrlError, match=r"MLflow tracking server http://127\.0\.0\.1:\d+ is not reachable"):
        Tracker(TrackingConfig(tracking_uri=uri))
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_hung_server_is_a_clear_error_within_bounds(monkeypatch):
    """A port that accepts connections but never answers (a hung server) must not hang the step; the
    password of a URI from the environment (recipes refuse them) is not shown."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        monkeypatch.setenv(
            "MLFLOW_TRACKING_URI", f"http://user:pw-never-shown@127.0.0.1:{sock.getsockname()[1]}"
        )
        start = time.monotonic()
        with pytest.raises(TgrlError, match=r"not reachable \(timed out; 3 attempts") as err:
            Tracker(TrackingConfig())
        assert time.monotonic() - start < 30
        assert "pw-never-shown" not in str(err.value)
