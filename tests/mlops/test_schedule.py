"""Schedules through a real `kfp.Client` against a loopback HTTP server that records the KFP v2beta1 calls.

No KFP backend can run here, so the server answers the few endpoints the client uses (healthz,
experiments, recurring runs) with minimal JSON and keeps the recurring runs in memory; the tests assert
what was sent: cron, max concurrency, catch-up, experiment id, the compiled package, and for `replace`
the order create-then-delete.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import pytest

from tgrl_lib.cli import main
from tgrl_lib.errors import TgrlError
from tgrl_lib.mlops import scheduling

API = "/apis/v2beta1"


class FakeKfp:
    """In-memory state + the log of (method, path, query, body) requests."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, dict, dict | None]] = []
        self.auth: list[str | None] = []  # Authorization header of each call
        self.experiments: dict[str, dict] = {}
        self.recurring: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.counter = 0
        self.lock = threading.Lock()

    def next_id(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}-{self.counter}"

    def handle(self, method: str, path: str, query: dict, body: dict | None, auth: str | None = None):
        with self.lock:
            self.calls.append((method, path, query, body))
            self.auth.append(auth)
            if path == f"{API}/healthz":
                return 200, {"multi_user": False}
            if path == f"{API}/experiments" and method == "GET":
                wanted = _filter_name(query)
                rows = [e for e in self.experiments.values() if wanted in (None, e["display_name"])]
                return 200, {"experiments": rows, "total_size": len(rows)} if rows else {}
            if path == f"{API}/experiments" and method == "POST":
                exp = {"experiment_id": self.next_id("exp"), "display_name": body["display_name"]}
                self.experiments[exp["experiment_id"]] = exp
                return 200, exp
            if path == f"{API}/recurringruns" and method == "GET":
                wanted = _filter_name(query)
                rows = [r for r in self.recurring.values() if wanted in (None, r["display_name"])]
                return 200, {"recurringRuns": rows, "total_size": len(rows)} if rows else {}
            if path == f"{API}/recurringruns" and method == "POST":
                run = dict(body)
                run["recurring_run_id"] = self.next_id("rr")
                run["created_at"] = f"2026-01-01T00:00:{self.counter:02d}Z"
                run["pipeline_spec"] = None  # keep list answers small
                self.recurring[run["recurring_run_id"]] = run
                return 200, run
            if path == f"{API}/runs" and method == "POST":  # a one-off run (tgrl pipeline submit)
                run = dict(body) | {"run_id": self.next_id("run"), "pipeline_spec": None}
                self.runs[run["run_id"]] = run
                return 200, run
            if path.startswith(f"{API}/recurringruns/") and method == "DELETE":
                self.recurring.pop(path.rsplit("/", 1)[1], None)
                return 200, {}
            return 404, {"error": f"not faked: {method} {path}"}

    def requests(self, method: str, path: str) -> list[tuple[str, str, dict, dict | None]]:
        return [c for c in self.calls if c[0] == method and c[1] == path]


def _filter_name(query: dict) -> str | None:
    raw = query.get("filter", [None])[0]
    if not raw:
        return None
    return json.loads(raw)["predicates"][0]["stringValue"]


