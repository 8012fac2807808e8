"""Secrets never leak (issue 8, item 4): the whole local pipeline (`tgrl pipeline run --local`, every step
a subprocess) runs with dummy credentials in the environment; afterwards its stdout and stderr, every file
it left (logs, reports, results, checkpoints, KFP outputs, the MLflow SQLite store and artifacts) and
everything MLflow holds (run names, params, tags, registered models, model versions, logged models) are
scanned for each secret, raw and encoded.

Secrets belong in the environment only. A recipe is not secret: it travels to every step as a KFP
parameter, which the KFP executor echoes into the step's log, so a credential pasted into a recipe would
show there (MLflow params still scrub it: tests/mlops/test_tracking.py); see docs/SECURITY.md.

The env names are those the code and its libraries read: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
`AWS_SESSION_TOKEN` (boto3, `tgrl_lib.store.s3`), `MLFLOW_TRACKING_USERNAME`/`MLFLOW_TRACKING_PASSWORD`/
`MLFLOW_TRACKING_TOKEN` (MLflow basic auth, read by MLflow itself), `OPENAI_API_KEY` (`generate.api_key_env`
default), `HF_TOKEN` (transformers). The user name is not a secret: MLflow records it as `mlflow.user`.

MLflow basic auth: steps reach an auth-protected server with the credentials from the environment alone, and
a wrong password is a one-line error that does not show it.
"""

from __future__ import annotations

import base64
import contextlib
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tgrl_lib.errors import TgrlError

REPO = Path(__file__).resolve().parents[1]
SMALL = [  # as tests/test_local_pipeline.py, smaller where the run allows
    "data.n_train=8", "data.n_test=4", "train.steps=1", "train.problems_per_step=2", "train.group_size=2",
    "train.minibatch_size=4", "train.micro_batch_size=4", "train.sampling.max_new_tokens=8",
    "eval.sampling.max_new_tokens=8",
    "eval.limit=4", "tracking.system_metrics=false",
]  # fmt: skip
SECRETS = {
    "AWS_ACCESS_KEY_ID": "AKIADUMMYTGRL7Q2X9ZLM",
    "AWS_SECRET_ACCESS_KEY": "dummy-aws-secret/Zq8+vN3kR7tY1wP5sL0",
    "AWS_SESSION_TOKEN": "dummy-aws-session-token-FwoGZXIvYXdz",
    "MLFLOW_TRACKING_PASSWORD": "dummy-mlflow-password-b7e41c",
    "MLFLOW_TRACKING_TOKEN": "dummy-mlflow-token-58aa03",
    "OPENAI_API_KEY": "sk-dummy-openai-key-9f2d77c1",
    "HF_TOKEN": "hf_dummyTgrlToken4c1e9a",
}
USER = "tgrl-ci-user"


def encodings(secret: str) -> dict[str, bytes]:
    """The forms a leaked secret could take in a file: raw, URL-quoted, base64 (alone and as the
    `user:password` of a basic-auth header)."""
    forms = {
        "raw": secret,
        "url-quoted": urllib.parse.quote(secret, safe=""),
        "base64": base64.b64encode(secret.encode()).decode(),
        "basic-auth": base64.b64encode(f"{USER}:{secret}".encode()).decode(),
    }
    return {name: value.encode() for name, value in forms.items()}


def leaks_in_bytes(data: bytes, where: str) -> list[str]:
    return [
        f"{name} ({form}) in {where}"
        for name, secret in SECRETS.items()
        for form, needle in encodings(secret).items()
        if needle in data
    ]


def leaks_in_files(root: Path) -> tuple[list[str], int]:
    """(leaks, files scanned) over every regular file under `root` (binary files too)."""
    found, scanned = [], 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            scanned += 1
            found += leaks_in_bytes(path.read_bytes(), str(path.relative_to(root)))
    return found, scanned


def mlflow_text(tracking_uri: str) -> tuple[str, dict[str, int]]:
    """Everything MLflow holds that a person or a tool could read, as one text, and counts of what was
    read (so an empty store cannot pass the scan)."""
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient(tracking_uri=tracking_uri)
    parts: list[str] = []
    counts = {"experiments": 0, "runs": 0, "params": 0, "tags": 0, "model_versions": 0, "logged_models": 0}
    experiments = client.search_experiments(view_type=ViewType.ALL)
    for experiment in experiments:
        counts["experiments"] += 1
        parts += [experiment.name, experiment.artifact_location, repr(experiment.tags)]
        runs = client.search_runs([experiment.experiment_id], run_view_type=ViewType.ALL, max_results=5000)
        for run in runs:
            counts["runs"] += 1
            counts["params"] += len(run.data.params)
            counts["tags"] += len(run.data.tags)
            parts += [run.info.run_name or "", repr(run.data.params), repr(run.data.tags)]
            parts += list(run.data.metrics)
        logged = client.search_logged_models(experiment_ids=[experiment.experiment_id])
        for model in logged:
            counts["logged_models"] += 1
            parts += [model.name, repr(model.tags), repr(model.params), str(model.source_run_id)]
    for registered in client.search_registered_models():
        parts += [registered.name, registered.description or "", repr(registered.tags)]
        for version in client.search_model_versions(f"name='{registered.name}'"):
            counts["model_versions"] += 1
            parts += [version.source or "", version.description or "", repr(version.tags)]
    return "\n".join(parts), counts


