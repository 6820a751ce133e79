"""Child processes of the agent: spawning as a user, and the one reaper for all of them.

The agent is PID 1 in the guest, so it must reap every process that gets re-parented to it.
A single SIGCHLD handler calls ``waitpid(-1, WNOHANG)`` until nothing is left and resolves the
future of the child it belongs to (exec, PTY shell or app); orphans are reaped and forgotten.
Nothing else may call ``wait`` (so no ``asyncio.subprocess`` and no ``Popen.wait`` here).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import pwd
import signal
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class SpawnError(Exception):
    """The command could not be started (bad user, cwd, or executable)."""


@dataclass(frozen=True)
class Identity:
    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str
    name: str


def resolve_user(user: str | None) -> Identity:
    """``None``, ``"name"``, ``"uid"``, ``"name:group"`` or ``"uid:gid"`` → ids, like Docker."""
    spec = user or "root"
    name, _, group = spec.partition(":")
    try:
        pw: pwd.struct_passwd | None = (
            pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
        )
    except KeyError:
        if not name.isdigit():
            raise SpawnError(f"unknown user {name!r}") from None
        pw = None
    uid = pw.pw_uid if pw else int(name)
    gid = pw.pw_gid if pw else uid
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise SpawnError(f"unknown group {group!r}") from None
    groups = tuple(os.getgrouplist(pw.pw_name, gid)) if pw else (gid,)
    return Identity(uid, gid, groups, pw.pw_dir if pw else "/", pw.pw_name if pw else name)


def child_env(ident: Identity, extra: dict[str, str], *, term: str | None = None) -> dict[str, str]:
    """A clean environment (never the agent's own) overlaid with the caller's variables."""
    env = {
        "PATH": DEFAULT_PATH,
        "HOME": ident.home or "/",
        "USER": ident.name,
        "LOGNAME": ident.name,
        "LANG": "C.UTF-8",
    }
    if term:
        env["TERM"] = term
    env.update(extra)
    return env


class Reaper:
    """Owns SIGCHLD: maps pids to futures of their wait status."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._waiting: dict[int, asyncio.Future[int]] = {}
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)

    def close(self) -> None:
        self._loop.remove_signal_handler(signal.SIGCHLD)

    def watch(self, pid: int) -> asyncio.Future[int]:
        """A future for ``pid``'s exit code (negative signal number if killed, like Popen).

        Call it right after spawning, with no ``await`` in between: the reaper only runs from
        the event loop, so the child cannot have been reaped yet (no race, no pid-reuse mixup).
        """
        fut: asyncio.Future[int] = self._loop.create_future()
        self._waiting[pid] = fut
        self.reap()
        return fut

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                return
            if pid == 0:
                return
            fut = self._waiting.pop(pid, None)
            if fut is not None and not fut.done():
                fut.set_result(os.waitstatus_to_exitcode(status))
            # Anything else is an orphan re-parented to PID 1: reaped, forgotten.


def spawn(
    argv: list[str],
    *,
    env: dict[str, str],
    cwd: str | None,
    ident: Identity,
    stdin: Any,
    stdout: Any,
    stderr: Any,
    new_session: bool = True,
    preexec: Callable[[], None] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` as ``ident``; never waits for it (the reaper does)."""
    switch = ident.uid != os.getuid() or ident.gid != os.getgid()
    try:
        # Without a user switch (and without preexec) CPython can use vfork: much cheaper for
        # a large PID 1 under TCG.
        return subprocess.Popen(
            argv,
            env=env,
            cwd=cwd or _default_cwd(ident),
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            start_new_session=new_session,
            close_fds=True,
            user=ident.uid if ident.uid != os.getuid() else None,
            group=ident.gid if ident.gid != os.getgid() else None,
            extra_groups=list(ident.groups) if switch and os.getuid() == 0 else None,
            preexec_fn=preexec,
            restore_signals=True,
        )
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        raise SpawnError(f"cannot start {argv[0]!r}: {exc}") from exc


def _default_cwd(ident: Identity) -> str:
    return ident.home if ident.home and os.path.isdir(ident.home) else "/"


def kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal the process group led by ``pid`` (falls back to the process alone)."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        pass


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def read_some(fd: int, n: int = 65536) -> bytes:
    """Read what is available on a non-blocking fd, waiting for readability; b"" at EOF."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            return os.read(fd, n)
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno == errno.EIO:  # a PTY master whose slave side is gone
                return b""
            raise
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_reader(fd)


async def write_all(fd: int, data: bytes) -> None:
    """Write everything to a non-blocking fd, waiting for writability."""
    loop = asyncio.get_running_loop()
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
            view = view[n:]
            continue
        except BlockingIOError:
            pass
        fut: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, _wake, fut)
        try:
            await fut
        finally:
            loop.remove_writer(fd)
