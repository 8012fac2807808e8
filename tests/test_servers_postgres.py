"""The PostgreSQL test server itself (tests/servers.py): never root, loopback TCP only, password auth,
fresh databases dropped even while a client holds a connection, and a test process killed outright
(SIGKILL: no fixture teardown) takes its PostgreSQL with it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")


def test_cluster_is_not_root_and_needs_the_password(postgres_server):
    import psycopg

    status = Path(f"/proc/{postgres_server.process.proc.pid}/status").read_text()
    uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
    assert uid != 0
    with postgres_server.connect() as conn:  # positive control: the right password
        assert conn.execute("SHOW listen_addresses").fetchone() == ("127.0.0.1",)
        assert conn.execute("SHOW unix_socket_directories").fetchone() == ("",)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(
            host="127.0.0.1", port=postgres_server.port, user=postgres_server.user, password="wrong",
            dbname="postgres", connect_timeout=5,
        )  # fmt: skip


def test_fresh_database_is_dropped_while_a_client_is_connected(postgres_server):
    name = postgres_server.create_database("drop")
    client = postgres_server.connect(name)  # like a server's connection pool left open
    try:
        client.execute("CREATE TABLE t (x int)")
        postgres_server.drop_database(name)
        with postgres_server.connect() as conn:
            assert conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None
    finally:
        client.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_a_killed_test_process_takes_its_postgres_with_it(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from servers import start_postgres
        server = start_postgres(__import__("pathlib").Path({str(tmp_path)!r}))
        print(server.process.proc.pid, server.root, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid, root = None, None
    try:
        pid, root = parent.stdout.readline().split()
        server_pid = int(pid)
        assert _alive(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 30
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server_pid), "PostgreSQL outlived the process that started it"
        assert "fast shutdown" in (tmp_path / "postgres.log").read_text()  # PDEATHSIG = SIGINT
    finally:
        parent.kill()
        parent.wait()
        if server_pid is not None and _alive(server_pid):  # the test failed: do not leave it running
            os.killpg(server_pid, signal.SIGKILL)
        if root is not None:  # nobody ran stop(): the cluster directory is left behind
            shutil.rmtree(root, ignore_errors=True)
