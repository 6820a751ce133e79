"""A fleet's proxy (``EndpointProxy(upstream=TunnelUpstream(...))``) in front of real
``TunnelListener``s over loopback, each standing in for a host whose guest is a local app:
HTTP/1.1, HTTP/2 (to an HTTP/1.1 app and, forced, to an h2c one), a WebSocket, a VM that moved
to another host (one re-resolve), a VM that no host has, a proxy with another fleet's key, and
how often the hosts' addresses are read.

The VM's address in core's view is 192.0.2.1 (TEST-NET-1, which nothing here answers): only
the tunnel reaches the app, so a request that succeeds went through it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import pytest
from tests.framework.proxy_unit_harness import (
    DOMAIN,
    HOST,
    VM,
    App,
    LocalShells,
    running,
)
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from embervm.config import Settings
from embervm.contracts import PortGrant
from embervm.core.lifecycle import ResolvedVm
from embervm.core.tokens import TokenAuthority
from embervm.errors import NotFoundError
from embervm.host.tunnel import TunnelListener
from embervm.proxy import EndpointProxy
from embervm.proxy.upstream import TunnelUpstream

pytestmark = pytest.mark.timeout(60)

KEY = os.urandom(32)
UNREACHABLE_ADDRESS = "192.0.2.1"  # the guest's address on its host: not the proxy's to dial


def on_host(host_id: str, *, memory_mib: int = 4096) -> ResolvedVm:
    vm = running(VM, memory_mib=memory_mib)
    return replace(vm, address=UNREACHABLE_ADDRESS, host_id=host_id)


@dataclass
class FleetRoutes:
    """Core's ``Lifecycle`` as a fleet's proxy sees it: ``cached`` is what ``resolve`` and
    ``resolved`` answer until ``forget``; ``store`` is what a read of the store says
    (``ensure_running`` always reads it, and caches what it read, as core's does)."""

    store: dict[str, ResolvedVm]
    cached: dict[str, ResolvedVm] = field(default_factory=dict)
    forgotten: list[str] = field(default_factory=list)
    store_reads: int = 0

    async def resolve(self, microvm_id: str) -> ResolvedVm:
        vm = self.cached.get(microvm_id)
        return vm if vm is not None else await self.ensure_running(microvm_id)

    def resolved(self, microvm_id: str) -> ResolvedVm | None:
        return self.cached.get(microvm_id)

    async def ensure_running(self, microvm_id: str) -> ResolvedVm:
        self.store_reads += 1
        if microvm_id not in self.store:
            raise NotFoundError("no such VM")
        self.cached[microvm_id] = self.store[microvm_id]
        return self.store[microvm_id]

    def record_activity(self, microvm_id: str) -> None:
        return None

    def forget(self, microvm_id: str) -> None:
        self.forgotten.append(microvm_id)
        self.cached.pop(microvm_id, None)


@dataclass
class Host:
    """A host's tunnel listener; ``here`` the VMs it runs (their guest is 127.0.0.1)."""

    listener: TunnelListener
    here: set[str]
    asked: list[str] = field(default_factory=list)

    def resolve(self, microvm_id: str) -> str | None:
        self.asked.append(microvm_id)
        return "127.0.0.1" if microvm_id in self.here else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.port}"


@dataclass
class Fleet:
    proxy: EndpointProxy
    routes: FleetRoutes
    tokens: TokenAuthority
    hosts: dict[str, Host]
    loads: int = 0
    now: float = 1000.0  # the address cache's clock

    async def host_addresses(self) -> Mapping[str, str]:
        self.loads += 1
        return {host_id: host.address for host_id, host in self.hosts.items()}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.http_port}"

    def headers(self, port: int, **extra: str) -> dict[str, str]:
        token = self.tokens.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                                  expires_in_minutes=5)  # fmt: skip
        return {"host": HOST, "x-aws-proxy-auth": token, "x-aws-proxy-port": str(port), **extra}


