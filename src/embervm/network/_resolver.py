"""The VMs' DNS resolver: one dnsmasq process on the host, forwarding to the host's resolvers.

Guests ask 10.0.2.2:53; their namespace DNATs that to the resolver address (the pool's first
address, on a dummy interface on the host), where this dnsmasq listens and forwards to the
servers in the host's ``/etc/resolv.conf`` (re-read when it changes). It binds only that address
(``--bind-interfaces``), reads no system configuration (``--conf-file=/dev/null``,
``--no-hosts``) and drops privileges. It is the server's child; its pid file lets the next start
end one left behind by a crash.

Guests get public DNS only, never the host's own names (audit B4): a host whose resolv.conf
names only a loopback stub (systemd-resolved's 127.0.0.53 answers ``/etc/hosts``, the host
name, ``_gateway``, LLMNR and mDNS names, and routes VPN domains) is bypassed for the upstream
servers that stub uses; ``localhost`` names are answered here, never forwarded; plain names
are never forwarded (``--domain-needed``); and an upstream answer pointing where a guest
cannot go is turned into NXDOMAIN: every range the rules block (``--bogus-nxdomain``, which
takes a subnet since dnsmasq 2.85; that covers 100.64/10, where VPNs such as Tailscale answer).
Such an answer would only tell the guest about the host's networks. ``--stop-dns-rebind`` is
not used: dnsmasq's idea of "private" includes the documentation ranges (192.0.2/24,
198.51.100/24, 203.0.113/24), which guests may reach and where some networks (this project's CI
among them) put the registries; private IPv6 answers are moot, guests have no IPv6.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import pwd
import signal
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

from embervm.errors import NetworkSetupError

from ._commands import describe

START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0

HOST_RESOLV_FILE = Path("/etc/resolv.conf")
RESOLVED_UPSTREAMS_FILE = Path("/run/systemd/resolve/resolv.conf")
"""systemd-resolved's list of the upstream servers its stub forwards to."""


def upstream_resolv_file(
    host_file: Path = HOST_RESOLV_FILE, resolved_file: Path = RESOLVED_UPSTREAMS_FILE
) -> Path:
    """The resolv.conf whose servers dnsmasq forwards to: the host's, unless it names only
    loopback stubs and systemd-resolved lists the servers behind them (see module docstring)."""
    try:
        lines = host_file.read_text().splitlines()
    except OSError:
        return host_file
    servers = [f[1] for f in map(str.split, lines) if len(f) >= 2 and f[0] == "nameserver"]
    if servers and all(_is_loopback(s) for s in servers) and resolved_file.exists():
        return resolved_file
    return host_file


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.partition("%")[0]).is_loopback
    except ValueError:
        return False


def _unprivileged_user() -> str:
    for name in ("dnsmasq", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    return "nobody"


def dnsmasq_argv(
    *,
    binary: str,
    listen_ip: str,
    port: int,
    pid_file: Path,
    resolv_file: Path,
    overrides: Mapping[str, str],
    user: str,
    unreachable: Sequence[str],
) -> list[str]:
    """The dnsmasq command line (pure, for tests); upstream answers in an ``unreachable``
    range become NXDOMAIN."""
    argv = [
        binary,
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-hosts",
        "--bind-interfaces",
        f"--listen-address={listen_ip}",
        f"--port={port}",
        f"--pid-file={pid_file}",
        f"--resolv-file={resolv_file}",
        f"--user={user}",
        "--domain-needed",
        "--bogus-priv",
        "--local=/localhost/",
        "--cache-size=1000",
        "--log-facility=-",
    ]
    argv += [f"--bogus-nxdomain={cidr}" for cidr in unreachable]
    argv += [f"--address=/{name}/{ip}" for name, ip in sorted(overrides.items())]
    return argv


def _proc_udp_has(ip: str, port: int, table: Path = Path("/proc/net/udp")) -> bool:
    """Whether something has bound ``ip:port`` for UDP (``/proc/net/udp`` notation)."""
    packed = int.from_bytes(ipaddress.IPv4Address(ip).packed, "little")
    wanted = f"{packed:08X}:{port:04X}"
    try:
        text = table.read_text()
    except OSError:
        return False
    return any(line.split()[1] == wanted for line in text.splitlines()[1:] if line.strip())


def _is_our_dnsmasq(pid: int, pid_file: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(cmdline)
        and cmdline[0].endswith(b"dnsmasq")
        and (f"--pid-file={pid_file}".encode() in cmdline)
    )


def _open_log(path: Path) -> IO[bytes]:
    return open(path, "ab")


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


class Resolver:
    """One dnsmasq process; ``start`` and ``stop`` are idempotent."""

    def __init__(
        self,
        state_dir: Path,
        *,
        listen_ip: str,
        port: int,
        resolv_file: Path | None = None,
        overrides: Mapping[str, str] | None = None,
        unreachable: Sequence[str] = (),
        binary: str = "dnsmasq",
    ) -> None:
        """``resolv_file``: where the upstream servers are listed (default:
        ``upstream_resolv_file()``, chosen at each start); ``unreachable``: the ranges no
        guest reaches, whose addresses it is not told."""
        self._pid_file = state_dir / "dnsmasq.pid"
        self._log_file = state_dir / "dnsmasq.log"
        self._listen_ip = listen_ip
        self._port = port
        self._resolv_file = resolv_file
        self._overrides = dict(overrides or {})
        self._unreachable = tuple(unreachable)
        self._binary = binary
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        if self._proc is not None and self._proc.returncode is None:
            return
        await self._end_leftover()
        argv = dnsmasq_argv(
            binary=self._binary,
            listen_ip=self._listen_ip,
            port=self._port,
            pid_file=self._pid_file,
            resolv_file=self._resolv_file or upstream_resolv_file(),
            overrides=self._overrides,
            user=_unprivileged_user(),
            unreachable=self._unreachable,
        )
        with _open_log(self._log_file) as log:
            try:
                self._proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                    start_new_session=True,
                )
            except OSError as exc:
                raise NetworkSetupError(f"`{describe(argv)}` could not be started: {exc}") from exc
        await self._wait_listening(argv)

    async def _wait_listening(self, argv: list[str]) -> None:
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT
        while not _proc_udp_has(self._listen_ip, self._port):
            if self._proc.returncode is not None or loop.time() > deadline:
                await self.stop()
                tail = self._log_tail()
                raise NetworkSetupError(f"`{describe(argv)}` did not start listening: {tail}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._proc.wait()), 0.02)

    def _log_tail(self) -> str:
        try:
            return self._log_file.read_text(errors="replace")[-2000:].strip() or "(no output)"
        except OSError:
            return "(no log)"

    async def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
            except TimeoutError:
                proc.kill()
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT)
        elif proc is not None:
            await proc.wait()
        await self._end_leftover()

    async def _end_leftover(self) -> None:
        """End a dnsmasq a previous run of the server left (found by our pid file)."""
        try:
            pid = int(self._pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        if _is_our_dnsmasq(pid, self._pid_file):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            for _ in range(int(STOP_TIMEOUT / 0.02)):
                if not _alive(pid):
                    break
                await asyncio.sleep(0.02)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            self._pid_file.unlink()
