"""Process plumbing of the local fleet: commands with a timeout, free loopback ports, and
signals that reach only the process we started.

A pid alone does not name a process: once it exits, the kernel may give its number to another.
So a process is known by its pid, its command line and its start time (``/proc/<pid>/stat``,
field 22, in clock ticks since boot), and every signal goes through a pidfd opened *before*
that identity is checked: if the process exits and its number is reused after the check, the
pidfd still names the old one and the signal reaches nobody.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from embervm.errors import RuntimeFailure

LOOPBACK = "127.0.0.1"


def run(
    argv: Sequence[str], *, what: str, timeout: float, cwd: Path | None = None,
    input_text: str | None = None, env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """Run ``argv`` to completion within ``timeout`` s; a failure or a timeout is a
    RuntimeFailure naming ``what`` and ending with the command's last lines of output."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=timeout, cwd=cwd,
            input=input_text, env=env, check=False,
            stdin=None if input_text is not None else subprocess.DEVNULL,
        )  # fmt: skip
    except subprocess.TimeoutExpired as exc:
        raise RuntimeFailure(f"{what} did not finish in {timeout:g} s") from exc
    except OSError as exc:
        raise RuntimeFailure(f"{what} could not run {argv[0]}: {exc.strerror}") from exc
    if done.returncode != 0:
        output = tail(done.stderr + done.stdout)
        raise RuntimeFailure(f"{what} failed (exit {done.returncode}): {output}")
    return done


def tail(text: str, lines: int = 8) -> str:
    """The last ``lines`` non-empty lines of ``text``, on one line (for error messages)."""
    kept = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
    return " | ".join(kept) or "(no output)"


def tail_file(path: Path, lines: int = 8) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 16384))
            return tail(fh.read().decode(errors="replace"), lines)
    except OSError:
        return "(no log)"


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports free on 127.0.0.1 right now (all held open while picking,
    so they differ; another process may still take one before its user binds it)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket())
            sock.bind((LOOPBACK, 0))
            ports.append(int(sock.getsockname()[1]))
        return ports


def free_port() -> int:
    return free_ports(1)[0]


def port_open(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """True when something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def read_cmdline(pid: int) -> tuple[str, ...] | None:
    """The command line of ``pid`` (None when there is no such process, or a zombie)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if not raw:
        return None  # a zombie or a kernel thread
    return tuple(part.decode(errors="surrogateescape") for part in raw.rstrip(b"\0").split(b"\0"))


def _stat_fields(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; split after the last ")".
    return raw.rsplit(")", 1)[1].split()


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (None when there is no such process)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None  # field 22 of stat; fields[0] is field 3


def is_gone(pid: int) -> bool:
    """True when ``pid`` has exited (a zombie waiting for its parent counts as gone)."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


@dataclass(frozen=True)
class ProcessIdentity:
    """A process as it was when we started it: its pid, command line and start time."""

    pid: int
    cmdline: tuple[str, ...]
    start_ticks: int

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the live process ``pid`` now (None if there is none)."""
        cmdline, ticks = read_cmdline(pid), start_ticks(pid)
        if cmdline is None or ticks is None or is_gone(pid):
            return None
        return cls(pid, cmdline, ticks)

    @classmethod
    def after_spawn(cls, pid: int, argv: Sequence[str], timeout: float = 5.0) -> ProcessIdentity:
        """The identity of a process just spawned with ``argv``: its command line reads empty
        (or the parent's) until its exec has finished, so wait for that, at most ``timeout`` s.
        A script shows its interpreter first (``/bin/sh script args``). RuntimeFailure if it
        exits or never shows ``argv``. (A process that execs again later, as ``#!/usr/bin/env``
        does, is to be recorded with ``of`` once it is ready.)"""
        deadline = time.monotonic() + timeout
        while True:
            identity = cls.of(pid)
            if identity is not None and _runs(identity.cmdline, tuple(argv)):
                return identity
            if is_gone(pid) or time.monotonic() > deadline:
                raise RuntimeFailure(f"{argv[0]} (pid {pid}) exited or did not start")
            time.sleep(0.001)  # the exec finishes within microseconds

    def matches_now(self) -> bool:
        """True when ``pid`` is still this very process (same command line, same start)."""
        return ProcessIdentity.of(self.pid) == self


def _runs(cmdline: tuple[str, ...], argv: tuple[str, ...]) -> bool:
    """True when ``cmdline`` is ``argv`` after its exec: the same, or a script's interpreter
    (and its options) followed by the script and ``argv[1:]``."""
    if cmdline == argv:
        return True
    extra = len(cmdline) - len(argv)
    if extra < 1 or cmdline[extra + 1 :] != argv[1:]:
        return False
    return Path(cmdline[extra]).name == Path(argv[0]).name


@contextlib.contextmanager
def pidfd_of(identity: ProcessIdentity) -> Iterator[int | None]:
    """A pidfd of the process if it is still ``identity``, else None (gone, or its pid now
    names another process). While the fd is open, signals through it reach only that process."""
    try:
        fd = os.pidfd_open(identity.pid)
    except ProcessLookupError:
        yield None
        return
    try:
        yield fd if identity.matches_now() else None
    finally:
        os.close(fd)


def wait_pidfd(fd: int, timeout: float) -> bool:
    """Wait until the process of ``fd`` exits (its pidfd turns readable); False on timeout."""
    readable, _, _ = select.select([fd], [], [], max(0.0, timeout))
    return bool(readable)


def stop_process(
    identity: ProcessIdentity, *, first: int | None = signal.SIGTERM, group: bool = False,
    grace: float = 10.0, kill_wait: float = 10.0,
) -> str:  # fmt: skip
    """Stop the process ``identity`` names, and only it: ``first`` (to its process group when
    ``group`` and it leads one), up to ``grace`` s for it to exit, then SIGKILL (at once when
    ``first`` is None).

    Returns "stopped", "killed", "gone" (it had already exited) or "not ours" (its pid now
    names another process, left alone). Raises RuntimeFailure if it outlives the SIGKILL.
    """
    if ProcessIdentity.of(identity.pid) is None:
        return "gone"
    with pidfd_of(identity) as fd:
        if fd is None:
            return "gone" if is_gone(identity.pid) else "not ours"
        leads_group = group and _pgid(identity.pid) == identity.pid
        if first is not None:
            _send(fd, identity.pid, first, leads_group)
            if wait_pidfd(fd, grace):
                _finish(identity.pid, leads_group)
                return "stopped"
        _send(fd, identity.pid, signal.SIGKILL, leads_group)
        if not wait_pidfd(fd, kill_wait):
            name = Path(identity.cmdline[0]).name
            raise RuntimeFailure(
                f"{name} (pid {identity.pid}) survived SIGKILL for {kill_wait:g} s"
            )
        _finish(identity.pid, leads_group)
        return "killed"


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _send(fd: int, pid: int, sig: int, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            # The leader is verified and held by the pidfd: its pid cannot name a new process
            # (or group) while it is unreaped, so the group is still ours.
            os.killpg(pid, sig)
        else:
            signal.pidfd_send_signal(fd, sig)


def _finish(pid: int, group: bool) -> None:
    """After the leader exited: SIGKILL what is left of its group (its pid still holds the
    group's number: it is ours to reap, or its parent's, never reaped here, so that a
    ``Popen`` or a child watcher of the caller still gets its exit status)."""
    if group:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