async def start_host(here: set[str], key: bytes = KEY) -> Host:
    host = Host(None, here)  # type: ignore[arg-type]
    host.listener = TunnelListener(key, host.resolve, host="127.0.0.1", port=0)
    await host.listener.start()
    return host


@contextlib.asynccontextmanager
async def fleet(
    tmp_path: Path,
    routes: FleetRoutes,
    hosts: dict[str, set[str]],
    *,
    host_key: bytes = KEY,
) -> AsyncIterator[Fleet]:
    started = {host_id: await start_host(here, host_key) for host_id, here in hosts.items()}
    settings = Settings(data_dir=tmp_path, proxy_port=0, proxy_http_port=0, domain=DOMAIN)
    tokens = TokenAuthority(tmp_path / "keys" / "tokens.json")
    rig = Fleet(None, routes, tokens, started)  # type: ignore[arg-type]
    upstream = TunnelUpstream(KEY, rig.host_addresses, clock=lambda: rig.now)
    rig.proxy = EndpointProxy(settings, lifecycle=routes, tokens=tokens, shells=LocalShells(),
                              upstream=upstream)  # fmt: skip
    await rig.proxy.start()
    try:
        yield rig
    finally:
        await rig.proxy.stop()
        for host in started.values():
            await host.listener.stop()


def one_host(host_id: str = "a") -> FleetRoutes:
    return FleetRoutes({VM: on_host(host_id)}, {VM: on_host(host_id)})


def moved(first: str = "a", then: str = "b") -> FleetRoutes:
    """Core still holds ``first`` (cached); the store says ``then``."""
    return FleetRoutes({VM: on_host(then)}, {VM: on_host(first)})


# -- apps ---------------------------------------------------------------------------------------


async def echo(ws: ServerConnection) -> None:
    async for message in ws:
        await ws.send(message)


@pytest.fixture
async def ws_port() -> AsyncIterator[int]:
    async with serve(echo, "127.0.0.1", 0) as server:
        yield next(iter(server.sockets)).getsockname()[1]


# -- requests, one per way into the proxy --------------------------------------------------


async def http1(rig: Fleet, port: int, path: str = "/headers", **extra: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=10) as client:
        return await client.get(rig.url + path, headers=rig.headers(port, **extra))


