"""Real servers for integration tests: a local S3 endpoint (moto), PostgreSQL, and an MLflow tracking
server on SQLite or on PostgreSQL.

Each server is a child process in its own process group on a free loopback port, started with a readiness
deadline (poll its health URL) and stopped by process group (SIGTERM, then SIGKILL). `ServerProcess` can
be stopped, paused (SIGSTOP: the port stays open but nothing answers) and restarted on the same port, for
fault-injection tests.

moto keeps its state in memory, so a restarted endpoint starts empty. `start_moto(buckets=...)` runs the
moto server entry point (the same `moto.server:main` as `.venv/bin/moto_server`) through a two-line
launcher that creates the buckets in-process *before* the port opens, so no client can ever see the
restarted endpoint without its bucket (a race a create-after-start would have).

PostgreSQL (`start_postgres`) is the Debian/PGDG server binary (`initdb`, `postgres`; set-up:
scripts/install-tools.sh) on a fresh cluster in a temporary directory, listening on loopback TCP only
(no Unix socket), with a generated password. PostgreSQL refuses to run as root, so when the tests run
as root the cluster belongs to the `postgres` system user (created if missing) and both `initdb` and
the server run as that user. Durability is switched off (fsync, synchronous_commit): test data only.

Run by hand: `python tests/servers.py moto`, `python tests/servers.py mlflow` or
`python tests/servers.py mlflow-postgres` prints the URLs and serves until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

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


def _die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None]:
    """A pre-exec hook for the server's child process (Linux): have the kernel send it `sig` when the test
    process that started it exits, even by SIGKILL, so an interrupted test run leaves no server running
    (fixture teardown, which stops servers by PID, never runs then). Elsewhere a no-op. The signal follows
    the starting thread, so it is set only for servers started from the main thread. subprocess switches
    to `user=` before it calls the hook, so the setting survives the drop of root (a change of
    credentials clears it)."""

    def hook() -> None:
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, sig)

    return hook


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


def _as_user(user: str | None) -> dict:
    """subprocess keywords that run a child as `user` (with its primary group, no others)."""
    if user is None:
        return {}
    account = pwd.getpwnam(user)
    return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}


class ServerProcess:
    """A server subprocess on a fixed port: `start()`, `stop()`, `restart()`, `pause()`, `resume()`.

    Ready when `health_path` answers over HTTP, or when `ready()` says so for a server that does not
    speak HTTP. `stop_signal` asks it to shut down (PostgreSQL: SIGINT, its fast shutdown); the same
    signal reaches it when the test process dies. `user` runs it as another account (needs root)."""

    def __init__(
        self,
        name: str,
        argv: Callable[[int], Sequence[str]],
        *,
        health_path: str = "",
        ready: Callable[[ServerProcess], bool] | None = None,
        env: dict[str, str] | None = None,
        log_dir: Path,
        port: int | None = None,
        start_timeout: float = 90.0,
        stop_signal: int = signal.SIGTERM,
        user: str | None = None,
        cwd: Path | None = None,
    ):
        self.name = name
        self._argv = argv
        self.health_path = health_path
        self._ready = ready or (lambda server: http_ok(server.url + server.health_path))
        self.env = {**os.environ, **(env or {})}
        self.log_path = Path(log_dir) / f"{name}.log"
        self.port = port or free_port()
        self.start_timeout = start_timeout
        self.stop_signal = stop_signal
        self.user = user
        self.cwd = cwd
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
                cwd=self.cwd,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: stop() ends workers too
                preexec_fn=_die_with_parent(self.stop_signal) if main_thread else None,
                **_as_user(self.user),
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
            if self._ready(self):
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
        """`stop_signal` (SIGTERM) to the process group, SIGKILL what is left after `timeout`; idempotent."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._signal_group(signal.SIGCONT)  # a paused server cannot act on SIGTERM
            self._signal_group(self.stop_signal)
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


# ------------------------------------------------------------------------------------------- PostgreSQL
POSTGRES_USER = "tgrl"  # the database superuser of the test cluster (not a system account)
POSTGRES_SYSTEM_USER = "postgres"  # the account that owns and runs the cluster when the tests run as root


