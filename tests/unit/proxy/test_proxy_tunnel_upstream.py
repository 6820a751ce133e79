"""``proxy.upstream.TunnelUpstream`` on its own: the protocol-callback dial (``link``) hands on
the bytes that came with the host's OK and raises what ``dial_via_host`` raises for every other
answer, on asyncio and uvloop; ``HostAddresses`` reads once for concurrent misses, keeps what it
knew when a read fails, drops addresses it cannot dial, and is marked stale only by answers that
say something about the host's address."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

import pytest
import uvloop

from embervm.host.tunnel import TunnelListener
from embervm.proxy.admission import Target
from embervm.proxy.host_dial import GuestUnreachable, NotHere, TunnelError, TunnelRefused
from embervm.proxy.upstream import HostAddresses, TunnelUpstream

pytestmark = pytest.mark.timeout(60)

KEY = os.urandom(32)
VM = "mvm-0123456789abcdef0123"
TARGET = Target(VM, "192.0.2.1", 8080, 32, "h1")
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop,
    "uvloop": uvloop.new_event_loop,
}


def run_on(loop: str, main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main(), 30))


class Collect(asyncio.Protocol):
    """An app connection's protocol that keeps what it hears."""

    def __init__(self) -> None:
        self.data = b""
        self.eof = asyncio.Event()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof.set()
        return True


