"""A real guest agent on this host, without QEMU (not a fake).

``local_agent()`` starts the very agent the guest runs (``python -m embervm.guest.agent``) as a
child process speaking over a socketpair, and yields a connected ``AgentClient``. Commands run
on the host, as the test's user, so use it for protocol-level behaviour (exec, PTY, files, app
supervision, hooks relay), not for isolation. ``quiesce`` freezes ``freeze_path`` — keep the
default tmpfs (which cannot be frozen) unless you mean it: never the host's ``/``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import embervm
from embervm.guest.client import AgentClient

_SRC = Path(embervm.__file__).resolve().parents[1]  # the folder embervm is imported from


@contextlib.asynccontextmanager
async def local_agent(
    *,
    freeze_path: str = "/dev/shm",
    request_timeout: float = 20.0,
    ignored_signals: tuple[int, ...] = (),
) -> AsyncIterator[AgentClient]:
    """A connected client to a fresh local agent process; everything is torn down on exit.
    ``ignored_signals``: the agent starts with these ignored (as under a parent that ignores
    them)."""
    host, guest = socket.socketpair()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(_SRC), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.Popen(  # noqa: ASYNC220  # returns at once; never waited on in the loop
        [sys.executable, "-m", "embervm.guest.agent", "--fd", str(guest.fileno()),
         "--freeze-path", freeze_path],
        pass_fds=[guest.fileno()], env=env, start_new_session=True,
        preexec_fn=(lambda: _ignore(ignored_signals)) if ignored_signals else None,
    )  # fmt: skip
    guest.close()
    try:
        client = await AgentClient.over_socket(
            host, timeout=request_timeout, request_timeout=request_timeout
        )
        try:
            yield client
        finally:
            await client.close()
    finally:
        host.close()
        try:
            await asyncio.to_thread(proc.wait, 10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)


def _ignore(signals: tuple[int, ...]) -> None:
    for sig in signals:
        signal.signal(sig, signal.SIG_IGN)