def find_postgres_bin() -> Path | None:
    """Directory with `initdb` and `postgres`: $TGRL_POSTGRES_BIN, else the newest
    /usr/lib/postgresql/<version>/bin (Debian, scripts/install-tools.sh), else `initdb` on PATH."""
    candidates = [os.environ["TGRL_POSTGRES_BIN"]] if os.environ.get("TGRL_POSTGRES_BIN") else []
    versions = [p for p in glob.glob("/usr/lib/postgresql/*/bin") if Path(p).parent.name.isdigit()]
    candidates += sorted(versions, key=lambda p: int(Path(p).parent.name), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).parent))
    for candidate in candidates:
        if all(os.access(Path(candidate) / tool, os.X_OK) for tool in ("initdb", "postgres")):
            return Path(candidate)
    return None


def _postgres_account() -> str | None:
    """None when the tests are not root (the cluster is then the tests' own); as root the `postgres`
    system account, created (no login, no home) when the machine lacks it."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(POSTGRES_SYSTEM_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", POSTGRES_SYSTEM_USER],
            check=True,
            capture_output=True,
            timeout=60,
        )
    return POSTGRES_SYSTEM_USER


@dataclass
class PostgresServer:
    """A running PostgreSQL cluster: `uri(db)` for SQLAlchemy/MLflow, `create_database()` for a fresh
    empty database, `stop()` ends the server (by PID) and deletes the cluster."""

    process: ServerProcess
    root: Path  # cluster directory (data/, pwfile): deleted by stop()
    password: str
    user: str = POSTGRES_USER

    @property
    def port(self) -> int:
        return self.process.port

    def uri(self, database: str = "postgres") -> str:
        """`postgresql://USER:PASSWORD@127.0.0.1:PORT/DATABASE` (SQLAlchemy picks psycopg 3 for it)."""
        return f"postgresql://{self.user}:{quote(self.password, safe='')}@127.0.0.1:{self.port}/{database}"

    def connect(self, database: str = "postgres", timeout: int = 5):
        """An autocommit psycopg connection (psycopg 3: SQLAlchemy 2.1's default PostgreSQL driver)."""
        import psycopg

        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname=database,
            connect_timeout=timeout,
            autocommit=True,
        )

    def create_database(self, prefix: str = "test", template: str | None = None) -> str:
        """A new database with a unique name, empty or a copy of `template` (which must have no open
        connections); returns its name."""
        name = f"{prefix}_{secrets.token_hex(4)}"
        copy = f' TEMPLATE "{template}"' if template else ""
        with self.connect() as conn:
            conn.execute(f'CREATE DATABASE "{name}"{copy}')
        return name

    def drop_database(self, name: str) -> None:
        """Drop `name`, ending sessions still connected to it (a client's connection pool)."""
        with self.connect() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        self.process.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def _postgres_ready(server: ServerProcess, password: str) -> bool:
    import psycopg

    try:
        psycopg.connect(
            host="127.0.0.1",
            port=server.port,
            user=POSTGRES_USER,
            password=password,
            dbname="postgres",
            connect_timeout=1,
        ).close()
        return True
    except psycopg.OperationalError:
        return False


