"""The in-guest half of ``BuildMachine`` and ``AppMachine`` over the guest agent.

A runtime's machines are "a VM + its agent": booting, freezing layers, snapshots and shutdown
are the runtime's (host/vmm); exec, files, the app and its readiness are the agent's. ``AgentOps``
does the latter over an ``embervm.guest.client.AgentClient``, so the host's provider only adds
``commit_layer``, ``snapshot`` and ``shutdown`` (see docs/BUILDS.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from embervm.errors import GuestError
from embervm.guest import GuestAgent
from embervm.guest.client import AppSpec
from embervm.imagebuild.machine import AppLaunch, ExecOutcome, OutputSink, TreeEntry
from embervm.imagebuild.ready import HOOK_PATH

APP_NAME = "app"
DIRS_PER_EXEC = 200
_EXITED = {"exited", "failed", "backoff", "stopped"}


IDLE_WINDOW = 0.2  # seconds per sample of /proc/stat
IDLE_JIFFIES = 3  # busy clock ticks (1/100 s) allowed in a window: under ~15 % of one CPU


class AgentOps:
    """exec / put_file / put_tree / start_app / call_hook / probe_port / app_exit_code."""

    def __init__(self, client: GuestAgent) -> None:
        self.client = client
        self._log_task: asyncio.Task[None] | None = None

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        user: str | None,
        timeout: float,  # noqa: ASYNC109
        on_output: OutputSink,
    ) -> ExecOutcome:
        result = await self.client.exec(
            list(argv), env=dict(env), cwd=cwd, user=user, timeout=timeout, on_output=on_output
        )
        return ExecOutcome(result.exit_code, result.timed_out)

    async def put_file(
        self, path: str, data: bytes, *, mode: int, uid: int = 0, gid: int = 0
    ) -> None:
        await self.client.put_file(path, data, mode, uid, gid)

    async def put_tree(self, entries: Sequence[TreeEntry]) -> None:
        """Folders first (one shell per batch), then files through the agent's file upload
        (which creates missing parents)."""
        dirs = [e for e in entries if e.is_dir]
        for start in range(0, len(dirs), DIRS_PER_EXEC):
            script = " && ".join(
                f"mkdir -p {shlex.quote(d.path)} && chmod {d.mode:o} {shlex.quote(d.path)} && "
                f"chown {d.uid}:{d.gid} {shlex.quote(d.path)}"
                for d in dirs[start : start + DIRS_PER_EXEC]
            )
            result = await self.client.exec(["/bin/sh", "-c", script], timeout=120)
            if result.exit_code != 0:
                why = result.stderr.decode(errors="replace").strip()[-300:]
                raise GuestError(f"creating folders in the build VM failed: {why}")
        for entry in entries:
            if entry.is_dir:
                continue
            data = entry.data
            if data is None:
                data = await asyncio.to_thread(Path(str(entry.source)).read_bytes)
            await self.client.put_file(entry.path, data, entry.mode, entry.uid, entry.gid)

    async def start_app(self, launch: AppLaunch, *, on_output: OutputSink) -> None:
        spec = AppSpec(
            argv=list(launch.argv),
            env=dict(launch.env),
            cwd=launch.cwd,
            user=launch.user,
            name=APP_NAME,
        )
        await self.client.start_app(spec)
        self._log_task = asyncio.create_task(self._forward_logs(on_output))

    async def _forward_logs(self, on_output: OutputSink) -> None:
        async for line in self.client.app_logs():
            if line.name == APP_NAME:
                on_output(line.stream, line.line + b"\n")

    async def call_hook(self, port: int, hook: str, *, timeout: float) -> int | None:  # noqa: ASYNC109
        try:
            response = await self.client.http_request(
                port, HOOK_PATH + hook, method="POST", timeout=timeout
            )
        except GuestError:
            return None  # nothing listening yet, reset, or timed out in the guest
        return response.status

    async def probe_port(self, port: int, *, timeout: float) -> bool:  # noqa: ASYNC109
        try:
            return await self.client.tcp_probe(port, timeout=timeout)
        except GuestError:
            return False

    async def wait_idle(self, *, timeout: float) -> bool:  # noqa: ASYNC109
        rounds = max(1, int(timeout / IDLE_WINDOW))
        script = (
            f"i=0; while [ $i -lt {rounds} ]; do i=$((i+1)); "
            "read c u n s rest < /proc/stat; "
            f"sleep {IDLE_WINDOW}; "
            "read c u2 n2 s2 rest < /proc/stat; "
            f"[ $(( (u2+n2+s2) - (u+n+s) )) -le {IDLE_JIFFIES} ] && exit 0; done; exit 1"
        )
        try:
            result = await self.client.exec(
                ["/bin/sh", "-c", script], env={}, cwd="/", user=None, timeout=timeout + 5
            )
        except GuestError:
            return False
        return result.exit_code == 0

    async def app_exit_code(self) -> int | None:
        for app in await self.client.app_status():
            if app.get("name") == APP_NAME and app.get("state") in _EXITED:
                code = app.get("last_exit_code")
                return code if isinstance(code, int) else -1
        return None

    async def close(self) -> None:
        """Stop forwarding app logs (the VM itself is the runtime's to stop)."""
        if self._log_task is not None:
            self._log_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._log_task
            self._log_task = None
