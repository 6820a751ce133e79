"""Entry point: ``python3 -m embervm_agent`` (in the guest, as PID 1) or ``--fd N`` (tests).

As PID 1 the agent must never exit (the kernel would panic): if the main loop dies it logs to
the console and re-executes itself, which keeps PID 1 and keeps the apps' pids reaped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time

from .agent import Agent

PORT_NAME = "org.embervm.agent"
_PORT_WAIT = 10.0


def find_port(name: str = PORT_NAME) -> str:
    """The /dev node of the virtio-serial port called ``name`` (there is no udev)."""
    deadline = time.monotonic() + _PORT_WAIT
    base = "/sys/class/virtio-ports"
    while True:
        try:
            for entry in sorted(os.listdir(base)):
                try:
                    with open(f"{base}/{entry}/name") as f:
                        if f.read().strip() == name:
                            return f"/dev/{entry}"
                except OSError:
                    continue
        except OSError:
            pass
        if time.monotonic() > deadline:
            return "/dev/vport0p1"
        time.sleep(0.01)


def _uptime() -> str:
    try:
        with open("/proc/uptime") as f:
            return f.read().split()[0]
    except OSError:
        return "?"


def _log(msg: str) -> None:
    try:
        with open("/dev/console", "w") as con:
            con.write(f"embervm-agent: {msg}\n")
    except OSError:
        sys.stderr.write(f"embervm-agent: {msg}\n")


def debug_enabled() -> bool:
    try:
        with open("/proc/cmdline") as f:
            return "vmdebug=1" in f.read().split()
    except OSError:
        return False


def _survive(signum: int, frame: object) -> None:
    """PID 1's handler for the terminal signals: nothing (see ``main``)."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="embervm_agent")
    parser.add_argument("--fd", type=int, help="serve this already-open fd (tests)")
    parser.add_argument("--port", help="device path of the host channel")
    parser.add_argument("--freeze-path", default="/")
    args = parser.parse_args(argv)
    for var in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE"):
        os.environ.pop(var, None)
    pid1 = os.getpid() == 1
    if pid1:
        # PID 1 must survive the terminal signals, but not by ignoring them: an ignored signal
        # stays ignored across exec, so every app, exec and shell would start with SIGINT,
        # SIGTERM and SIGHUP ignored (Ctrl-C would not stop a program in the shell). A handler
        # is reset to the default by exec. (Python already ignores SIGPIPE; ``subprocess``
        # restores it in children.)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _survive)
        os.umask(0o022)
    try:
        if args.fd is not None:
            fd, reconnectable = args.fd, False
        else:
            path = args.port or find_port()
            fd, reconnectable = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC), True
        agent = Agent(fd, reconnectable=reconnectable, freeze_path=args.freeze_path)
        if pid1 and debug_enabled():
            agent.on_ready = lambda: _log(f"{_uptime()} agent listening")
        asyncio.run(agent.run())
    except BaseException as exc:
        if not pid1:
            raise
        _log(f"main loop died: {type(exc).__name__}: {exc}; restarting")
        time.sleep(0.5)
        argv0 = [sys.executable, "-u", "-m", __package__ or "embervm_agent"]
        os.execv(sys.executable, argv0)  # noqa: S606


if __name__ == "__main__":
    main()
