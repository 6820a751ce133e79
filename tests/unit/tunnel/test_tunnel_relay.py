"""The host's tunnel listener (embervm.host.tunnel) and the proxy's dialer
(embervm.proxy.host_dial) over loopback, a real TCP server standing in for the guest: bytes
both ways, a large transfer under backpressure, half-close, NOT_HERE, UNREACHABLE, REFUSED, a
preamble sent a byte a second cut at the deadline, the connection caps, activity, logging."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from embervm.host import tunnel as tunnel_module
from embervm.host.tunnel import TunnelLimits, TunnelListener
from embervm.proxy.host_dial import (
    GuestUnreachable,
    NotHere,
    TunnelError,
    TunnelRefused,
    dial_via_host,
    split_address,
)
from embervm.tunnel_wire import Answer, new_preamble

pytestmark = pytest.mark.timeout(60)


KEY = os.urandom(32)
VM = "mvm-0123456789abcdef0123"
ELSEWHERE = "mvm-fedcba9876543210fedc"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The guest's app: echoes, and on EOF says how many bytes it got, then closes."""
    total = 0
    while data := await reader.read(65536):
        total += len(data)
        writer.write(data)
        await writer.drain()
    writer.write(b"got %d\n" % total)
    await writer.drain()
    writer.close()


@dataclass
class Rig:
    listener: TunnelListener
    guest_port: int
    activity: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.listener.port}"

    async def dial(self, vm: str = VM, port: int | None = None, key: bytes = KEY) -> Streams:
        port = self.guest_port if port is None else port
        return await dial_via_host(self.address, key, vm, port, timeout=5)

    async def raw(self) -> Streams:
        return await asyncio.open_connection("127.0.0.1", self.listener.port)


Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@contextlib.asynccontextmanager
async def guest_server(handler: Handler = echo) -> AsyncIterator[int]:
    """A TCP server standing in for the guest's port; its connections end with it."""
    tasks: set[asyncio.Task[None]] = set()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)  # type: ignore[arg-type]
        try:
            await handler(reader, writer)
        except asyncio.CancelledError:  # the server's end; 3.11 logs a cancelled handler
            writer.transport.abort()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()
        await asyncio.sleep(0.01)  # closed transports let go of their sockets


