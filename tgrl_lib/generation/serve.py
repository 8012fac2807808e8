"""`tgrl serve`: a small OpenAI-compatible chat-completions server over a local model (the `hf` backend).

Routes: `POST /v1/chat/completions`, `GET /v1/models`, `GET /health`. It lets a machine without vLLM or a
GPU act as the `openai` expert (and the tests run that backend against a real server). What a request may
hold and how it reaches the model is `generation.chat`; this module is the HTTP side, bounded in
connections, time and bytes (`ServeLimits`). With `api_key_env` set, requests must carry
`Authorization: Bearer <key>`.

- Listen backlog `ServeLimits.backlog` (socketserver's default of 5 reset connections under a burst).
- At most `max_connections` handler threads. A connection over the limit is answered 503 by one janitor
  thread without a thread of its own: the answer is sent, the socket half-closed and kept until the client
  closes it (or 2 s), so the kernel never resets a connection whose request was left unread.
- Every socket has a timeout (`socket_timeout_s`) and every request a deadline for its headers and body
  (`read_deadline_s`; the janitor shuts down a connection still reading past it: a slow client cannot
  hold a thread by trickling bytes).
- The body: a decimal `Content-Length` up to `max_body_bytes` (411 without one, 413 over it); JSON nested
  deeper than the interpreter allows is a 400, like any other invalid JSON.
- Every error, including those the stdlib handler raises itself (malformed request line, oversized
  headers, unknown methods), is an OpenAI-style JSON body.
"""

from __future__ import annotations

import contextlib
import json
import queue
import selectors
import socket
import sys
import threading
import time
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tgrl_lib.env import read_env
from tgrl_lib.errors import TgrlError
from tgrl_lib.generation.chat import ModelServer, RequestError, ServeLimits

REFUSAL_LINGER_S = 2.0
MAX_LINGERING = 1024


def _error_body(status: int, message: str, kind: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode("utf-8")


_BUSY = _error_body(503, "too many open connections; retry shortly", "server_error", "too_many_connections")
REFUSAL = (
    b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: " + str(len(_BUSY)).encode() + b"\r\n\r\n" + _BUSY
)


class _Janitor(threading.Thread):
    """One thread that answers over-limit connections (503) and shuts down requests past their deadline."""

    def __init__(self) -> None:
        super().__init__(name="tgrl-serve-janitor", daemon=True)
        self.inbox: queue.SimpleQueue[socket.socket] = queue.SimpleQueue()
        self.selector = selectors.DefaultSelector()
        self.lingering: dict[socket.socket, float] = {}
        self.deadlines: dict[socket.socket, float] = {}
        self.guard = threading.Lock()
        self.stopped = threading.Event()

    def watch(self, sock: socket.socket, seconds: float) -> None:
        with self.guard:
            self.deadlines[sock] = time.monotonic() + seconds

    def unwatch(self, sock: socket.socket) -> None:
        with self.guard:
            self.deadlines.pop(sock, None)

    def run(self) -> None:
        while not self.stopped.is_set():
            self._take_refusals()
            if self.lingering:
                for key, _ in self.selector.select(timeout=0.05):
                    self._drain(key.fileobj)  # type: ignore[arg-type]
            else:
                time.sleep(0.05)
            now = time.monotonic()
            for sock, until in list(self.lingering.items()):
                if until < now:
                    self._close(sock)
            with self.guard:
                late = [sock for sock, until in self.deadlines.items() if until < now]
                for sock in late:
                    del self.deadlines[sock]
            for sock in late:  # the handler's read fails at once and it answers 408 or gives up
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RD)

    def _take_refusals(self) -> None:
        while True:
            try:
                sock = self.inbox.get_nowait()
            except queue.Empty:
                return
            try:
                if len(self.lingering) >= MAX_LINGERING:
                    raise OSError("too many lingering refusals")
                sock.setblocking(False)
                sock.send(REFUSAL)  # a few hundred bytes: fits an empty send buffer
                sock.shutdown(socket.SHUT_WR)
                self.selector.register(sock, selectors.EVENT_READ)
                self.lingering[sock] = time.monotonic() + REFUSAL_LINGER_S
            except OSError:
                sock.close()

    def _drain(self, sock: socket.socket) -> None:
        try:
            if sock.recv(65536):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        self._close(sock)

    def _close(self, sock: socket.socket) -> None:
        self.lingering.pop(sock, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)
        sock.close()


