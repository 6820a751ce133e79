"""Supervision of the image's app (CMD/ENTRYPOINT): start, restart policy, logs to the host.

Apps outlive host connections: a reconnect (or a restore) does not touch them. Their output is
split into lines (long lines are cut at ``MAX_LINE``) and shipped as ``app.log`` events; while no
host is connected the newest ``RING`` lines are kept and flushed after the next ``hello``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import children

MAX_LINE = 16 * 1024
RING = 2000
MAX_APPS = 16
RESTART_POLICIES = ("no", "on-failure", "always")
_BACKOFF_MIN = 0.2
_BACKOFF_MAX = 10.0
_STABLE_AFTER = 10.0

SendFn = Callable[[dict[str, Any], bytes], bool]


@dataclass
class AppSpec:
    name: str
    argv: list[str]
    env: dict[str, str]
    cwd: str | None
    user: str | None
    restart: str
    max_restarts: int | None


@dataclass
class App:
    spec: AppSpec
    state: str = "starting"  # starting | running | backoff | exited | stopped | failed
    pid: int | None = None
    restarts: int = 0
    last_exit_code: int | None = None
    started_at_ns: int | None = None
    error: str | None = None
    stopping: bool = False
    task: asyncio.Task[None] | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def status(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "state": self.state,
            "pid": self.pid,
            "restarts": self.restarts,
            "last_exit_code": self.last_exit_code,
            "started_at_ns": self.started_at_ns,
            "error": self.error,
        }


class Supervisor:
    def __init__(self, send: SendFn, reaper: children.Reaper) -> None:
        self._send = send
        self._reaper = reaper
        self.apps: dict[str, App] = {}
        self._ring: deque[tuple[dict[str, Any], bytes]] = deque(maxlen=RING)
        self._seq = 0

    def start(self, spec: AppSpec) -> App:
        old = self.apps.get(spec.name)
        if old is not None and old.state in ("starting", "running", "backoff"):
            raise ValueError(f"app {spec.name!r} is already running")
        if old is None and len(self.apps) >= MAX_APPS:
            raise ValueError(f"at most {MAX_APPS} apps")
        app = App(spec)
        self.apps[spec.name] = app
        app.task = asyncio.ensure_future(self._supervise(app))
        return app

    async def stop(self, name: str, sig: int, grace: float) -> App:
        app = self.apps[name]
        app.stopping = True
        app.wake.set()
        if app.pid is not None:
            children.kill_group(app.pid, sig)
        if app.task is not None:
            done, _ = await asyncio.wait([app.task], timeout=grace)
            if not done and app.pid is not None:
                children.kill_group(app.pid, signal.SIGKILL)
                await asyncio.wait([app.task], timeout=5)
        app.state = "stopped"
        return app

    def flush_ring(self) -> None:
        """Resend the lines logged while no host was connected."""
        while self._ring:
            header, body = self._ring[0]
            if not self._send(header, body):
                return
            self._ring.popleft()

    def _log(self, app: App, stream: str, line: bytes) -> None:
        self._seq += 1
        header = {
            "op": "app.log",
            "name": app.spec.name,
            "stream": stream,
            "ts_ns": time.time_ns(),
            "seq": self._seq,
        }
        if self._ring or not self._send(header, line):
            self._ring.append((header, line))

    async def _supervise(self, app: App) -> None:
        backoff = _BACKOFF_MIN
        while not app.stopping:
            started = time.monotonic()
            code = await self._run_once(app)
            if app.stopping:
                break
            app.last_exit_code = code
            self._send({"op": "app.exit", "name": app.spec.name, "exit_code": code}, b"")
            policy = app.spec.restart
            again = policy == "always" or (policy == "on-failure" and code != 0)
            if app.spec.max_restarts is not None and app.restarts >= app.spec.max_restarts:
                again = False
            if not again:
                app.state = "exited" if code is not None else "failed"
                return
            if time.monotonic() - started > _STABLE_AFTER:
                backoff = _BACKOFF_MIN
            app.state = "backoff"
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(app.wake.wait(), backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)
            app.restarts += 1
        app.state = "stopped"

    async def _run_once(self, app: App) -> int | None:
        spec = app.spec
        try:
            ident = children.resolve_user(spec.user)
            proc = children.spawn(
                spec.argv,
                env=children.child_env(ident, spec.env),
                cwd=spec.cwd,
                ident=ident,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        except children.SpawnError as exc:
            app.error = str(exc)
            self._log(app, "stderr", f"embervm: {exc}".encode())
            return None
        app.pid, app.state, app.error = proc.pid, "running", None
        app.started_at_ns = time.time_ns()
        exited = self._reaper.watch(proc.pid)
        assert proc.stdout is not None
        assert proc.stderr is not None
        readers = [
            asyncio.ensure_future(self._lines(app, proc.stdout.fileno(), "stdout")),
            asyncio.ensure_future(self._lines(app, proc.stderr.fileno(), "stderr")),
        ]
        try:
            code = await exited
            proc.returncode = code
            await asyncio.wait(readers, timeout=1.0)
        finally:
            for r in readers:
                r.cancel()
            for f in (proc.stdout, proc.stderr):
                with contextlib.suppress(OSError):
                    f.close()
            app.pid = None
        return code

    async def _lines(self, app: App, fd: int, stream: str) -> None:
        os.set_blocking(fd, False)
        pending = b""
        while True:
            data = await children.read_some(fd)
            if not data:
                if pending:
                    self._log(app, stream, pending)
                return
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._log(app, stream, line[:MAX_LINE])
            while len(pending) > MAX_LINE:
                self._log(app, stream, pending[:MAX_LINE])
                pending = pending[MAX_LINE:]