@contextlib.asynccontextmanager
async def rig(
    handler: Handler = echo,
    *,
    limits: TunnelLimits | None = None,
    resolve: Callable[[str], str | None] | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[Rig]:
    async with guest_server(handler) as guest_port:
        activity: list[str] = []
        listener = TunnelListener(
            KEY,
            resolve or (lambda vm: "127.0.0.1" if vm == VM else None),
            host="127.0.0.1",
            port=0,
            limits=limits,
            on_activity=activity.append,
            clock=clock,
        )
        await listener.start()
        try:
            yield Rig(listener, guest_port, activity)
            # whatever a test did, every connection's slot comes back
            await until(lambda: listener.held == 0 and listener.pending == 0)
            assert not listener._by_peer
        finally:
            await listener.stop()


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> None:
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110  # polls the listener's counters
            await asyncio.sleep(0.01)


async def read_all(reader: asyncio.StreamReader) -> bytes:
    async with asyncio.timeout(10):
        return await reader.read()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_bytes_go_both_ways_and_the_vm_hears_of_activity() -> None:
    async with rig() as r:
        reader, writer = await r.dial()
        for n in range(3):
            writer.write(b"ping %d\n" % n)
            assert await reader.readline() == b"ping %d\n" % n
        assert r.activity == [VM]  # three chunks within a second: once
        writer.close()


async def test_activity_is_reported_at_most_once_per_interval(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(tunnel_module, "ACTIVITY_INTERVAL", 0.2)
    async with rig() as r:
        reader, writer = await r.dial()
        for _ in range(3):
            for _ in range(5):
                writer.write(b"x\n")
                await reader.readline()
            await asyncio.sleep(0.25)
        assert r.activity == [VM] * 3
        writer.close()


async def test_activity_callback_errors_do_not_end_the_relay(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with rig() as r:

        def broken(vm: str) -> None:
            raise RuntimeError("bug")

        r.listener.on_activity = broken
        reader, writer = await r.dial()
        writer.write(b"still\n")
        assert await reader.readline() == b"still\n"
        writer.close()
    assert "on_activity" in caplog.text


async def test_a_large_transfer_arrives_whole_both_ways() -> None:
    payload = os.urandom(24 * 1024 * 1024)
    async with rig() as r:
        reader, writer = await r.dial()

        async def send() -> None:
            for at in range(0, len(payload), 1 << 20):
                writer.write(payload[at : at + (1 << 20)])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        received = await read_all(reader)
        await sender
        assert received[: len(payload)] == payload
        assert received[len(payload) :] == b"got %d\n" % len(payload)
        writer.close()


async def test_a_guest_that_does_not_read_holds_the_client_back_then_gets_every_byte() -> None:
    """Backpressure: the listener reads from the proxy only as fast as the guest takes it, so
    a guest that stops reading stops the sender (within the sockets' buffers), and nothing is
    lost once it reads again."""
    go = asyncio.Event()
    got = hashlib.sha256()
    counted = [0]

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        await go.wait()
        while data := await reader.read(1 << 20):
            got.update(data)
            counted[0] += len(data)
        writer.close()

    async with rig(slow) as r:
        reader, writer = await r.dial()
        sent = hashlib.sha256()
        chunk = os.urandom(1 << 20)
        written = 0
        limit = 256 << 20
        while written < limit:
            writer.write(chunk)
            sent.update(chunk)
            written += len(chunk)
            try:
                async with asyncio.timeout(1.0):
                    await writer.drain()
            except TimeoutError:
                break
        assert written < 96 << 20, "the listener kept reading for a guest that did not"
        go.set()
        await writer.drain()
        writer.write_eof()
        await until(lambda: counted[0] == written, seconds=20)
        assert got.digest() == sent.digest()
        await read_all(reader)
        writer.close()


async def test_half_close_is_passed_on_both_ways() -> None:
    async with rig() as r:
        reader, writer = await r.dial()
        writer.write(b"abc")
        writer.write_eof()  # the guest sees EOF, answers after it, then closes
        assert await read_all(reader) == b"abcgot 3\n"
        writer.close()


async def test_the_guest_may_speak_first() -> None:
    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-guest\r\n")
        await writer.drain()
        await echo(reader, writer)

    async with rig(banner) as r:
        reader, writer = await r.dial()  # the answer line is read, not a byte more
        assert await reader.readline() == b"SSH-2.0-guest\r\n"
        writer.write_eof()
        assert await read_all(reader) == b"got 0\n"
        writer.close()


async def test_bytes_sent_behind_the_preamble_reach_the_guest() -> None:
    async with rig() as r:
        reader, writer = await r.raw()
        writer.write(new_preamble(KEY, VM, r.guest_port) + b"early\n")
        assert await reader.readline() == Answer.OK.line
        assert await reader.readline() == b"early\n"
        assert r.activity == [VM]
        writer.close()


async def test_a_vm_that_is_not_here_raises_not_here() -> None:
    async with rig() as r:
        with pytest.raises(NotHere):
            await r.dial(vm=ELSEWHERE)
        assert not isinstance(NotHere("x"), OSError)  # the caller must re-resolve, not 502


async def test_a_guest_port_that_does_not_answer_is_unreachable() -> None:
    async with rig() as r:
        with pytest.raises(GuestUnreachable) as caught:
            await r.dial(port=closed_port())
        assert isinstance(caught.value, OSError)  # like open_upstream's dead guest


async def test_a_guest_connect_that_hangs_is_unreachable_at_the_connect_timeout() -> None:
    with socket.socket() as full, socket.socket() as first:
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # room for one connection nobody accepts: the next SYNs are dropped
        first.connect(full.getsockname())
        async with rig(limits=TunnelLimits(connect_timeout=0.5)) as r:
            started = time.monotonic()
            with pytest.raises(GuestUnreachable):
                await r.dial(port=full.getsockname()[1])
            assert 0.4 < time.monotonic() - started < 3


async def test_a_wrong_key_is_refused() -> None:
    async with rig() as r:
        with pytest.raises(TunnelRefused):
            await r.dial(key=os.urandom(32))


async def test_a_host_clock_more_than_30_s_off_is_refused() -> None:
    async with rig(clock=lambda: time.time() + 31) as r:
        with pytest.raises(TunnelRefused):
            await r.dial()


async def test_a_replayed_preamble_is_refused_on_the_wire() -> None:
    async with rig() as r:
        line = new_preamble(KEY, VM, r.guest_port)
        first_reader, first = await r.raw()
        first.write(line)
        assert await first_reader.readline() == Answer.OK.line
        second_reader, second = await r.raw()
        second.write(line)
        assert await read_all(second_reader) == Answer.REFUSED.line
        first.close()
        second.close()


async def test_garbage_gets_refused_and_closed() -> None:
    async with rig() as r:
        reader, writer = await r.raw()
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert await read_all(reader) == Answer.REFUSED.line
        writer.close()


async def test_an_oversize_preamble_is_cut_without_waiting_for_the_deadline() -> None:
    async with rig() as r:
        reader, writer = await r.raw()
        writer.write(b"x" * 600)
        started = time.monotonic()
        with contextlib.suppress(ConnectionError):
            assert await read_all(reader) == b""
        assert time.monotonic() - started < 1.0
        writer.close()


async def test_a_preamble_sent_a_byte_a_second_is_cut_at_the_deadline() -> None:
    limits = TunnelLimits(preamble_timeout=2.5)
    async with rig(limits=limits) as r:
        reader, writer = await r.raw()
        line = new_preamble(KEY, VM, r.guest_port)
        started = time.monotonic()
        cut_at = None
        for byte in line:
            try:
                writer.write(bytes([byte]))
                await writer.drain()
            except ConnectionError:
                cut_at = time.monotonic() - started
                break
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    if await reader.read(100) == b"":  # EOF: cut
                        cut_at = time.monotonic() - started
                        break
        assert cut_at is not None
        assert 2.0 <= cut_at <= 4.0
        assert r.listener.pending == 0
        writer.close()


async def test_connections_per_peer_are_capped_and_their_slots_come_back() -> None:
    async with rig(limits=TunnelLimits(max_per_peer=2)) as r:
        one = await r.dial()
        two = await r.raw()  # still in its preamble: holds a slot too
        await until(lambda: r.listener.held == 2)
        with pytest.raises((TunnelError, ConnectionError)):
            await r.dial()  # turned away at accept, before a read
        one[1].close()
        await until(lambda: r.listener.held == 1)
        three = await r.dial()
        three[1].write(b"hi\n")
        assert await three[0].readline() == b"hi\n"
        two[1].close()
        three[1].close()


async def test_unauthenticated_connections_cannot_take_every_slot() -> None:
    async with rig(limits=TunnelLimits(max_pending=2)) as r:
        idle = [await r.raw() for _ in range(2)]
        await until(lambda: r.listener.pending == 2)
        with pytest.raises((TunnelError, ConnectionError)):
            await r.dial()
        for _, writer in idle:
            writer.close()
        await until(lambda: r.listener.pending == 0)
        _, writer = await r.dial()  # authenticated ones no longer count as pending
        more = await r.dial()
        assert r.listener.pending == 0
        writer.close()
        more[1].close()


async def test_the_total_cap_holds() -> None:
    async with rig(limits=TunnelLimits(max_connections=1)) as r:
        held = await r.dial()
        with pytest.raises((TunnelError, ConnectionError)):
            await r.dial()
        held[1].close()


async def test_refusals_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="embervm.host.tunnel")
    async with rig() as r:
        for _ in range(30):
            reader, writer = await r.raw()
            writer.write(b"nonsense\n")
            await read_all(reader)
            writer.close()
    warnings = [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
    assert 1 <= len(warnings) <= 2
    assert "malformed preamble" in warnings[0].getMessage()
    assert r.listener.refusals.held_back >= 28


async def test_a_broken_resolve_closes_without_an_answer_and_the_listener_goes_on() -> None:
    calls = []

    def resolve(vm: str) -> str | None:
        calls.append(vm)
        if len(calls) == 1:
            raise RuntimeError("store down")
        return "127.0.0.1"

    async with rig(resolve=resolve) as r:
        with pytest.raises(TunnelError, match="before answering"):
            await r.dial()
        reader, writer = await r.dial()
        writer.write(b"ok\n")
        assert await reader.readline() == b"ok\n"
        writer.close()


async def test_a_guest_that_breaks_the_connection_ends_the_client_side_too() -> None:
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        writer.transport.abort()

    async with rig(reset) as r:
        reader, writer = await r.dial()
        writer.write(b"go\n")  # the client never half-closes: only the reset can end it
        with contextlib.suppress(ConnectionError):
            assert await read_all(reader) == b""
        writer.close()


async def test_stop_ends_the_relays(caplog: pytest.LogCaptureFixture) -> None:
    async with guest_server() as guest_port:
        listener = TunnelListener(KEY, lambda vm: "127.0.0.1", host="127.0.0.1", port=0)
        await listener.start()
        reader, writer = await dial_via_host(
            f"127.0.0.1:{listener.port}", KEY, VM, guest_port, timeout=5
        )
        await listener.stop()
        with contextlib.suppress(ConnectionError):
            assert await read_all(reader) == b""
        assert listener.held == 0
        writer.close()
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]


async def test_stop_does_not_wait_for_a_guest_connect_that_hangs() -> None:
    with socket.socket() as full, socket.socket() as first:
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # the next connects hang (their SYNs are dropped)
        first.connect(full.getsockname())
        listener = TunnelListener(
            KEY,
            lambda vm: "127.0.0.1",
            host="127.0.0.1",
            port=0,
            limits=TunnelLimits(connect_timeout=30),
        )
        await listener.start()
        address = f"127.0.0.1:{listener.port}"
        port = full.getsockname()[1]
        dial = asyncio.create_task(dial_via_host(address, KEY, VM, port, timeout=30))
        await until(lambda: listener.held == 1 and listener.pending == 0)
        started = time.monotonic()
        await listener.stop()
        assert time.monotonic() - started < 1
        with pytest.raises((TunnelError, ConnectionError)):
            await dial


def test_a_guest_is_not_read_before_it_is_linked_to_its_client() -> None:
    """A guest that speaks first (a banner) must not be read while the listener still
    answers the proxy: a byte read then would have nowhere to go."""

    class Transport(asyncio.Transport):
        paused = False

        def pause_reading(self) -> None:
            self.paused = True

        def get_extra_info(self, name: str, default: object = None) -> object:
            return default

    transport = Transport()
    tunnel_module._Guest().connection_made(transport)
    assert transport.paused


async def test_the_dialer_times_out_on_a_host_that_never_answers() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async with guest_server(silent) as port:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await dial_via_host(f"127.0.0.1:{port}", KEY, VM, 8080, timeout=0.3)
        assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    "answer", [b"HTTP/1.1 400 Bad Request\r\n", b"OK\r\n", b"MAYBE\n", b"x" * 70000]
)
async def test_the_dialer_refuses_answers_that_are_not_the_protocol(answer: bytes) -> None:
    async def wrong(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(answer)
        await writer.drain()
        await asyncio.sleep(5)

    async with guest_server(wrong) as port:
        with pytest.raises(TunnelError):
            await dial_via_host(f"127.0.0.1:{port}", KEY, VM, 8080, timeout=5)


async def test_the_dialer_refuses_bad_arguments_before_dialling() -> None:
    with pytest.raises(ValueError, match="MicroVM id"):
        await dial_via_host("127.0.0.1:1", KEY, "vm-1", 8080, timeout=1)
    with pytest.raises(ValueError, match="ADDR:PORT"):
        await dial_via_host("127.0.0.1", KEY, VM, 8080, timeout=1)


def test_tunnel_addresses() -> None:
    assert split_address("10.0.0.5:7000") == ("10.0.0.5", 7000)
    assert split_address("[2001:db8::1]:7000") == ("2001:db8::1", 7000)
    assert split_address("host.example:1") == ("host.example", 1)
    for bad in ("10.0.0.5", ":7000", "10.0.0.5:0", "10.0.0.5:65536", "h:x", "h:-1", ""):
        with pytest.raises(ValueError, match="ADDR:PORT"):
            split_address(bad)