class BoundedHTTPServer(ThreadingHTTPServer):
    """`ThreadingHTTPServer` with a real backlog, a cap on handler threads and a janitor (module docs)."""

    daemon_threads = True
    model_server: ModelServer

    def __init__(self, address: tuple[str, int], handler: type, model_server: ModelServer):
        self.model_server, self.limits = model_server, model_server.limits
        self.request_queue_size = self.limits.backlog  # read by server_activate (listen)
        self.slots = threading.BoundedSemaphore(self.limits.max_connections)
        self.janitor = _Janitor()
        super().__init__(address, handler)
        self.janitor.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.janitor.inbox.put(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.janitor.unwatch(request)
            self.slots.release()

    def shutdown_request(self, request: Any) -> None:
        """Close gracefully: half-close, then drain what the client still sends (up to 1 MiB, 1 s) before
        closing, since closing a socket with unread bytes makes the kernel reset the connection and the
        client may lose the answer (a refused body is never read)."""
        with contextlib.suppress(OSError):
            request.shutdown(socket.SHUT_WR)
            request.settimeout(0.2)
            deadline, drained = time.monotonic() + 1.0, 0
            while drained < 1024 * 1024 and time.monotonic() < deadline:
                chunk = request.recv(65536)
                if not chunk:
                    break
                drained += len(chunk)
        self.close_request(request)

    def server_close(self) -> None:
        self.janitor.stopped.set()
        super().server_close()


class _Handler(BaseHTTPRequestHandler):
    server_version = "tgrl-serve/1"
    server: BoundedHTTPServer

    def setup(self) -> None:
        self.timeout = self.server.limits.socket_timeout_s  # read by StreamRequestHandler.setup
        super().setup()
        self.server.janitor.watch(self.connection, self.server.limits.read_deadline_s)

    def handle(self) -> None:
        try:
            super().handle()
        except (ConnectionError, TimeoutError, OSError):
            self.close_connection = True  # the client went away or stalled: nothing left to answer

    def _send(self, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, err: RequestError) -> None:
        payload = {"error": {"message": str(err), "type": err.kind, "code": err.code}}
        self._send(err.status, payload, err.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The stdlib's own refusals (bad request line, headers too large, unknown method) as JSON."""
        if code == HTTPStatus.NOT_IMPLEMENTED:  # an unknown method is the client's error
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command!r} is not allowed"
        self.close_connection = True
        self.request_version = "HTTP/1.0"  # answer with a status line even when the request line was garbage
        phrase = self.responses.get(code, ("error",))[0]
        self._error(RequestError(code, message or phrase, code=phrase.lower().replace(" ", "_")))

    def do_GET(self) -> None:
        self.server.janitor.unwatch(self.connection)
        model_server = self.server.model_server
        if self.path.rstrip("/") == "/health":
            self._send(200, {"status": "ok"})
        elif not model_server.authorised(self.headers.get("Authorization")):
            self._error(
                RequestError(401, "missing or wrong API key", "authentication_error", "invalid_api_key")
            )
        elif self.path.rstrip("/") == "/v1/models":
            self._send(200, model_server.models())
        else:
            self._error(RequestError(404, f"no route {self.path[:200]}", "not_found_error", "not_found"))

    def do_POST(self) -> None:
        model_server = self.server.model_server
        try:
            if self.path.rstrip("/") != "/v1/chat/completions":
                raise RequestError(404, f"no route {self.path[:200]}", "not_found_error", "not_found")
            if not model_server.authorised(self.headers.get("Authorization")):
                raise RequestError(401, "missing or wrong API key", "authentication_error", "invalid_api_key")
            body = self._read_json()
            self.server.janitor.unwatch(self.connection)
            self._send(200, model_server.chat(body))
        except RequestError as err:
            self.close_connection = True
            self._error(err)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:  # a bug or a model failure: answer 500 and keep the traceback in the log
            traceback.print_exc(file=sys.stderr)
            self.close_connection = True
            self._error(
                RequestError(
                    500,
                    "internal error while generating (see the server log)",
                    "server_error",
                    "internal_error",
                )
            )

    def _read_json(self) -> Any:
        """The request body as JSON, read within the limits (module docstring)."""
        limit = self.server.limits.max_body_bytes
        if self.headers.get("Transfer-Encoding"):
            raise RequestError(
                411, "chunked bodies are not supported: send a Content-Length", code="length_required"
            )
        values = self.headers.get_all("Content-Length") or []
        if not values:
            raise RequestError(411, "a Content-Length header is required", code="length_required")
        text = values[0].strip()
        if len(set(values)) > 1 or not (text.isascii() and text.isdigit()):
            raise RequestError(
                400, f"Content-Length must be one decimal number, got {', '.join(values)[:60]!r}"
            )
        length = int(text[:20])
        if not 0 < length <= limit:
            raise RequestError(
                413 if length else 400,
                f"the body must be 1..{limit} bytes, got {length}",
                code="body_too_large" if length else "empty_body",
            )
        try:
            data = self.rfile.read(length)
        except TimeoutError:
            raise RequestError(408, "the body did not arrive in time", code="request_timeout") from None
        except OSError:
            raise RequestError(
                408, "the body did not arrive before the read deadline", code="request_timeout"
            ) from None
        if len(data) < length:
            raise RequestError(
                400, f"the body ended after {len(data)} of {length} bytes", code="truncated_body"
            )
        try:
            return json.loads(data)
        except RecursionError:
            raise RequestError(400, "the JSON body is nested too deeply", code="invalid_json") from None
        except ValueError as err:
            raise RequestError(
                400, f"the body is not valid JSON ({str(err)[:120]})", code="invalid_json"
            ) from None

    def log_message(self, format: str, *args: Any) -> None:
        sys.stderr.write(f"tgrl serve: {self.address_string()} {format % args}\n")


def make_server(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    limits: ServeLimits | None = None,
    **kwargs: Any,
) -> BoundedHTTPServer:
    """A bound (not yet serving) server; port 0 picks a free port (`server.server_address[1]`).
    `kwargs` go to `ModelServer` (`served_name`, `api_key`)."""
    model_server = ModelServer(model_dir, limits=limits, **kwargs)
    try:
        return BoundedHTTPServer((host, port), _Handler, model_server)
    except OSError as err:
        raise TgrlError(
            f"cannot listen on {host}:{port} ({err.strerror})", hint="pick another --port"
        ) from None


def serve(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    served_name: str | None = None,
    api_key_env: str | None = None,
    limits: ServeLimits | None = None,
) -> None:
    """Serve until interrupted; prints the base URL to use as `--base-url`."""
    api_key = read_env(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise TgrlError(f"--api-key-env {api_key_env} is not set in the environment")
    server = make_server(model_dir, host, port, served_name=served_name, api_key=api_key, limits=limits)
    bound_host, bound_port = server.server_address[:2]
    name = server.model_server.name
    print(f"tgrl serve: model {name!r} at http://{bound_host}:{bound_port}/v1 (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
