"""Session fixtures shared by the test suite, one marked section per owner (imports shared at the top)."""

import os
from pathlib import Path

import pytest
from servers import (
    DEFAULT_BUCKET,
    DUMMY_AWS,
    ServerProcess,
    find_postgres_bin,
    mlflow_db_upgrade,
    start_mlflow,
    start_moto,
    start_postgres,
)

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


# ===================================================================================================
# MLflow backends: SQLite and PostgreSQL (the chart's backend store). A test marked
# `@pytest.mark.mlflow_backends` (or a module with `pytestmark = pytest.mark.mlflow_backends`) runs once
# per backend, `[sqlite]` and `[postgres]`, and its `mlflow_server`, `mlflow_store_uri` and
# `fresh_mlflow_server` follow the backend; unmarked tests get SQLite. One PostgreSQL cluster per session;
# a test that needs its own store takes a fresh database. Owned by the MLflow-deployment helper.
# ===================================================================================================
MLFLOW_BACKENDS = ("sqlite", "postgres")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "mlflow_backends: run once per MLflow backend store (sqlite, postgres); the mlflow_server, "
        "mlflow_store_uri and fresh_mlflow_server fixtures follow it",
    )


def pytest_generate_tests(metafunc):
    if (
        metafunc.definition.get_closest_marker("mlflow_backends")
        and "mlflow_backend" in metafunc.fixturenames
    ):
        metafunc.parametrize("mlflow_backend", MLFLOW_BACKENDS, indirect=True)


@pytest.fixture
def mlflow_backend(request) -> str:
    """`sqlite` or `postgres`: the backend store of this test's MLflow (SQLite unless marked)."""
    return getattr(request, "param", "sqlite")


@pytest.fixture(scope="session")
def postgres_server(servers_dir):
    """The session's PostgreSQL cluster (`servers.PostgresServer`). Skips, or fails under CI, when the
    machine has no PostgreSQL (scripts/install-tools.sh installs it)."""
    if find_postgres_bin() is None:
        reason = "PostgreSQL not found (/usr/lib/postgresql/*/bin, $TGRL_POSTGRES_BIN)"
        reason += ": run scripts/install-tools.sh"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI runs it before the tests, so this is a broken setup)")
        pytest.skip(reason)
    server = start_postgres(servers_dir / "postgres")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def mlflow_postgres_template(postgres_server, servers_dir) -> str:
    """Name of a database migrated once by `mlflow db upgrade` (as the chart's migration Job does);
    fresh stores are copies of it (`CREATE DATABASE ... TEMPLATE`), so no test waits for migrations."""
    name = postgres_server.create_database("mlflow_template")
    mlflow_db_upgrade(postgres_server.uri(name), servers_dir / "mlflow-template-db-upgrade.log")
    return name


@pytest.fixture(scope="session")
def mlflow_postgres_process(postgres_server, mlflow_postgres_template, servers_dir, s3_endpoint):
    """A real `mlflow server` on PostgreSQL, artifacts proxied to s3://tgrl-test/mlflow on moto."""
    database = postgres_server.create_database("mlflow", template=mlflow_postgres_template)
    server = start_mlflow(
        servers_dir / "mlflow-postgres",
        s3_endpoint,
        DEFAULT_BUCKET,
        backend_store_uri=postgres_server.uri(database),
        name="mlflow-postgres",
        migrate=False,  # a copy of the migrated template
    )
    yield server
    server.stop()


@pytest.fixture
def mlflow_server(mlflow_backend, request) -> str:
    """Tracking URI (http://127.0.0.1:PORT) of the session's MLflow server on this test's backend
    (shared by the session's tests: use unique experiment and model names)."""
    process = "mlflow_process" if mlflow_backend == "sqlite" else "mlflow_postgres_process"
    return request.getfixturevalue(process).url


@pytest.fixture
def mlflow_store_uri(mlflow_backend, tmp_path, request):
    """A backend store of this test's own: `sqlite:///<tmp_path>/mlflow.db` (created by MLflow on first
    use), or a fresh PostgreSQL database already migrated (dropped after the test). Its URI holds the
    database password: give it to a client or a server, never to a recipe that is logged."""
    if mlflow_backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'mlflow.db'}"
        return
    postgres = request.getfixturevalue("postgres_server")
    database = postgres.create_database("store", template=request.getfixturevalue("mlflow_postgres_template"))
    yield postgres.uri(database)
    postgres.drop_database(database)


@pytest.fixture
def fresh_mlflow_server(mlflow_store_uri, s3_endpoint, tmp_path):
    """A new `mlflow server` on `mlflow_store_uri` (artifacts proxied to moto), for a test that needs an
    empty tracking server (first registered version, counts of runs). Starting one takes ~15 s."""
    # the store is migrated already (PostgreSQL: a template copy) or created by the server (SQLite)
    server = start_mlflow(
        tmp_path / "mlflow-server",
        s3_endpoint,
        DEFAULT_BUCKET,
        backend_store_uri=mlflow_store_uri,
        migrate=False,
    )
    yield server.url
    server.stop()


@pytest.fixture(scope="module")
def helm():
    """The helm binary for the chart tests (skipped without it, a failure in CI, which installs it)."""
    from infra_tools import find_helm

    path = find_helm()
    if path is None:
        reason = "helm not found ($HELM, PATH, .tools/bin/helm): run scripts/install-tools.sh"
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI runs it before the tests, so this is a broken setup)")
        pytest.skip(reason)
    return path