@contextlib.asynccontextmanager
async def fake_host(answer: bytes, *, close: bool = True) -> AsyncIterator[str]:
    """A host that reads the preamble line and writes ``answer`` in one write."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            await reader.readuntil(b"\n")
            writer.write(answer)
            await writer.drain()
            if not close:
                await reader.read()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()
        await server.wait_closed()
        await asyncio.sleep(0)


def tunnel(address: str, **kwargs: Any) -> TunnelUpstream:
    async def hosts() -> Mapping[str, str]:
        return {"h1": address}

    return TunnelUpstream(KEY, hosts, timeout=5, **kwargs)


@pytest.mark.parametrize("loop", LOOPS)
def test_link_hands_the_bytes_behind_the_ok_and_the_eof_to_the_app(loop: str) -> None:
    async def main() -> None:
        async with fake_host(b"OK\nserver speaks first", close=True) as address:
            app = await tunnel(address).link(TARGET, Collect)
            await asyncio.wait_for(app.eof.wait(), 5)
            assert app.data == b"server speaks first"
            assert app.transport is not None
            app.transport.close()

    run_on(loop, main)


@pytest.mark.parametrize("loop", LOOPS)
def test_link_through_a_real_listener_carries_bytes_both_ways(loop: str) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
        writer.close()

    async def main() -> None:
        guest = await asyncio.start_server(echo, "127.0.0.1", 0)
        port = guest.sockets[0].getsockname()[1]
        listener = TunnelListener(KEY, lambda vm: "127.0.0.1" if vm == VM else None,
                                  host="127.0.0.1", port=0)  # fmt: skip
        await listener.start()
        try:
            upstream = tunnel(f"127.0.0.1:{listener.port}")
            app = await upstream.link(TARGET._replace(port=port), Collect)
            assert app.transport is not None
            payload = os.urandom(1 << 20)
            app.transport.write(payload)
            app.transport.write_eof()
            await asyncio.wait_for(app.eof.wait(), 10)
            assert app.data == payload
            app.transport.close()
            with pytest.raises(NotHere):
                await upstream.link(TARGET._replace(microvm_id="mvm-fedcba9876543210fedc"),
                                    Collect)  # fmt: skip
        finally:
            await listener.stop()
            guest.close()

    run_on(loop, main)


ANSWERS: list[tuple[bytes, type[Exception]]] = [
    (b"NOT_HERE\n", NotHere),
    (b"UNREACHABLE\n", GuestUnreachable),
    (b"REFUSED\n", TunnelRefused),
    (b"MAYBE\n", TunnelError),
    (b"OK but no end of line", TunnelError),
    (b"", TunnelError),  # closed before answering
]


@pytest.mark.parametrize(("answer", "raised"), ANSWERS)
@pytest.mark.parametrize("how", ["link", "connect"])
async def test_both_dials_raise_the_same_for_every_other_answer(
    answer: bytes, raised: type[Exception], how: str
) -> None:
    async with fake_host(answer) as address:
        upstream = tunnel(address)
        dial: Callable[[], Awaitable[object]]
        if how == "link":
            dial = lambda: upstream.link(TARGET, Collect)  # noqa: E731
        else:
            dial = lambda: upstream.connect(TARGET)  # noqa: E731
        with pytest.raises(raised) as caught:
            await dial()
    assert type(caught.value) is raised


async def test_a_host_that_does_not_answer_in_time_is_a_timeout() -> None:
    async with fake_host(b"", close=False) as address:  # reads the preamble, says nothing
        upstream = TunnelUpstream(KEY, lambda: _const({"h1": address}), timeout=0.2)
        with pytest.raises(TimeoutError):
            await upstream.link(TARGET, Collect)


async def _const(value: Mapping[str, str]) -> Mapping[str, str]:
    return value


@pytest.mark.parametrize(
    ("answer", "stale"),
    [(b"NOT_HERE\n", True), (b"UNREACHABLE\n", False), (b"REFUSED\n", False)],
)
async def test_only_answers_about_the_host_make_its_address_stale(
    answer: bytes, stale: bool
) -> None:
    async with fake_host(answer) as address:
        upstream = tunnel(address)
        with pytest.raises((NotHere, GuestUnreachable, TunnelRefused)):
            await upstream.link(TARGET, Collect)
    assert upstream.hosts.fresh is not stale


async def test_a_host_that_is_not_listening_makes_its_address_stale() -> None:
    async with fake_host(b"") as address:
        pass  # closed: nothing listens there any more
    upstream = tunnel(address)
    with pytest.raises(ConnectionRefusedError):
        await upstream.connect(TARGET)
    assert upstream.hosts.fresh is False


async def test_an_unknown_host_is_not_here() -> None:
    upstream = tunnel("127.0.0.1:1")
    with pytest.raises(NotHere):
        await upstream.connect(TARGET._replace(host_id="elsewhere"))
    with pytest.raises(NotHere):
        await upstream.link(TARGET._replace(host_id=None), Collect)


async def test_concurrent_misses_share_one_read() -> None:
    gate = asyncio.Event()
    reads = 0

    async def load() -> Mapping[str, str]:
        nonlocal reads
        reads += 1
        await gate.wait()
        return {"h1": "10.0.0.1:8790"}

    hosts = HostAddresses(load, interval=0)  # one read at a time, not only once a second
    lookups = [asyncio.create_task(hosts.address("h1")) for _ in range(50)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await asyncio.gather(*lookups) == ["10.0.0.1:8790"] * 50
    assert reads == 1
    assert await hosts.address("h1") == "10.0.0.1:8790"
    assert reads == 1  # fresh: no read


async def test_a_failed_read_keeps_what_was_known_and_bad_addresses_are_dropped() -> None:
    now = 0.0
    rows: Mapping[str, str] | None = {"h1": "10.0.0.1:8790", "h2": "no port", "h3": "[::1]:9"}

    async def load() -> Mapping[str, str]:
        if rows is None:
            raise ConnectionError("the store is away")
        return rows

    hosts = HostAddresses(load, clock=lambda: now)
    assert await hosts.address("h1") == "10.0.0.1:8790"
    assert await hosts.address("h2") is None
    assert await hosts.address("h3") == "[::1]:9"
    rows, now = None, 5.0
    hosts.stale()
    assert await hosts.address("h1") == "10.0.0.1:8790"
    assert hosts.reads == 2
    assert hosts.fresh is False  # the next chance reads again
