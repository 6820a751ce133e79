"""``make demo``'s script end to end: it starts its own server, builds the example, runs a
VM, calls it, suspends it, calls it again (auto-resume, the count goes on), terminates it and
stops the server — and does all of it again when run a second time."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from tests.framework.integration_cache import test_cache_dir

pytestmark = pytest.mark.timeout(1500)

DEMO_PORTS = (8700, 8443, 8780)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def _run_demo(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "EMBERVM_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [sys.executable, "-m", "embervm.demo"],
        env=env, capture_output=True, text=True, timeout=1400, check=False,
    )  # fmt: skip


def _counts(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"HTTP 200 count: (\d+)", output)]


def test_make_demo_runs_end_to_end_twice(tmp_path: Path, guest_artifacts: object) -> None:
    if not all(_port_free(port) for port in DEMO_PORTS):
        pytest.skip("a server already listens on the demo's default ports")
    (tmp_path / "artifacts").symlink_to(test_cache_dir() / "artifacts")
    for _ in range(2):
        done = _run_demo(tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        out = done.stdout
        assert "Traceback" not in out + done.stderr
        assert re.search(r"==> run: \S+ RUNNING \(\d+\.\d+ s\)", out), out
        assert re.search(r"==> suspend: \S+ SUSPENDED \(\d+\.\d+ s\)", out), out
        assert re.search(r"==> terminate: \S+ TERMINATED", out), out
        assert _counts(out) == [1, 2, 3], out  # a new VM each run; the count survives suspend
        assert "==> server: stopped" in out
        assert "demo finished" in out
    assert all(_port_free(port) for port in DEMO_PORTS)  # the server it started is gone
