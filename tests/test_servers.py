"""The test servers themselves: a test run killed outright (SIGKILL, so no fixture teardown) must not leave
its S3 endpoint or MLflow server running."""

import os
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
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has exited


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux only")
def test_a_killed_test_process_takes_its_server_with_it(tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        sys.path.insert(0, {str(TESTS)!r})
        from servers import http_ok, start_moto
        server = start_moto({str(tmp_path)!r})
        assert http_ok(server.url + "/moto-api/data.json")
        print(server.proc.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    server_pid = None
    try:
        server_pid = int(parent.stdout.readline())
        assert _alive(server_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 20
        while _alive(server_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(server_pid), "the S3 endpoint outlived the process that started it"
    finally:
        parent.kill()
        parent.wait()
        if server_pid is not None and _alive(server_pid):  # the test failed: do not leave it running
            os.killpg(server_pid, signal.SIGKILL)
