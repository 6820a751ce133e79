"""Exec and PTY sessions: the agent's two ways to run a command for the host.

Both stream output as frames tagged with the request id, both are killed when the host says
``hello`` again (a new connection means nobody is listening to the old sessions any more), and
both bound everything the host controls: argv/env size (checked by ``protocol``), timeout,
window size, stdin size.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import struct
import subprocess
import termios
from collections.abc import Awaitable, Callable
from typing import Any

from . import children
from .protocol import CHUNK

SendFn = Callable[[dict[str, Any], bytes], None]
DrainFn = Callable[[], Awaitable[None]]

MAX_TIMEOUT = 7 * 24 * 3600.0
#: After the command exits, how long its output pipes may stay open (held by a daemonised
#: grandchild) before we stop reading them.
PIPE_GRACE = 1.0


def split_status(code: int) -> tuple[int, int | None]:
    """Popen-style code (negative = signal) → (shell-style exit code, signal or None)."""
    if code < 0:
        return 128 - code, -code
    return code, None


class ExecSession:
    """One ``exec``: spawn, stream stdout/stderr, enforce the timeout, report the exit."""

    def __init__(self, sid: int, send: SendFn, drain: DrainFn, reaper: children.Reaper) -> None:
        self.sid = sid
        self._send = send
        self._drain = drain
        self._reaper = reaper
        self.proc: subprocess.Popen[bytes] | None = None

    async def run(
        self,
        argv: list[str],
        *,
        env: dict[str, str],
        cwd: str | None,
        user: str | None,
        timeout: float | None,  # noqa: ASYNC109
        stdin: bytes,
    ) -> None:
        ident = children.resolve_user(user)
        proc = children.spawn(
            argv,
            env=children.child_env(ident, env),
            cwd=cwd,
            ident=ident,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.proc = proc
        exited = self._reaper.watch(proc.pid)
        self._send({"op": "exec.started", "id": self.sid, "pid": proc.pid}, b"")
        assert proc.stdout is not None
        assert proc.stderr is not None
        pumps = [
            asyncio.ensure_future(self._pump(proc.stdout.fileno(), "stdout")),
            asyncio.ensure_future(self._pump(proc.stderr.fileno(), "stderr")),
        ]
        feeder = asyncio.ensure_future(self._feed(proc, stdin)) if proc.stdin is not None else None
        timed_out = False
        try:
            try:
                code = await asyncio.wait_for(asyncio.shield(exited), timeout)
            except TimeoutError:
                timed_out = True
                children.kill_group(proc.pid)
                code = await exited
            proc.returncode = code
            await asyncio.wait(pumps, timeout=PIPE_GRACE)
        finally:
            for t in (*pumps, *([feeder] if feeder else [])):
                t.cancel()
            if not exited.done():
                children.kill_group(proc.pid)
            for f in (proc.stdin, proc.stdout, proc.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
        exit_code, sig = split_status(code)
        self._send(
            {
                "op": "exec.exit",
                "id": self.sid,
                "exit_code": exit_code,
                "signal": sig,
                "timed_out": timed_out,
            },
            b"",
        )

    async def _pump(self, fd: int, stream: str) -> None:
        os.set_blocking(fd, False)
        while True:
            data = await children.read_some(fd, CHUNK)
            if not data:
                return
            self._send({"op": "exec.out", "id": self.sid, "stream": stream}, data)
            await self._drain()

    @staticmethod
    async def _feed(proc: subprocess.Popen[bytes], data: bytes) -> None:
        assert proc.stdin is not None
        fd = proc.stdin.fileno()
        os.set_blocking(fd, False)
        with contextlib.suppress(OSError):
            await children.write_all(fd, data)
        with contextlib.suppress(OSError):
            proc.stdin.close()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.returncode is None:
            children.kill_group(self.proc.pid, sig)


#: Signals a terminal session starts with at their defaults, whatever the agent inherited
#: (a parent that ignored SIGINT, as a background job's does, would otherwise pass that on
#: through exec: Ctrl-C would not stop anything in the shell).
TERMINAL_SIGNALS = (
    signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGPIPE,
    signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU,
)  # fmt: skip


def _set_ctty() -> None:
    # Runs in the child after setsid(): make the PTY slave (fd 0) our controlling terminal,
    # with the terminal signals at their defaults.
    for sig in TERMINAL_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def default_shell() -> list[str]:
    for sh in ("/bin/bash", "/bin/sh"):
        if os.path.exists(sh):
            return [sh, "-l"]
    return ["/bin/sh"]


class PtySession:
    """One interactive terminal: a PTY pair, a session leader on the slave side, and a pump."""

    def __init__(self, sid: int, send: SendFn, drain: DrainFn, reaper: children.Reaper) -> None:
        self.sid = sid
        self._send = send
        self._drain = drain
        self._reaper = reaper
        self.master = -1
        self.proc: subprocess.Popen[bytes] | None = None
        self._write_lock = asyncio.Lock()

    def open(
        self,
        argv: list[str] | None,
        *,
        cols: int,
        rows: int,
        env: dict[str, str],
        cwd: str | None,
        user: str | None,
    ) -> int:
        ident = children.resolve_user(user)
        master, slave = os.openpty()
        try:
            self._winsize(master, cols, rows)
            self.proc = children.spawn(
                argv or default_shell(),
                env=children.child_env(ident, env, term=env.get("TERM", "xterm-256color")),
                cwd=cwd,
                ident=ident,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                preexec=_set_ctty,
            )
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        return self.proc.pid

    async def run(self) -> None:
        """Pump output until the shell exits, then report its status."""
        assert self.proc is not None
        exited = self._reaper.watch(self.proc.pid)
        pump = asyncio.ensure_future(self._pump())
        try:
            code = await exited
            self.proc.returncode = code
            await asyncio.wait([pump], timeout=PIPE_GRACE)
        finally:
            pump.cancel()
            self._close_master()
            if not exited.done():
                children.kill_group(self.proc.pid)
        exit_code, sig = split_status(code)
        self._send({"op": "pty.exit", "id": self.sid, "exit_code": exit_code, "signal": sig}, b"")

    async def _pump(self) -> None:
        while self.master >= 0:
            data = await children.read_some(self.master, CHUNK)
            if not data:
                return
            self._send({"op": "pty.out", "id": self.sid}, data)
            await self._drain()

    async def write(self, data: bytes) -> None:
        async with self._write_lock:
            if self.master >= 0:
                with contextlib.suppress(OSError):
                    await children.write_all(self.master, data)

    def resize(self, cols: int, rows: int) -> None:
        if self.master >= 0:
            self._winsize(self.master, cols, rows)

    @staticmethod
    def _winsize(fd: int, cols: int, rows: int) -> None:
        fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    def signal(self, sig: int) -> None:
        """Deliver ``sig`` to the terminal's foreground process group (like a keypress would)."""
        if self.proc is None or self.proc.returncode is not None:
            return
        pgrp = self.proc.pid
        if self.master >= 0:
            with contextlib.suppress(OSError):
                pgrp = os.tcgetpgrp(self.master)
        children.kill_group(pgrp, sig)

    def hangup(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            children.kill_group(self.proc.pid, signal.SIGHUP)
            children.kill_group(self.proc.pid, signal.SIGCONT)

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            children.kill_group(self.proc.pid, signal.SIGKILL)

    def _close_master(self) -> None:
        if self.master >= 0:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = -1
