"""The stand-in world the network integration tests share: a manager with its own tag, pool
and state dir, guests on veths named like the tap, and an "internet" namespace.

A QEMU guest is heavy, so a veth named ``tap0`` stands in for the tap (``attach_veth_guest``):
its peer, in a namespace the test owns, carries the guest's address, MAC and route, and goes
through exactly the rules a tap would (they match the device name). The "internet" is another
namespace of the test, holding 203.0.113.10 (TEST-NET-3) behind 198.51.100.2 (TEST-NET-2),
reached through a host route the test adds: no packet leaves the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import string
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.framework.fake_network import attach_veth_guest

from embervm.network import CommandResult, NetworkManager, SubprocessRunner, VmNetwork

INTERNET_IP = "203.0.113.10"
INTERNET_LINK_HOST = "198.51.100.1"
INTERNET_LINK_NS = "198.51.100.2"
API_PORT = 8700
GUEST_PORT = 8080
PROBE_TIMEOUT = 1.0

SERVER = r"""
import socket, sys, threading
kind, addr, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
if kind in ("tcp", "hold"):
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(64)
    print("ready", flush=True)
    while True:
        c, peer = s.accept()
        if kind == "hold":  # open until the client closes its side, then closed here too
            threading.Thread(target=lambda c=c: (c.recv(1), c.close()), daemon=True).start()
        else:
            c.sendall(f"{name} {peer[0]}".encode()); c.close()
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((addr, port))
    print("ready", flush=True)
    while True:
        data, peer = s.recvfrom(512)
        if kind == "dns":  # A queries: "ip-a-b-c-d.<any>" gets a.b.c.d, others 198.51.100.77
            end = data.index(b"\0", 12) + 5
            first = data[13 : 13 + data[12]].decode()
            ip = [198, 51, 100, 77]
            if first.startswith("ip-"):
                ip = [int(x) for x in first[3:].split("-")]
            answer = b"\xc0\x0c" + bytes([0, 1, 0, 1, 0, 0, 0, 60, 0, 4, *ip])
            s.sendto(data[:2] + b"\x81\x80\0\x01\0\x01\0\0\0\0" + data[12:end] + answer, peer)
        else:
            s.sendto(f"{name} {peer[0]}".encode(), peer)
"""

CLIENT = """
import socket, struct, sys
kind, host, src = sys.argv[1], sys.argv[2], sys.argv[4]
port, timeout = int(sys.argv[3]), float(sys.argv[5])
source = (src, 0) if src != "-" else None
try:
    if kind == "tcp":
        s = socket.create_connection((host, port), timeout=timeout, source_address=source)
        print("OK", s.recv(200).decode())
    elif kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
        s.sendto(b"ping", (host, port)); print("OK", s.recv(200).decode())
    else:  # dns: A query for the name in `src`
        q = struct.pack(">HHHHHH", 0x1234, 0x100, 1, 0, 0, 0)
        q += b"".join(bytes([len(p)]) + p.encode() for p in src.split(".")) + b"\\0"
        q += struct.pack(">HH", 1, 1)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
        s.sendto(q, (host, port)); d = s.recv(512)
        print("OK", socket.inet_ntoa(d[-4:]) if struct.unpack(">H", d[6:8])[0] else "NOANSWER")
except OSError as e:
    print("ERR", type(e).__name__)
"""


async def sh(*argv: str, input: str | None = None, check: bool = True) -> CommandResult:
    return await SubprocessRunner().run(argv, input=input, check=check, time_limit=20)


@dataclass
class World:
    """A manager with its own tag, pool and state dir, plus the test's namespaces."""

    tag: str
    manager: NetworkManager
    state_dir: Path
    netns: list[str] = field(default_factory=list)
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    servers: list[asyncio.Server] = field(default_factory=list)

    async def add_netns(self, name: str) -> str:
        await sh("ip", "netns", "add", name)
        self.netns.append(name)
        return name

    async def vm_with_guest(self, name: str, *, egress: bool) -> VmNetwork:
        net = await self.manager.create(f"{self.tag}-vm-{name}", egress=egress)
        guest = await self.add_netns(f"{self.tag}g{name}")
        await attach_veth_guest(net, guest, SubprocessRunner())
        await self.serve("tcp", guest, "10.0.2.15", GUEST_PORT, f"guest-{name}")
        return net

    async def serve(self, kind: str, netns: str, addr: str, port: int, name: str) -> None:
        """A server in ``netns`` that answers "<name> <peer address>"."""
        proc = await asyncio.create_subprocess_exec(
            "ip", "netns", "exec", netns, sys.executable, "-c", SERVER, kind, addr, str(port),
            name, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        self.procs.append(proc)
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"ready", f"server {name} did not start"

    async def serve_on_host(self, addr: str, port: int, name: str) -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            peer = writer.get_extra_info("peername")[0]
            writer.write(f"{name} {peer}".encode())
            await writer.drain()
            writer.close()

        self.servers.append(await asyncio.start_server(answer, addr, port))

    async def probe(
        self, netns: str, kind: str, host: str, port: int, src: str = "-"
    ) -> str | None:
        """What a client in ``netns`` gets back, or None when it gets nothing."""
        out = await sh(
            "ip", "netns", "exec", netns, sys.executable, "-c", CLIENT, kind, host, str(port),
            src, str(PROBE_TIMEOUT),
        )  # fmt: skip
        status, _, rest = out.stdout.strip().partition(" ")
        return rest if status == "OK" else None


async def host_probe(host: str, port: int) -> str | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), PROBE_TIMEOUT)
    except (OSError, TimeoutError):
        return None
    data = await asyncio.wait_for(reader.read(200), PROBE_TIMEOUT)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return data.decode()