def start_postgres(log_dir: Path, bin_dir: Path | None = None, port: int | None = None) -> PostgresServer:
    """`initdb` a fresh cluster in a temporary directory and start `postgres` on 127.0.0.1 (TCP only).

    The cluster lives outside pytest's tmp tree: that tree is private to the tests' user, which the
    `postgres` account (as root) cannot enter."""
    bin_dir = bin_dir or find_postgres_bin()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL not found (initdb, postgres): run scripts/install-tools.sh")
    account = _postgres_account()
    root = Path(tempfile.mkdtemp(prefix="tgrl-postgres-"))
    password = secrets.token_urlsafe(16)
    (root / "pwfile").write_text(password + "\n")
    if account is not None:
        owner = pwd.getpwnam(account)
        for path in (root, root / "pwfile"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    init = [
        str(bin_dir / "initdb"), "--pgdata", str(root / "data"), "--username", POSTGRES_USER,
        "--pwfile", str(root / "pwfile"), "--auth", "scram-sha-256", "--encoding", "UTF8",
        "--no-locale", "--no-sync", "--no-instructions",
    ]  # fmt: skip
    done = subprocess.run(init, capture_output=True, text=True, timeout=180, cwd=root, **_as_user(account))
    if done.returncode != 0:
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"initdb failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    settings = {
        "listen_addresses": "127.0.0.1",
        "unix_socket_directories": "",  # TCP only: no socket file in a shared directory
        "fsync": "off",
        "synchronous_commit": "off",
        "full_page_writes": "off",
        "max_connections": "200",  # MLflow pools per process x kfp.local task processes
    }

    def argv(p: int) -> list[str]:
        flags = [f"--{key}={value}" for key, value in settings.items()]
        return [str(bin_dir / "postgres"), "-D", str(root / "data"), "-p", str(p), *flags]

    process = ServerProcess(
        "postgres",
        argv,
        ready=lambda server: _postgres_ready(server, password),
        log_dir=log_dir,
        port=port,
        start_timeout=60.0,
        stop_signal=signal.SIGINT,  # "fast" shutdown: SIGTERM would wait for every client to leave
        user=account,
        cwd=root,
    )
    try:
        process.start()
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return PostgresServer(process=process, root=root, password=password)


def start_mlflow(
    work_dir: Path,
    s3_endpoint: str,
    bucket: str = DEFAULT_BUCKET,
    port: int | None = None,
    extra_env: dict[str, str] | None = None,
    backend_store_uri: str | None = None,
    name: str = "mlflow",
    migrate: bool = True,
) -> ServerProcess:
    """`mlflow server` with artifacts proxied to `s3://bucket/mlflow` on the given endpoint; its backend
    store is `backend_store_uri` (e.g. `PostgresServer.uri(db)`), by default a SQLite file in `work_dir`.

    A database store is migrated first with `mlflow db upgrade`, as the chart's pre-install hook does,
    so the server starts on an up-to-date schema (`migrate=False`: it is migrated already, or empty and
    left to the server). The URI reaches the server in MLFLOW_BACKEND_STORE_URI, not on its command
    line (as in the chart: it holds the password)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    store = backend_store_uri or f"sqlite:///{work_dir / 'mlflow.db'}"
    env = {
        **DUMMY_AWS,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_BACKEND_STORE_URI": store,
        **(extra_env or {}),
    }
    if backend_store_uri is not None and migrate:
        mlflow_db_upgrade(store, work_dir / f"{name}-db-upgrade.log")

    def argv(p: int) -> list[str]:
        return [
            str(VENV_BIN / "mlflow"),
            "server",
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
        name, argv, health_path="/health", env=env, log_dir=work_dir, port=port, start_timeout=120.0
    )
    return server.start()


def mlflow_db_upgrade(store_uri: str, log_path: Path, timeout: float = 300.0) -> None:
    """`mlflow db upgrade STORE_URI`: create or migrate the tracking schema (the chart's migration Job)."""
    cmd = [str(VENV_BIN / "mlflow"), "db", "upgrade", store_uri]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    log_path.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(
            f"mlflow db upgrade failed ({done.returncode}); log:\n{log_path.read_text()[-4000:]}"
        )


if __name__ == "__main__":  # manual use: serve until Ctrl-C
    import tempfile

    kind = sys.argv[1] if len(sys.argv) > 1 else "moto"
    tmp = Path(tempfile.mkdtemp(prefix="tgrl-servers-"))
    servers: list = [start_moto(tmp)]
    store = None
    if kind == "mlflow-postgres":
        servers.append(start_postgres(tmp))
        store = servers[-1].uri(servers[-1].create_database("mlflow"))
        print(f"postgres: {store}", flush=True)
    if kind.startswith("mlflow"):
        servers.append(start_mlflow(tmp, servers[0].url, backend_store_uri=store))
    for srv in servers:
        if isinstance(srv, ServerProcess):
            print(f"{srv.name}: {srv.url} (log {srv.log_path})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        for srv in reversed(servers):
            srv.stop()