@pytest.fixture()
def kfp_server():
    fake = FakeKfp()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            url = urlparse(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            auth = self.headers.get("Authorization")
            status, answer = fake.handle(self.command, url.path, parse_qs(url.query), body, auth)
            data = json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fake.host = f"http://127.0.0.1:{server.server_address[1]}"
    yield fake
    server.shutdown()
    server.server_close()


@pytest.fixture()
def recipe(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("name: nightly\ntrain:\n  steps: 3\n", encoding="utf-8")
    return path


def test_validate_cron_wants_six_fields():
    assert scheduling.validate_cron(" 0  0 3 * * * ") == "0 0 3 * * *"
    with pytest.raises(TgrlError, match=r"5 fields.*'0 0 3 \* \* \*'"):
        scheduling.validate_cron("0 3 * * *")
    with pytest.raises(TgrlError, match="7 fields"):
        scheduling.validate_cron("0 0 3 * * * 2030")


def test_create_sends_cron_concurrency_catchup_experiment_and_package(kfp_server, recipe):
    client = scheduling.connect(kfp_server.host)
    spec = scheduling.ScheduleSpec(
        name="nightly",
        cron="0 0 3 * * *",
        config_path=str(recipe),
        experiment="tgrl-nightly",
        max_concurrency=2,
        params=(("base_model", "tiny"),),
    )
    run = scheduling.create_schedule(client, spec)

    ((_, _, _, exp_body),) = kfp_server.requests("POST", f"{API}/experiments")
    assert exp_body["display_name"] == "tgrl-nightly"
    ((_, _, _, body),) = kfp_server.requests("POST", f"{API}/recurringruns")
    assert run.recurring_run_id == "rr-2"
    assert body["display_name"] == "nightly"
    assert body["experiment_id"] == "exp-1"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert int(body["max_concurrency"]) == 2
    assert body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    params = body["runtime_config"]["parameters"]
    assert params["config"] == recipe.read_text()
    assert params["base_model"] == "tiny"
    spec_sent = body["pipeline_spec"]["pipeline_spec"]  # the compiled package: IR + platform spec
    assert spec_sent["pipelineInfo"]["name"] == "tgrl-pipeline"
    assert "register-and-promote" in spec_sent["root"]["dag"]["tasks"]
    assert "kubernetes" in body["pipeline_spec"]["platform_spec"]["platforms"]


def test_create_reuses_an_existing_experiment(kfp_server):
    client = scheduling.connect(kfp_server.host)
    spec = scheduling.ScheduleSpec(name="a", cron="0 0 3 * * *", pipeline="eval_pipeline")
    scheduling.create_schedule(client, spec)
    scheduling.create_schedule(client, scheduling.ScheduleSpec(name="b", cron="0 30 4 * * 1"))
    assert len(kfp_server.requests("POST", f"{API}/experiments")) == 1
    bodies = [c[3] for c in kfp_server.requests("POST", f"{API}/recurringruns")]
    assert {b["experiment_id"] for b in bodies} == {"exp-1"}
    assert bodies[0]["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "tgrl-eval"


def test_replace_creates_new_then_deletes_every_old_one(kfp_server, recipe):
    client = scheduling.connect(kfp_server.host)
    old = scheduling.ScheduleSpec(name="nightly", cron="0 0 3 * * *", config_path=str(recipe))
    first = scheduling.create_schedule(client, old).recurring_run_id
    second = scheduling.create_schedule(client, old).recurring_run_id  # a duplicate left by hand
    other = scheduling.create_schedule(client, scheduling.ScheduleSpec(name="other", cron="0 0 1 * * *"))
    kfp_server.calls.clear()

    new_spec = scheduling.ScheduleSpec(name="nightly", cron="0 15 2 * * *", config_path=str(recipe))
    new, deleted = scheduling.replace_schedule(client, new_spec)

    assert sorted(deleted) == sorted([first, second])
    methods = [(m, p) for m, p, _, _ in kfp_server.calls if p.startswith(f"{API}/recurringruns")]
    create_at = methods.index(("POST", f"{API}/recurringruns"))
    delete_at = [i for i, (m, _) in enumerate(methods) if m == "DELETE"]
    assert len(delete_at) == 2 and min(delete_at) > create_at  # create first, then delete
    assert set(kfp_server.recurring) == {new.recurring_run_id, other.recurring_run_id}
    assert kfp_server.recurring[new.recurring_run_id]["trigger"]["cron_schedule"]["cron"] == "0 15 2 * * *"
    (_, _, query, _), *_ = kfp_server.requests("GET", f"{API}/recurringruns")
    assert json.loads(query["filter"][0])["predicates"][0]["stringValue"] == "nightly"


def test_replace_with_a_bad_cron_touches_nothing(kfp_server):
    client = scheduling.connect(kfp_server.host)
    scheduling.create_schedule(client, scheduling.ScheduleSpec(name="n", cron="0 0 3 * * *"))
    before = dict(kfp_server.recurring)
    with pytest.raises(TgrlError, match="6"):
        scheduling.replace_schedule(client, scheduling.ScheduleSpec(name="n", cron="0 3 * * *"))
    assert kfp_server.recurring == before


def test_list_and_delete_by_name(kfp_server):
    client = scheduling.connect(kfp_server.host)
    for name in ("a", "a", "b"):
        scheduling.create_schedule(client, scheduling.ScheduleSpec(name=name, cron="0 0 3 * * *"))
    rows = scheduling.list_schedules(client)
    assert sorted(r["name"] for r in rows) == ["a", "a", "b"]
    assert {r["cron"] for r in rows} == {"0 0 3 * * *"} and all(r["no_catchup"] for r in rows)
    deleted = scheduling.delete_schedules(client, name="a")
    assert len(deleted) == 2 and [r["name"] for r in scheduling.list_schedules(client)] == ["b"]
    with pytest.raises(TgrlError, match="no schedule named 'a'"):
        scheduling.delete_schedules(client, name="a")


def test_cli_replace_with_the_chart_flags(kfp_server, recipe, capsys):
    argv = [
        "schedule",
        "replace",
        "--host",
        kfp_server.host,
        "--name",
        "tgrl-nightly",
        "--cron",
        "0 0 3 * * *",
        "--pipeline",
        "tgrl_pipeline",
        "--config",
        str(recipe),
        "--experiment",
        "tgrl",
        "--max-concurrency",
        "1",
    ]
    assert main(argv) == 0
    assert main(argv) == 0  # the second replace swaps the first schedule out
    out = capsys.readouterr().out
    assert "deleted old: none found" in out and "deleted old: rr-2" in out
    assert [r["display_name"] for r in kfp_server.recurring.values()] == ["tgrl-nightly"]
    body = kfp_server.requests("POST", f"{API}/recurringruns")[-1][3]
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True


def test_cli_bad_cron_is_a_one_line_error(kfp_server, capsys):
    argv = ["schedule", "create", "--host", kfp_server.host, "--name", "x", "--cron", "0 3 * * *"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "KFP expects 6" in err
    assert kfp_server.calls == []  # validated before connecting


def test_cli_bad_recipe_is_refused_before_anything_is_created(kfp_server, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stepz: 3\n", encoding="utf-8")
    argv = [
        "schedule",
        "create",
        "--host",
        kfp_server.host,
        "--name",
        "x",
        "--cron",
        "0 0 3 * * *",
        "--config",
        str(bad),
    ]
    assert main(argv) == 2
    assert "stepz" in capsys.readouterr().err
    assert kfp_server.requests("POST", f"{API}/recurringruns") == []


def test_service_account_token_is_sent_as_bearer(kfp_server, tmp_path, monkeypatch):
    token = tmp_path / "token"
    token.write_text("projected-sa-token")
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(token))
    client = scheduling.connect(kfp_server.host)
    scheduling.list_schedules(client)
    assert kfp_server.auth and set(kfp_server.auth) == {"Bearer projected-sa-token"}
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(TgrlError, match="token file not found"):
        scheduling.connect(kfp_server.host)


def test_cli_against_a_dead_host_is_a_one_line_error(kfp_server, capsys):
    from servers import free_port

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    assert main(["schedule", "list", "--host", dead]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"KFP API {dead} is not reachable" in err and "Traceback" not in err
    assert main(["schedule", "list", "--host", kfp_server.host]) == 0  # control: a live API lists


def test_submit_starts_one_run_with_the_recipe_and_params(kfp_server, recipe, capsys):
    argv = ["pipeline", "submit", "--host", kfp_server.host, "--config", str(recipe), "--experiment", "adhoc"]
    assert main([*argv, "--param", "base_model=tiny", "--name", "try-1"]) == 0
    ((_, _, _, body),) = kfp_server.requests("POST", f"{API}/runs")
    assert body["display_name"] == "try-1"
    assert body["experiment_id"] == next(iter(kfp_server.experiments))
    assert kfp_server.experiments[body["experiment_id"]]["display_name"] == "adhoc"
    params = body["runtime_config"]["parameters"]
    assert params["config"] == recipe.read_text() and params["base_model"] == "tiny"
    assert '"name": "tgrl-pipeline"' in json.dumps(body["pipeline_spec"])  # the compiled package
    assert kfp_server.requests("POST", f"{API}/recurringruns") == []  # one-off, not a schedule
    assert "started run run-" in capsys.readouterr().out


def test_submit_refuses_a_bad_recipe_before_calling_the_api(kfp_server, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stpes: 3\n")
    assert main(["pipeline", "submit", "--host", kfp_server.host, "--config", str(bad)]) != 0
    assert "did you mean train.steps?" in capsys.readouterr().err
    assert kfp_server.requests("POST", f"{API}/runs") == []
