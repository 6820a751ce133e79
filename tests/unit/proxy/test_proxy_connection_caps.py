"""Client connections are capped in all and per source address (audit A8): one over a cap is
closed as soon as it is accepted (before TLS, before a read) while the ones held keep working,
a connection's slot comes back whichever session ends it, the defaults let 1,000 connections
from one address in, and the open files limit is raised at start."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.framework.proxy_unit_harness import DOMAIN, VM, App, LocalShells, Routes, running, until

from embervm.config import Settings
from embervm.contracts import PortGrant
from embervm.core.tokens import TokenAuthority
from embervm.proxy import EndpointProxy
from embervm.proxy.admission import ConnectionLimits, source_of
from embervm.proxy.server import FD_RESERVE, connection_caps

pytestmark = pytest.mark.timeout(60)


def test_caps_count_in_all_and_per_source_address() -> None:
    limits = ConnectionLimits(total=3, per_address=2)
    first, second = limits.take("10.0.0.1"), limits.take("10.0.0.1")
    assert first is not None
    assert second is not None
    assert limits.take("10.0.0.1") is None  # per address
    third = limits.take("10.0.0.2")
    assert third is not None
    assert limits.take("10.0.0.3") is None  # in all
    first.release()
    first.release()  # twice is once
    assert limits.held == 2
    assert limits.take("10.0.0.3") is not None


def test_ipv6_sources_count_per_64_and_mapped_ipv4_as_ipv4() -> None:
    assert source_of("2001:db8:1:2:aaaa::1") == source_of("2001:db8:1:2:bbbb::2")
    assert source_of("2001:db8:1:2::1") != source_of("2001:db8:1:3::1")
    assert source_of("::ffff:192.0.2.7") == "192.0.2.7"


def test_the_defaults_let_a_thousand_connections_from_one_address_in() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = connection_caps(Settings(), min(hard, 1 << 20))
    assert limits.per_address >= 1000
    assert limits.total >= 1000


def test_the_total_cap_stays_within_the_open_files_limit() -> None:
    assert connection_caps(Settings(), FD_RESERVE + 2_000).total == 1_000


# -- through the proxy ---------------------------------------------------------------------


@dataclass
class Capped:
    proxy: EndpointProxy
    tokens: TokenAuthority
    ca: str


@contextlib.asynccontextmanager
async def capped_proxy(tmp: Path, *, total: int, per_ip: int) -> AsyncIterator[Capped]:
    routes = Routes({VM: running(VM)})
    tokens = TokenAuthority(tmp / "keys" / "tokens.json")
    settings = Settings(
        data_dir=tmp, proxy_port=0, proxy_http_port=0, domain=DOMAIN,
        proxy_max_connections=total, proxy_max_connections_per_ip=per_ip,
    )  # fmt: skip
    proxy = EndpointProxy(settings, lifecycle=routes, tokens=tokens, shells=LocalShells())
    await proxy.start()
    try:
        yield Capped(proxy, tokens, str(settings.tls_dir / "ca.pem"))
    finally:
        await proxy.stop()


def get(capped: Capped, port: int) -> bytes:
    token = capped.tokens.issue(VM, kind="endpoint", ports=PortGrant(all_ports=True),
                                expires_in_minutes=5)  # fmt: skip
    return (f"GET /headers HTTP/1.1\r\nHost: {VM}.{DOMAIN}\r\nX-aws-proxy-auth: {token}\r\n"
            f"X-aws-proxy-port: {port}\r\n\r\n").encode()  # fmt: skip


async def answered(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bool:
    writer.write(data)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))  # fmt: skip
    await asyncio.wait_for(reader.readexactly(length), 10)
    return head.startswith(b"HTTP/1.1 200 ")


async def turned_away(port: int) -> bool:
    """A connection to ``port`` that sends nothing is closed by the proxy (a server doing TLS
    would wait for the ClientHello, an HTTP one for a request)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        return await asyncio.wait_for(reader.read(1), 10) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


@pytest.mark.parametrize(("total", "per_ip"), [(100, 2), (2, 100)])
async def test_over_a_cap_new_connections_are_closed_at_once_and_held_ones_keep_working(
    tmp_path: Path, app: App, total: int, per_ip: int
) -> None:
    async with capped_proxy(tmp_path, total=total, per_ip=per_ip) as capped:
        proxy = capped.proxy
        plain = await asyncio.open_connection("127.0.0.1", proxy.http_port)
        assert await answered(*plain, get(capped, app.port))
        tls = ssl.create_default_context(cafile=capped.ca)
        secure = await asyncio.open_connection("127.0.0.1", proxy.tls_port, ssl=tls,
                                               server_hostname=f"{VM}.{DOMAIN}")  # fmt: skip
        assert await turned_away(proxy.tls_port)
        assert await turned_away(proxy.http_port)
        assert await answered(*plain, get(capped, app.port))  # the held ones go on
        assert await answered(*secure, get(capped, app.port))
        secure[1].close()
        await until(lambda: proxy.limits.held == 1)  # its slot came back
        again = await asyncio.open_connection("127.0.0.1", proxy.http_port)
        assert await answered(*again, get(capped, app.port))
        for _, writer in (plain, again):
            writer.close()
        await until(lambda: proxy.limits.held == 0)


async def served_as_http2(port: int) -> asyncio.StreamWriter:
    """A connection that opens with HTTP/2's preface (prior knowledge) and gets the server's
    SETTINGS: the proxy handed it to its HTTP/2 session."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert len(await asyncio.wait_for(reader.readexactly(9), 10)) == 9
    return writer


async def test_a_handed_off_connection_gives_its_slot_back(tmp_path: Path) -> None:
    async with capped_proxy(tmp_path, total=100, per_ip=1) as capped:
        proxy = capped.proxy
        first = await served_as_http2(proxy.http_port)
        assert await turned_away(proxy.http_port)
        first.close()
        await until(lambda: proxy.limits.held == 0)
        (await served_as_http2(proxy.http_port)).close()


async def test_a_thousand_connections_from_one_address_are_let_in(tmp_path: Path, app: App) -> None:
    async with capped_proxy(tmp_path, total=Settings.proxy_max_connections,
                            per_ip=Settings.proxy_max_connections_per_ip) as capped:  # fmt: skip
        held = [await asyncio.open_connection("127.0.0.1", capped.proxy.http_port)
                for _ in range(1000)]  # fmt: skip
        try:
            await until(lambda: capped.proxy.limits.held == 1000)
            last = await asyncio.open_connection("127.0.0.1", capped.proxy.http_port)
            assert await answered(*last, get(capped, app.port))
            last[1].close()
        finally:
            for _, writer in held:
                writer.close()


async def test_start_raises_the_soft_open_files_limit_to_the_hard_one(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 512:
        pytest.skip("the hard limit leaves nothing to raise")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        async with capped_proxy(tmp_path, total=10, per_ip=10):
            raised, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert raised == (1 << 20 if hard == resource.RLIM_INFINITY else hard)