async def fresh_get(rig: Fleet, port: int) -> int:
    """A GET on a connection of its own (cheaper than an httpx client); its status."""
    fields = "".join(f"{k}: {v}\r\n" for k, v in rig.headers(port).items())
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
    try:
        writer.write(f"GET /headers HTTP/1.1\r\n{fields}connection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return int(answer.split(b" ", 2)[1])


async def http2(rig: Fleet, port: int, path: str = "/headers", **extra: str) -> httpx.Response:
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        answer = await client.get(rig.url + path, headers=rig.headers(port, **extra))
    assert answer.http_version == "HTTP/2"
    return answer


async def websocket_echo(rig: Fleet, port: int) -> str:
    token = rig.headers(port)["x-aws-proxy-auth"]
    offer = ["lambda-microvms", f"lambda-microvms.authentication.{token}",
             f"lambda-microvms.port.{port}"]  # fmt: skip
    async with connect(f"ws://{HOST}/ws", host="127.0.0.1", port=rig.proxy.http_port,
                       subprotocols=offer, open_timeout=10, close_timeout=5) as ws:  # type: ignore[arg-type]  # fmt: skip
        await ws.send("through the tunnel")
        return str(await ws.recv())


FORCE_H2 = {"x-aws-proxy-force-h2": "true"}
WAYS = ["http1", "http2", "http1-forced-h2c", "http2-forced-h2c", "websocket"]


async def ask(way: str, rig: Fleet, app: App, h2c_port: int, ws_port: int) -> int:
    """One request the way ``way`` says; its status (the WebSocket's: 200 if it echoed)."""
    if way == "http1":
        answer = await http1(rig, app.port)
    elif way == "http2":
        answer = await http2(rig, app.port)
    elif way == "http1-forced-h2c":
        answer = await http1(rig, h2c_port, "/h2", **FORCE_H2)
    elif way == "http2-forced-h2c":
        answer = await http2(rig, h2c_port, "/h2", **FORCE_H2)
    else:
        assert await websocket_echo(rig, ws_port) == "through the tunnel"
        return 200
    if answer.status_code == 200 and "forced" in way:
        assert json.loads(answer.content)["headers"][":path"] == "/h2"
    return answer.status_code


# -- the tests ----------------------------------------------------------------------------------


@pytest.mark.parametrize("way", WAYS)
async def test_every_way_in_reaches_the_app_through_its_hosts_tunnel(
    tmp_path: Path, app: App, h2c_port: int, ws_port: int, way: str
) -> None:
    async with fleet(tmp_path, one_host("a"), {"a": {VM}, "b": set()}) as rig:
        assert await ask(way, rig, app, h2c_port, ws_port) == 200
        assert rig.hosts["a"].asked == [VM]  # one tunnel, to the VM's host only
        assert rig.hosts["b"].asked == []
        assert rig.routes.forgotten == []


async def test_the_app_sees_the_request_as_sent_and_the_connection_is_kept(
    tmp_path: Path, app: App
) -> None:
    async with (
        fleet(tmp_path, one_host("a"), {"a": {VM}}) as rig,
        httpx.AsyncClient(timeout=10) as client,
    ):
        answers = [await client.get(f"{rig.url}/headers?n={i}", headers=rig.headers(app.port))
                   for i in range(3)]  # fmt: skip
    seen = [answer.json() for answer in answers]
    assert [answer.status_code for answer in answers] == [200, 200, 200]
    assert {s["client_port"] for s in seen} == {seen[0]["client_port"]}  # one app connection
    assert rig.hosts["a"].asked == [VM]  # and one tunnel for it
    headers = {k: v for k, v in seen[0]["headers"]}
    assert headers["host"] == HOST
    assert not [k for k in headers if k.startswith("x-aws-proxy")]
    assert app.state.hits == 3


@pytest.mark.parametrize("way", WAYS)
async def test_a_vm_that_moved_is_reached_on_its_new_host_after_one_re_resolve(
    tmp_path: Path, app: App, h2c_port: int, ws_port: int, way: str
) -> None:
    async with fleet(tmp_path, moved("a", "b"), {"a": set(), "b": {VM}}) as rig:
        assert await ask(way, rig, app, h2c_port, ws_port) == 200
        assert rig.routes.forgotten == [VM]  # the stale route was dropped once
        assert rig.routes.store_reads == 1  # and the store read once
        assert rig.hosts["a"].asked == [VM]  # NOT_HERE
        assert rig.hosts["b"].asked == [VM]
        assert await ask(way, rig, app, h2c_port, ws_port) == 200  # the new route is kept
        assert rig.routes.forgotten == [VM]
        assert rig.hosts["a"].asked == [VM]


@pytest.mark.parametrize("way", ["http1", "http2", "http2-forced-h2c", "http1-forced-h2c"])
async def test_a_vm_no_host_has_is_answered_as_not_running(
    tmp_path: Path, app: App, h2c_port: int, ws_port: int, way: str
) -> None:
    async with fleet(tmp_path, moved("a", "b"), {"a": set(), "b": set()}) as rig:
        port = h2c_port if "forced" in way else app.port
        get = http2 if way.startswith("http2") else http1
        answer = await get(rig, port, "/h2", **(FORCE_H2 if "forced" in way else {}))
        assert (answer.status_code, answer.text) == (502, "MicroVM is not running\n")
        assert rig.routes.forgotten == [VM]  # one re-resolve, not more
        assert (rig.hosts["a"].asked, rig.hosts["b"].asked) == ([VM], [VM])
    assert app.state.hits == 0


async def test_a_websocket_to_a_vm_no_host_has_is_refused_as_not_running(
    tmp_path: Path, ws_port: int
) -> None:
    async with fleet(tmp_path, moved("a", "b"), {"a": set(), "b": set()}) as rig:
        token = rig.headers(ws_port)["x-aws-proxy-auth"]
        request = (f"GET /ws HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\n"
                   "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   f"Sec-WebSocket-Protocol: lambda-microvms.authentication.{token}, "
                   f"lambda-microvms.port.{ws_port}\r\n\r\n")  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request.encode())
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 502 ")
        assert answer.endswith(b"\r\n\r\nMicroVM is not running\n")
        assert rig.routes.forgotten == [VM]


