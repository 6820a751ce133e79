"""Running ``embervm`` as a user does (a subprocess) against a live API (``core_live_server``).

- ``cli(server, *args)`` runs one command to its end and fails the test if a traceback reached
  the user; ``as_json``/``json_lines`` read ``--output json``;
- ``Following`` runs a command that streams (``logs --follow``) and reads its lines as they
  come, each read bounded;
- ``FollowingAppLogs``: the fake app-log source, but its followers wait for lines the test
  pushes from its own thread and stop when told the VM ended (as the real one does).
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.framework.core_live_server import CoreServer
from tests.framework.fake_core import FakeAppLogs

EMBERVM = [sys.executable, "-m", "embervm.cli"]
UNREACHABLE_URL = "http://127.0.0.1:9"  # discard port: nothing listens there


def argv(
    server: CoreServer | None, args: tuple[str, ...], data_dir: Path | None, url: str | None
) -> list[str]:
    data = data_dir or (server.data_dir if server else Path("/nonexistent"))
    endpoint = url or (server.url if server else UNREACHABLE_URL)
    return [*EMBERVM, "--data-dir", str(data), "--endpoint-url", endpoint, *args]


def cli(
    server: CoreServer | None,
    *args: str,
    data_dir: Path | None = None,
    url: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run one command; whatever it does, no traceback may reach the user."""
    done = subprocess.run(
        argv(server, args, data_dir, url),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def json_lines(done: subprocess.CompletedProcess[str]) -> list[Any]:
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def one_error_line(done: subprocess.CompletedProcess[str]) -> str:
    """The single ``error: ...`` line a failed command prints on stderr."""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: "), lines
    return lines[0]


class Following:
    """A streaming command; ``line()`` waits (bounded) for its next line of output."""

    def __init__(self, server: CoreServer, *args: str) -> None:
        self.proc = subprocess.Popen(
            argv(server, args, None, None),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        assert self.proc.stdout is not None
        self._out = self.proc.stdout
        self._buffer = b""

    def line(self, timeout: float = 30) -> str:
        with selectors.DefaultSelector() as selector:
            selector.register(self._out, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                if not selector.select(timeout):
                    raise AssertionError(f"no line within {timeout} s: {self._buffer!r}")
                chunk = os.read(self._out.fileno(), 65536)
                if not chunk:
                    raise AssertionError(f"output ended: {self._buffer!r}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode()

    def wait(self, timeout: float = 30) -> tuple[int, str, str]:
        """Exit code, the rest of stdout, and stderr."""
        out, err = self.proc.communicate(timeout=timeout)
        rest = (self._buffer + out).decode()
        assert "Traceback" not in rest + err.decode(), err
        return self.proc.returncode, rest, err.decode()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate(timeout=30)


@dataclass
class FollowingAppLogs(FakeAppLogs):
    """App logs whose followers, after the canned lines, get what ``push`` sends (from any
    thread) until ``end``; ``readers`` counts followers still attached."""

    _queues: dict[str, asyncio.Queue[str | None]] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    readers: int = 0

    async def lines(self, microvm_id: str, *, follow: bool) -> AsyncIterator[str]:
        self._loop = asyncio.get_running_loop()
        for line in self.logs.get(microvm_id, []):
            yield line
        if not follow:
            return
        queue = self._queues.setdefault(microvm_id, asyncio.Queue())
        self.readers += 1
        try:
            while (line := await queue.get()) is not None:
                yield line
        finally:
            self.readers -= 1

    def push(self, microvm_id: str, line: str | None) -> None:
        assert self._loop is not None, "no follower has started yet"
        queue = self._queues.setdefault(microvm_id, asyncio.Queue())
        self._loop.call_soon_threadsafe(queue.put_nowait, line)

    def end(self, microvm_id: str) -> None:
        self.push(microvm_id, None)
