"""Real servers for integration tests: a local S3 endpoint (moto) and an MLflow tracking server.

Each server is a child process in its own process group on a free loopback port, started with a readiness
deadline (poll its health URL) and stopped by process group (SIGTERM, then SIGKILL). `ServerProcess` can
be stopped, paused (SIGSTOP: the port stays open but nothing answers) and restarted on the same port, for
fault-injection tests.

moto keeps its state in memory, so a restarted endpoint starts empty. `start_moto(buckets=...)` runs the
moto server entry point (the same `moto.server:main` as `.venv/bin/moto_server`) through a two-line
launcher that creates the buckets in-process *before* the port opens, so no client can ever see the
restarted endpoint without its bucket (a race a create-after-start would have).

Run by hand: `python tests/servers.py moto` or `python tests/servers.py mlflow` prints the URL and
serves until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

VENV_BIN = Path(sys.executable).parent
DUMMY_AWS = {
    "AWS_ACCESS_KEY_ID": "testing-access-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-access-key",
    "AWS_DEFAULT_REGION": "us-east-1",
}
DEFAULT_BUCKET = "tgrl-test"
PR_SET_PDEATHSIG = 1  # linux/prctl.h

# moto.server:main behind a launcher that creates buckets before the port opens (see module docstring).
_MOTO_LAUNCHER = """
import sys
from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import s3_backends
from moto.server import main
port, buckets = sys.argv[1], [b for b in sys.argv[2].split(",") if b]
for bucket in buckets:
    s3_backends[DEFAULT_ACCOUNT_ID]["aws"].create_bucket(bucket, "us-east-1")
sys.exit(main(["-H", "127.0.0.1", "-p", port]))
"""


def _die_with_parent() -> None:
    """In the server's child process before exec (Linux): have the kernel send it SIGTERM when the test
    process that started it exits, even by SIGKILL, so an interrupted test run leaves no server running
    (fixture teardown, which stops servers by PID, never runs then). Elsewhere a no-op. The signal follows
    the starting thread, so it is set only for servers started from the main thread."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when `url` answers 2xx/3xx/4xx (the server is up), False on connection errors or 5xx."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via an HTTP proxy
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status < 500
    except urllib.error.HTTPError as err:
        return err.code < 500
    except (OSError, urllib.error.URLError):
        return False


class ServerProcess:
    """A server subprocess on a fixed port: `start()`, `stop()`, `restart()`, `pause()`, `resume()`."""

    def __init__(
        self,
        name: str,
        argv: Callable[[int], Sequence[str]],
        *,
        health_path: str,
        env: dict[str, str] | None = None,
        log_dir: Path,
        port: int | None = None,
        start_timeout: float = 90.0,
    ):
        self.name = name
        self._argv = argv
        self.health_path = health_path
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_dir) / f"{name}.log"
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> ServerProcess:
        if self.running:
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 (handed to the child; closed below)
        # the kernel signals when the starting *thread* ends, and only the main thread lives as long as the
        # test process (a fault test restarts servers from a timer thread)
        main_thread = threading.current_thread() is threading.main_thread()
        try:
            self.proc = subprocess.Popen(
                list(self._argv(self.port)),
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() ends workers too
                preexec_fn=_die_with_parent if main_thread else None,
            )
        finally:
            log.close()
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited during start-up; log:\n{self.log_tail()}")
            if http_ok(self.url + self.health_path):
                return
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {self.start_timeout:.0f}s; log:\n{self.log_tail()}")

    def _signal_group(self, sig: int) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM the process group, SIGKILL what is left after `timeout`; idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self._signal_group(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        self._signal_group(signal.SIGKILL)  # workers that outlived their parent
        self.proc = None
        self._wait_port_free()

    def _wait_port_free(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(("127.0.0.1", self.port))
                    return
                except OSError:
                    time.sleep(0.1)

    def restart(self) -> ServerProcess:
        self.stop()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered (a hung endpoint)."""
        self._signal_group(signal.SIGSTOP)

    def resume(self) -> None:
        self._signal_group(signal.SIGCONT)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_moto(log_dir: Path, buckets: Sequence[str] = (DEFAULT_BUCKET,), port: int | None = None):
    """A moto S3 endpoint with `buckets` created before it accepts connections (also after a restart)."""
    joined = ",".join(buckets)
    server = ServerProcess(
        "moto",
        lambda p: [str(VENV_BIN / "python"), "-c", _MOTO_LAUNCHER, str(p), joined],
        health_path="/moto-api/data.json",
        env=DUMMY_AWS,
        log_dir=log_dir,
        port=port,
        start_timeout=60.0,
    )
    return server.start()


def start_mlflow(
    work_dir: Path,
    s3_endpoint: str,
    bucket: str = DEFAULT_BUCKET,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
) -> ServerProcess:
    """`mlflow server` on SQLite with artifacts proxied to `s3://bucket/mlflow` on the given endpoint."""
    work_dir.mkdir(parents=True, exist_ok=True)
    db = work_dir / "mlflow.db"
    env = {
        **DUMMY_AWS,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        **(extra_env or {}),
    }

    def argv(p: int) -> list[str]:
        return [
            str(VENV_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{db}",
            "--artifacts-destination",
            f"s3://{bucket}/mlflow",
            "--host",
            "127.0.0.1",
            "--port",
            str(p),
            "--workers",
            "1",
        ]

    server = ServerProcess(
        "mlflow", argv, health_path="/health", env=env, log_dir=work_dir, port=port, start_timeout=120.0
    )
    return server.start()


if __name__ == "__main__":  # manual use: serve until Ctrl-C
    import tempfile

    kind = sys.argv[1] if len(sys.argv) > 1 else "moto"
    tmp = Path(tempfile.mkdtemp(prefix="tgrl-servers-"))
    servers = [start_moto(tmp)]
    if kind == "mlflow":
        servers.append(start_mlflow(tmp, servers[0].url))
    for srv in servers:
        print(f"{srv.name}: {srv.url} (log {srv.log_path})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for srv in reversed(servers):
            srv.stop()
