"""The `openai` expert backend against real HTTP servers on 127.0.0.1: `tgrl serve` over the tiny model
(same samples as the local hf backend with the same seed), and a scripted stdlib server for the failure
cases (500 then success, 429 with Retry-After, a server slower than the timeout, 401, dropped
connections). The API key goes out as a Bearer header and never shows up in errors or logs. The server's
own tests (bad requests, limits, `tgrl serve` with a key) are in test_serve.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tgrl_lib.config import GenerateConfig, OpenAIConfig
from tgrl_lib.data.schema import load_dataset
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.openai import ChatClient, OpenAIBackend, retry_after_s, to_openai_messages
from tgrl_lib.generation.run import batch_seed, generate_trajectories

KEY_ENV = "TGRL_TEST_EXPERT_CREDENTIAL"  # a name that does not look secret: the backend must still hide it
KEY = "sk-test-4f9a1c2e7b0d"
OK_BODY = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "<answer>1</answer>"}}]}


# ------------------------------------------------------------------------------- scripted server
class Script:
    """What the scripted server answers, one action per request (the last one repeats)."""

    def __init__(self, *actions: tuple):
        self.actions = list(actions)
        self.requests: list[dict] = []
        self.lock = threading.Lock()

    def next(self, request: dict) -> tuple:
        with self.lock:
            self.requests.append(request)
            return self.actions[min(len(self.requests) - 1, len(self.actions) - 1)]


def start_scripted(script: Script) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            action = script.next(
                {"auth": self.headers.get("Authorization"), "body": body, "t": time.monotonic()}
            )
            kind = action[0]
            if kind == "sleep":
                time.sleep(action[1])
                return
            if kind == "drop":  # close the connection without an answer
                self.close_connection = True
                self.wfile.flush()
                self.connection.shutdown(2)
                return
            if kind == "ok":  # ("ok",) or ("ok", body)
                status, headers, payload = 200, {}, action[1] if len(action) > 1 else OK_BODY
            else:  # ("status", code[, headers]); the error echoes the Authorization header (hostile server)
                echo = {"error": {"message": f"echo {self.headers.get('Authorization')}"}}
                status, headers, payload = action[1], action[2] if len(action) > 2 else {}, echo
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/v1"


@pytest.fixture
def scripted(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    servers = []

    def start(*actions: tuple, **config) -> tuple[Script, OpenAIBackend]:
        script = Script(*actions)
        server, url = start_scripted(script)
        servers.append(server)
        options = {"backoff_s": 0.01, "max_backoff_s": 5.0, "max_retries": 3, "timeout_s": 5.0} | config
        cfg = OpenAIConfig(base_url=url, api_key_env=KEY_ENV, **options)
        return script, OpenAIBackend(cfg, "m")

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def ask(backend: OpenAIBackend, samples: int = 1) -> list:
    return backend.generate(["How many?"], None, samples=samples, temperature=0.5, max_new_tokens=8, seed=3)[
        0
    ]


def test_500_then_success_is_retried_with_the_key_as_bearer(scripted):
    script, backend = scripted(("status", 500), ("status", 503), ("ok",))
    [completion] = ask(backend)
    assert completion.text == "<answer>1</answer>"
    assert len(script.requests) == 3 and backend.client.stats.retries == 2
    assert all(r["auth"] == f"Bearer {KEY}" for r in script.requests)
    body = script.requests[0]["body"]
    assert body["model"] == "m" and body["n"] == 1 and body["max_tokens"] == 8 and body["seed"] == 3
    assert body["messages"][0]["role"] == "system" and "<think>" in body["messages"][0]["content"]


def test_429_waits_for_retry_after(scripted):
    script, backend = scripted(("status", 429, {"Retry-After": "1"}), ("ok",))
    ask(backend)
    waited = script.requests[1]["t"] - script.requests[0]["t"]
    assert 0.9 <= waited < 3.0  # the backoff alone (<= 0.01 s) would not wait this long
    assert retry_after_s("2") == 2.0 and retry_after_s("soon") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past: no wait


def test_a_server_slower_than_the_timeout_fails_in_bounded_time(scripted):
    script, backend = scripted(("sleep", 5.0), timeout_s=0.4, max_retries=1)
    start = time.monotonic()
    with pytest.raises(TgrlError, match=r"giving up after 2 attempts: no answer within 0\.4 s"):
        ask(backend)
    assert time.monotonic() - start < 3.0
    assert len(script.requests) == 2


def test_timeout_then_success_is_retried(scripted):
    script, backend = scripted(("sleep", 2.0), ("ok",), timeout_s=0.4)
    assert ask(backend)[0].text == "<answer>1</answer>" and len(script.requests) == 2


def test_dropped_connections_are_retried(scripted):
    script, backend = scripted(("drop",), ("ok",))
    assert ask(backend)[0].text == "<answer>1</answer>" and len(script.requests) == 2


def test_client_errors_are_not_retried_and_never_show_the_key(scripted, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    script, backend = scripted(("status", 401))
    with pytest.raises(TgrlError) as info:
        ask(backend)
    assert len(script.requests) == 1  # 401 is final
    assert "HTTP 401" in str(info.value) and "echo Bearer ***" in str(
        info.value
    )  # the echoed key is scrubbed
    _, backend = scripted(("status", 500))
    with pytest.raises(TgrlError) as info:
        ask(backend)
    assert "giving up after 4 attempts" in str(info.value)
    captured = capsys.readouterr()
    for text in (str(info.value), caplog.text, captured.out, captured.err, repr(backend.__dict__)):
        assert KEY not in text


def test_fewer_choices_than_n_are_asked_for_again(scripted):
    one = {"choices": [{"message": {"content": "a"}, "finish_reason": "length"}]}
    script, backend = scripted(("ok", one))
    completions = ask(backend, samples=3)
    assert [c.text for c in completions] == ["a", "a", "a"] and completions[0].finish_reason == "length"
    assert [r["body"]["n"] for r in script.requests] == [3, 2, 1]
    assert len({r["body"]["seed"] for r in script.requests}) == 3  # each round draws anew


def test_malformed_answers_and_bad_urls_are_clear_errors(scripted):
    _, backend = scripted(("ok", {"nothing": 1}))
    with pytest.raises(TgrlError, match="the answer has no `choices` list"):
        ask(backend)
    with pytest.raises(TgrlError, match="base_url must start with http"):
        ChatClient("localhost:8000/v1")
    with pytest.raises(TgrlError, match="needs base_url"):
        OpenAIBackend(OpenAIConfig(), "m")


def test_connection_refused_is_retried_then_reported():
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = ChatClient(f"http://127.0.0.1:{port}/v1", max_retries=2, backoff_s=0.01)
    with pytest.raises(TgrlError, match="giving up after 3 attempts: cannot connect"):
        client.post("/chat/completions", {})
    assert client.stats.requests == 3 and client.stats.failures == 1


def test_images_become_data_url_parts():
    messages = to_openai_messages("What colour?", "data:image/png;base64,AAAA")
    parts = messages[1]["content"]
    assert parts[0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert parts[1] == {"type": "text", "text": "What colour?"}
    with pytest.raises(TgrlError, match="no image was given"):
        to_openai_messages([{"role": "user", "content": [{"type": "image"}]}], None)


# ------------------------------------------------------------------------- tgrl serve (tiny model)
@pytest.fixture(scope="module")
def problems(tmp_path_factory) -> Path:
    from tgrl_lib.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("openai") / "problems"
    synthesize(root, n=4, seed=5)
    return root


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    """`tgrl_lib.generation.serve` over the tiny model, in this process, on a free loopback port."""
    from tgrl_lib.generation.serve import make_server

    server = make_server(tiny_model_dir, "127.0.0.1", 0, served_name="tiny")
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    server.server_close()


def test_generate_through_the_server_matches_the_local_backend(served, problems, tiny_model_dir, tmp_path):
    from tgrl_lib.data.images import load_image
    from tgrl_lib.data.prompts import render_prompt
    from tgrl_lib.generation.hf import HFBackend

    config = GenerateConfig(
        backend={"kind": "openai", "openai": {"base_url": served}},
        model="tiny",
        samples_per_problem=2,
        sampling={"temperature": 1.0, "max_new_tokens": 12},
    )
    report = generate_trajectories(problems, tmp_path / "traj", config, rejected_dir=tmp_path / "rej")
    assert report.trajectories == 8 and report.problems == 4 and report.rejected == 0
    written = load_dataset(tmp_path / "traj").records
    assert {t.source for t in written} == {"expert:tiny"}
    dataset = load_dataset(problems)
    local = HFBackend.from_pretrained(str(tiny_model_dir))
    seed = batch_seed(config.seed, [p.id for p in dataset.records])
    for i, problem in enumerate(dataset.records):
        prompt = render_prompt(local.processor, problem.question, problem.choices)
        image = load_image(dataset.image_path(problem))
        expected = local.generate(
            [prompt], [image], samples=2, temperature=1.0, max_new_tokens=12, seed=seed + i
        )
        got = sorted((t for t in written if t.problem_id == problem.id), key=lambda t: t.meta["sample"])
        assert [t.text for t in got] == [c.text for c in expected[0]]
        assert [t.meta["finish_reason"] for t in got] == [c.finish_reason for c in expected[0]]