def test_the_scanner_finds_a_planted_secret(tmp_path):
    """Negative control: the scan is not vacuous."""
    secret = SECRETS["MLFLOW_TRACKING_PASSWORD"]
    header = base64.b64encode(f"{USER}:{secret}".encode()).decode()
    (tmp_path / "a.log").write_text(f"Authorization: Basic {header}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.db").write_bytes(b"\x00\x01" + SECRETS["AWS_SECRET_ACCESS_KEY"].encode() + b"\x00")
    found, scanned = leaks_in_files(tmp_path)
    assert scanned == 2 and len(found) == 2
    assert any("basic-auth" in f for f in found) and any("AWS_SECRET_ACCESS_KEY (raw)" in f for f in found)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_no_secret_reaches_logs_reports_files_or_mlflow(tmp_path, record_property):
    work = tmp_path / "runs"
    env = {**os.environ, **SECRETS, "MLFLOW_TRACKING_USERNAME": USER, "TGRL_PROGRESS": "0",
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)  # the local run's own SQLite store
    argv = [sys.executable, "-m", "tgrl_lib.cli", "pipeline", "run", "--local", "--work-dir", str(work),
            "--config", str(REPO / "configs" / "tiny-cpu.yaml")]  # fmt: skip
    for pair in SMALL:
        argv += ["--set", pair]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, timeout=840)
    (tmp_path / "pipeline.stdout").write_bytes(done.stdout)
    (tmp_path / "pipeline.stderr").write_bytes(done.stderr)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    assert (work / "results" / "latest" / "registered.json").is_file()  # the whole pipeline ran

    leaks = leaks_in_bytes(done.stdout, "stdout") + leaks_in_bytes(done.stderr, "stderr")
    file_leaks, scanned = leaks_in_files(tmp_path)  # logs, reports, results, KFP outputs, mlflow.db
    text, counts = mlflow_text(f"sqlite:///{work / 'mlflow.db'}")
    mlflow_leaks = leaks_in_bytes(text.encode(), "MLflow")
    assert not leaks + file_leaks + mlflow_leaks, leaks + file_leaks + mlflow_leaks

    # the scan covered a real run: files, step runs with params and tags, a registered version
    assert scanned > 50 and (work / "mlflow.db").is_file()
    assert counts["runs"] >= 7 and counts["params"] > 50 and counts["tags"] > 50, counts
    assert counts["model_versions"] >= 1, counts
    record_property("secrets_checked", len(SECRETS))
    record_property("files_scanned", scanned)
    print(f"\nsecrets: {len(SECRETS)} dummy secrets x 4 encodings, {scanned} files, {counts}: 0 leaks")


# ------------------------------------------------------------------------------- MLflow basic auth
@contextlib.contextmanager
def basic_auth_proxy(upstream: str, user: str, password: str):
    """A loopback proxy in front of the real MLflow server that demands HTTP basic auth on every path
    but /health, as MLflow's basic-auth app does (whose Flask-WTF extra this environment lacks). Yields
    (url, Authorization headers seen)."""
    expected = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    seen: list[str] = []
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    hop = {"host", "authorization", "connection", "content-length", "transfer-encoding"}

    class Handler(BaseHTTPRequestHandler):
        def _forward(self) -> None:
            if not self.path.startswith("/health"):
                seen.append(self.headers.get("Authorization") or "")
                if seen[-1] != expected:
                    self.send_response(401)
                    self.send_header("WWW-Authenticate", 'Basic realm="mlflow"')
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in hop}
            request = urllib.request.Request(upstream + self.path, body, headers, method=self.command)
            try:
                with opener.open(request, timeout=60) as response:
                    status, reply, data = response.status, response.headers, response.read()
            except urllib.error.HTTPError as err:
                status, reply, data = err.code, err.headers, err.read()
            self.send_response(status)
            for key, value in reply.items():
                if key.lower() not in hop | {"server", "date"}:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.mark.slow
def test_mlflow_basic_auth_credentials_come_from_the_environment(mlflow_server, monkeypatch):
    """Steps log to an auth-protected server with MLFLOW_TRACKING_USERNAME/PASSWORD from the env (nothing in
    the recipe); a wrong password is a clear error in bounded time that never shows the password."""
    import mlflow
    from mlflow import MlflowClient

    from tgrl_lib.config import PipelineConfig, TrackingConfig
    from tgrl_lib.mlops import tracking, tracking_uri

    password = SECRETS["MLFLOW_TRACKING_PASSWORD"]
    previous = (mlflow.get_tracking_uri(), list(tracking_uri._CURRENT_URI))
    try:
        with basic_auth_proxy(mlflow_server, USER, password) as (url, seen):
            monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", USER)
            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
            recipe = PipelineConfig(
                tracking=TrackingConfig(tracking_uri=url, experiment=f"auth-{uuid.uuid4().hex[:8]}")
            )
            assert password not in recipe.model_dump_json()
            with tracking.Tracker(recipe).step_run(uuid.uuid4().hex[:12], "train") as run:
                run.log_config(recipe.train, section="train")
            logged = MlflowClient(mlflow_server).get_run(run.run_id)  # read past the proxy
            assert logged.data.params["train.lr"] == str(recipe.train.lr)
            assert seen and set(seen) == {"Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()}

            monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password-4242")
            start = time.monotonic()
            tracker = tracking.Tracker(recipe)  # the probe of /health needs no credentials
            with pytest.raises(TgrlError, match=r"MLflow: opening experiment .* failed") as info:
                tracker.experiment_id()
            assert time.monotonic() - start < 60 and "error code 401" in str(info.value)
            assert "not-the-password-4242" not in str(info.value) and password not in str(info.value)
    finally:
        mlflow.set_tracking_uri(previous[0])
        tracking_uri._CURRENT_URI[:] = previous[1]
