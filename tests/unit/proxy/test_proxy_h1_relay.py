"""The HTTP/1.1 relay (``h1.relay_h1``) against raw apps written byte by byte: the token is checked
on every request of a kept connection, a cut answer cuts the client's connection, an app that
says more than its answer is not reused, neither side is buffered without bound
(backpressure), timeouts end idle connections."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
from tests.framework.proxy_unit_harness import OTHER, VM, Rig, suspended, until

from embervm.proxy.h1 import relay_h1

pytestmark = pytest.mark.timeout(60)

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
BIG = 64 * 1024 * 1024  # far more than every socket buffer on the way


@dataclass
class RawApp:
    port: int
    connections: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)


@contextlib.asynccontextmanager
async def raw_app(handler: Handler) -> AsyncIterator[RawApp]:
    """An app on 127.0.0.1 whose every connection runs ``handler``; on exit, waits until the
    proxy has let go of each (a handler ends when its connection does)."""
    app = RawApp(0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        app.connections += 1
        task = asyncio.current_task()
        assert task is not None
        app.handlers.add(task)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    app.port = server.sockets[0].getsockname()[1]
    try:
        yield app
    finally:
        server.close()
        await until(lambda: all(task.done() for task in app.handlers), timeout=10)


def request(rig: Rig, port: int, first: str = "GET / HTTP/1.1", *extra: str,
            vm_id: str | None = None) -> bytes:  # fmt: skip
    headers = rig.headers(port) if vm_id is None else rig.headers(port, vm_id=vm_id)
    fields = [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join([first, *fields, *extra]) + "\r\n\r\n").encode()


async def answer_ok(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while await reader.readuntil(b"\r\n\r\n"):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")


async def test_the_token_is_checked_on_every_request_of_a_kept_connection(rig: Rig) -> None:
    async with raw_app(answer_ok) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request(rig, app.port))
        first = await asyncio.wait_for(reader.readuntil(b"ok"), 10)
        other = {**rig.headers(app.port), "x-aws-proxy-auth": rig.token(OTHER)}
        writer.write(b"GET /again HTTP/1.1\r\n" + b"".join(
            f"{k}: {v}\r\n".encode() for k, v in other.items()) + b"\r\n")  # fmt: skip
        second = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    assert first.startswith(b"HTTP/1.1 200")
    assert second.startswith(b"HTTP/1.1 403")
    assert b"ok" not in second
    assert app.connections == 1


@pytest.mark.parametrize("fresh", [True, False], ids=["core-knows", "core-is-asked"])
async def test_kept_connection_requests_with_and_without_a_fresh_lookup(
    rig: Rig, fresh: bool
) -> None:
    """Core knows the VM (admitted at once, no task) or must be asked (awaited): the same
    answers either way, and a VM that stops running is noticed on the next request."""
    rig.routes.fresh_lookups = fresh
    async with raw_app(answer_ok) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        for _ in range(3):
            writer.write(request(rig, app.port))
            assert (await asyncio.wait_for(reader.readuntil(b"ok"), 10)).startswith(b"HTTP/1.1 200")
        rig.routes.vms[VM] = suspended(VM, auto_resume=False)
        writer.write(request(rig, app.port))
        last = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    assert last.startswith(b"HTTP/1.1 502")  # suspended without auto-resume
    assert rig.routes.activity == [VM] * 3
    assert app.connections == 1


async def test_a_token_of_another_vm_with_its_host_is_refused_on_a_kept_connection(
    rig: Rig,
) -> None:
    async with raw_app(answer_ok) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request(rig, app.port))
        await asyncio.wait_for(reader.readuntil(b"ok"), 10)
        forged = request(rig, app.port).replace(b"x-aws-proxy-auth: ", b"x-aws-proxy-auth: x")
        writer.write(forged)
        second = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    assert second.startswith(b"HTTP/1.1 403")


async def test_an_answer_cut_short_by_the_app_cuts_the_client_connection(rig: Rig) -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")
        await writer.drain()

    async with raw_app(cut) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request(rig, app.port))
        received = await asyncio.wait_for(reader.read(-1), 10)  # the proxy closes: no hang
        writer.close()
    assert received.startswith(b"HTTP/1.1 200")
    assert received.endswith(b"only ten b")
    await until(lambda: not rig.proxy.admission._open)


async def test_an_app_that_closes_before_answering_is_502(rig: Rig) -> None:
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")

    async with raw_app(hang_up) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request(rig, app.port))
        received = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    assert received.startswith(b"HTTP/1.1 502")


async def test_an_answer_ended_by_close_is_relayed_whole(rig: Rig) -> None:
    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\nuntil the end")

    async with raw_app(http10) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request(rig, app.port))
        received = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    assert received == b"HTTP/1.0 200 OK\r\n\r\nuntil the end"


async def test_an_app_that_sends_more_than_its_answer_is_not_reused(rig: Rig) -> None:
    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                         b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforged")  # fmt: skip

    async with raw_app(chatty) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        for _ in range(2):
            writer.write(request(rig, app.port))
            assert (await asyncio.wait_for(reader.readuntil(b"ok"), 10)).endswith(b"\r\n\r\nok")
        writer.close()
    assert app.connections == 2


async def test_pipelined_requests_with_bodies_reach_the_app_in_order(rig: Rig) -> None:
    async def echo_bodies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (length, body))

    async with raw_app(echo_bodies) as app:
        burst = b"".join(request(rig, app.port, "POST / HTTP/1.1", f"Content-Length: {len(b)}")
                         + b for b in (b"one", b"two!", b"three"))  # fmt: skip
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(burst)
        received = await asyncio.wait_for(reader.readuntil(b"three"), 10)
        writer.close()
    assert received.count(b"HTTP/1.1 200") == 3
    assert received.index(b"one") < received.index(b"two!") < received.index(b"three")


async def test_a_bad_chunk_line_is_400_and_ends_the_connection(rig: Rig) -> None:
    async def wants_the_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readuntil(b"0\r\n\r\n")  # never comes: the proxy hangs up first
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    async with raw_app(wants_the_body) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request(rig, app.port, "POST / HTTP/1.1", "Transfer-Encoding: chunked"))
        await asyncio.sleep(0.1)  # the head goes to the app first
        writer.write(b"5\n;ext\r\nhello\r\n0\r\n\r\n")
        received = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
    assert received.startswith(b"HTTP/1.1 400")


async def test_a_client_body_is_not_buffered_while_the_app_does_not_read(rig: Rig) -> None:
    gate = asyncio.Event()

    async def slow_reader(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await gate.wait()
        left = BIG
        while left:
            left -= len(await reader.read(min(left, 1 << 20)))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ndone")

    async with raw_app(slow_reader) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request(rig, app.port, "POST / HTTP/1.1", f"Content-Length: {BIG}"))
        writer.write(b"x" * BIG)
        with pytest.raises(TimeoutError):  # the proxy stopped reading: the client must wait
            await asyncio.wait_for(writer.drain(), 2)
        gate.set()
        await asyncio.wait_for(writer.drain(), 30)
        received = await asyncio.wait_for(reader.readuntil(b"done"), 30)
        writer.close()
    assert received.startswith(b"HTTP/1.1 200")


async def test_an_answer_is_not_buffered_while_the_client_does_not_read(rig: Rig) -> None:
    sent = asyncio.Event()

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"y" * BIG)
        await writer.drain()
        sent.set()

    async with raw_app(flood) as app:
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request(rig, app.port))
        await asyncio.sleep(2)
        assert not sent.is_set()  # the proxy stopped reading the app
        received = 0
        while received < BIG:
            received += len(await asyncio.wait_for(reader.read(1 << 20), 30))
        await asyncio.wait_for(sent.wait(), 30)
        writer.close()


async def test_idle_connections_end_at_their_timeouts(
    rig: Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_h1, "FIRST_REQUEST_TIMEOUT", 0.3)
    monkeypatch.setattr(relay_h1, "KEEPALIVE_TIMEOUT", 0.3)
    async with raw_app(answer_ok) as app:
        silent_reader, silent = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        assert await asyncio.wait_for(silent_reader.read(-1), 5) == b""
        reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
        writer.write(request(rig, app.port))
        assert (await asyncio.wait_for(reader.read(-1), 5)).endswith(b"ok")  # then closed
        silent.close()
        writer.close()
