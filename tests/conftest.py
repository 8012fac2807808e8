"""Session fixtures shared by the test suite, one marked section per owner (imports shared at the top)."""

from pathlib import Path

import pytest
from servers import DEFAULT_BUCKET, DUMMY_AWS, ServerProcess, start_mlflow, start_moto

# ===================================================================================================
# tiny model: the tiny offline Qwen2.5-VL (`tgrl_lib.models.policy.build_tiny`), built once per session.
# Owned by the tiny-model helper.
# ===================================================================================================


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny Qwen2.5-VL checkpoint (seed 0, 56 px images -> 4 image tokens), built once per session.
    Shared by many tests: treat it as read-only (copy it, or `save_policy` elsewhere, before changing it)."""
    from tgrl_lib.models.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny_model") / "model", seed=0)


# ===================================================================================================
# servers: a real S3 endpoint (moto) and a real MLflow tracking server, each started once per session
# (tests/servers.py). Owned by the storage/tracking helper; fixtures above this line belong to others.
# ===================================================================================================


@pytest.fixture(scope="session")
def servers_dir(tmp_path_factory) -> object:
    """Logs and databases of the session's servers."""
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def s3_server(servers_dir):
    """The session's moto S3 endpoint (bucket `tgrl-test` created). Never stop it in a test: use
    `fault_s3_server` for fault injection."""
    server = start_moto(servers_dir / "moto", buckets=(DEFAULT_BUCKET,))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(s3_server) -> str:
    """URL of the session's S3 endpoint; bucket `servers.DEFAULT_BUCKET` exists."""
    return s3_server.url


@pytest.fixture
def s3_env(s3_endpoint, monkeypatch) -> dict[str, str]:
    """Point boto3/tgrl at the session's S3 endpoint with dummy credentials for one test."""
    env = {**DUMMY_AWS, "AWS_ENDPOINT_URL": s3_endpoint, "bucket": DEFAULT_BUCKET}
    for key, value in env.items():
        if key != "bucket":
            monkeypatch.setenv(key, value)
    return env


@pytest.fixture(scope="session")
def fault_s3_server(servers_dir):
    """A second moto endpoint that tests may stop, pause and restart (its bucket survives restarts)."""
    server = start_moto(servers_dir / "moto-fault", buckets=(DEFAULT_BUCKET,))
    yield server
    server.stop()


@pytest.fixture
def fault_s3(fault_s3_server: ServerProcess, monkeypatch):
    """`fault_s3_server`, running and answering again after the test, with the env pointed at it."""
    for key, value in {**DUMMY_AWS, "AWS_ENDPOINT_URL": fault_s3_server.url}.items():
        monkeypatch.setenv(key, value)
    yield fault_s3_server
    fault_s3_server.resume()
    if not fault_s3_server.running:
        fault_s3_server.start()


@pytest.fixture(scope="session")
def mlflow_process(servers_dir, s3_endpoint):
    """A real `mlflow server` process (SQLite, artifacts proxied to s3://tgrl-test/mlflow on moto)."""
    server = start_mlflow(servers_dir / "mlflow", s3_endpoint, DEFAULT_BUCKET)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(mlflow_process) -> str:
    """Tracking URI (http://127.0.0.1:PORT) of the session's MLflow server."""
    return mlflow_process.url