async def test_a_vm_gone_from_the_store_on_re_resolve_is_not_found(
    tmp_path: Path, app: App
) -> None:
    routes = moved("a", "b")
    del routes.store[VM]  # terminated meanwhile
    async with fleet(tmp_path, routes, {"a": set()}) as rig:
        answer = await http1(rig, app.port)
    assert (answer.status_code, answer.text) == (404, "MicroVM not found\n")


async def test_another_fleets_key_reaches_nothing(tmp_path: Path, app: App) -> None:
    async with fleet(tmp_path, one_host("a"), {"a": {VM}}, host_key=os.urandom(32)) as rig:
        plain = await http1(rig, app.port)
        h2 = await http2(rig, app.port)
    expected = (502, f"The app is not answering on port {app.port}\n")
    assert (plain.status_code, plain.text) == expected
    assert (h2.status_code, h2.text) == expected
    assert rig.hosts["a"].asked == []  # refused before the host looked for the VM
    assert app.state.hits == 0


async def test_a_guest_port_that_does_not_answer_is_a_502(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    async with fleet(tmp_path, one_host("a"), {"a": {VM}}) as rig:
        answer = await http1(rig, dead)
    assert (answer.status_code, answer.text) == (502, f"The app is not answering on port {dead}\n")
    assert rig.routes.forgotten == []  # the host has the VM: nothing to re-resolve


async def test_hosts_addresses_are_read_once_for_200_requests_on_fresh_connections(
    tmp_path: Path, app: App
) -> None:
    async with fleet(tmp_path, one_host("a"), {"a": {VM}}) as rig:
        for _ in range(10):
            batch = [fresh_get(rig, app.port) for _ in range(20)]
            assert set(await asyncio.gather(*batch)) == {200}
            rig.now += 5  # time alone does not make a known address stale
        assert len(rig.hosts["a"].asked) == 200  # every request opened its own tunnel
        assert rig.loads == 1


async def test_hosts_addresses_are_read_at_most_once_a_second_when_routes_are_stale(
    tmp_path: Path, app: App
) -> None:
    """Every NOT_HERE marks the addresses stale, every unknown host is a miss: still one read
    per second of the cache's clock, however many requests."""
    routes = one_host("a")
    async with fleet(tmp_path, routes, {"a": set(), "b": {VM}}) as rig:
        for _ in range(10):  # 200 requests, 400 NOT_HEREs
            batch = [fresh_get(rig, app.port) for _ in range(20)]
            assert set(await asyncio.gather(*batch)) == {502}
        assert len(rig.hosts["a"].asked) == 400
        assert rig.loads == 1
        routes.store[VM] = on_host("b")
        rig.now += 0.9
        for _ in range(5):
            routes.cached[VM] = on_host("c")  # a host the proxy does not know: a miss
            assert await fresh_get(rig, app.port) == 200
        assert rig.loads == 1
        rig.now += 0.1
        for _ in range(5):
            routes.cached[VM] = on_host("c")
            assert await fresh_get(rig, app.port) == 200
        assert rig.loads == 2
        assert len(rig.hosts["b"].asked) == 10
