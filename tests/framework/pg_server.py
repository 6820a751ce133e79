"""A real PostgreSQL server for tests: Debian's ``postgresql`` package (installed by
``scripts/setup.sh``), run by the ``postgres`` user in a temp dir, on 127.0.0.1:<free port>."""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

PG_USER = "postgres"


def _bin_dir() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _as_postgres(argv: list[str]) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else []
    return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120,
                          check=True)  # fmt: skip


@contextmanager
def postgres_server() -> Iterator[str]:
    """Yield an asyncpg SQLAlchemy URL of a fresh database; stop and remove it afterwards."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries missing: run `make setup` (installs postgresql)")
    root = Path(tempfile.mkdtemp(prefix="embervm-pg-"))
    data, sock_dir = root / "data", root / "sock"
    sock_dir.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, PG_USER)
        shutil.chown(sock_dir, PG_USER)
    port = _free_port()
    try:
        _as_postgres([str(bin_dir / "initdb"), "-D", str(data), "-U", "embervm",
                      "--auth=trust", "-E", "UTF8"])  # fmt: skip
        _as_postgres([str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"),
                      "-o", f"-h 127.0.0.1 -p {port} -k {sock_dir} -c fsync=off", "-w",
                      "start"])  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run(
                [str(bin_dir / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)],
                capture_output=True, check=False,
            )  # fmt: skip
            if ready.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start")
            time.sleep(0.2)
        _as_postgres([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                      "-U", "embervm", "embervm"])  # fmt: skip
        yield f"postgresql+asyncpg://embervm@127.0.0.1:{port}/embervm"
    finally:
        subprocess.run(
            (["runuser", "-u", PG_USER, "--"] if os.geteuid() == 0 else [])
            + [str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True, check=False, timeout=60,
        )  # fmt: skip
        shutil.rmtree(root, ignore_errors=True)