def read_file(path: str) -> bytes:
    return Path(path).read_bytes()


def exists(path: str) -> bool:
    return Path(path).exists()


def resolver_alive(state_dir: Path) -> bool:
    """Whether a live (not zombie) dnsmasq of this state dir exists."""
    marker = f"--pid-file={state_dir}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
            if marker in cmdline and state != "Z":
                return True
    return False


def new_tag() -> str:
    return "t" + "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(3))


async def leftovers(tag: str, table: str) -> list[str]:
    """Everything with this tag's names still in the kernel."""
    found = [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(f"{tag}-")]
    links = (await sh("ip", "-o", "link", "show")).stdout
    found += [f"link {line}" for line in links.splitlines() if f"embervm:{tag}:" in line]
    found += [f"link {line}" for line in links.splitlines() if f"{tag}dns0" in line]
    tables = (await sh("nft", "list", "tables")).stdout
    found += [f"table {table}" for line in tables.splitlines() if line.split()[-1:] == [table]]
    return found


@contextlib.asynccontextmanager
async def open_world(tmp_path: Path, **manager_options: Any) -> AsyncIterator[World]:
    """A started manager (``manager_options`` added to the test defaults) and the stand-in
    internet; on exit, asserts that nothing of it is left in the kernel or the host's files."""
    tag = new_tag()
    resolv_before = read_file("/etc/resolv.conf")
    forward_before = read_file("/proc/sys/net/ipv4/ip_forward")
    pool = f"10.214.{secrets.randbelow(256)}.0/26"
    manager = NetworkManager(
        tmp_path / "net",
        pool=pool,
        api_ports=[API_PORT],
        tag=tag,
        dns_overrides={"example.test": INTERNET_IP},
        **manager_options,
    )
    w = World(tag, manager, tmp_path / "net")
    inet_link = f"{tag}i0"
    try:
        # The stand-in internet exists before any guest does, so egress never leaves the host.
        inet = await w.add_netns(f"{tag}i")
        await sh("ip", "link", "add", inet_link, "type", "veth", "peer", "name", "eth0",
                 "netns", inet)  # fmt: skip
        await sh("ip", "-batch", "-", input=(
            f"addr add {INTERNET_LINK_HOST}/30 dev {inet_link}\nlink set {inet_link} up\n"
            f"route add {INTERNET_IP}/32 via {INTERNET_LINK_NS} dev {inet_link}\n"
        ))  # fmt: skip
        await sh("ip", "-n", inet, "-batch", "-", input=(
            f"addr add {INTERNET_LINK_NS}/30 dev eth0\nlink set eth0 up\nlink set lo up\n"
            f"addr add {INTERNET_IP}/32 dev lo\n"
        ))  # fmt: skip
        await manager.start()
        assert resolver_alive(w.state_dir)
        yield w
    finally:
        for server in w.servers:
            server.close()
        for proc in w.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        for name in reversed(w.netns):
            await sh("ip", "netns", "del", name, check=False)
        await sh("ip", "link", "del", inet_link, check=False)
        await w.manager.reclaim_leftovers(set())
        await w.manager.stop()
        assert await leftovers(tag, w.manager.table) == []
        assert not resolver_alive(w.state_dir)
        assert read_file("/etc/resolv.conf") == resolv_before
        assert read_file("/proc/sys/net/ipv4/ip_forward") == forward_before


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    async with open_world(tmp_path) as w:
        yield w
