"""Spliced sessions (an upgrade the app accepted, ``/shell``) end with the token that opened
them (audit A16): at its expiry, when its key is revoked, and after an idle time. The lease on
its own with a fake clock and verifier; then through the proxy with the real token authority,
a raw upgrading app and a real local shell."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import websockets
from tests.framework.proxy_unit_harness import DOMAIN, VM, Rig
from websockets.asyncio.client import ClientConnection, connect

from embervm.proxy.streams import Ending, SessionLease

pytestmark = pytest.mark.timeout(60)

TICK = 0.01  # the lease's check interval in these tests


@dataclass
class FakeClock:
    now: float = 1_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeVerifier:
    good: bool = True
    asked: int = 0

    def current(self) -> bool:
        self.asked += 1
        return self.good


async def still_open(task: asyncio.Task[str]) -> bool:
    """The lease has looked a few times (its interval is ``TICK``) and has not ended."""
    await asyncio.sleep(TICK * 5)
    return not task.done()


async def test_the_lease_ends_at_the_tokens_expiry() -> None:
    clock, verifier = FakeClock(), FakeVerifier()
    lease = SessionLease(1_010.0, verifier.current, idle_timeout=3600, clock=clock,
                         check_interval=TICK)  # fmt: skip
    ended = asyncio.create_task(lease.ended())
    assert await still_open(ended)
    clock.now = 1_010.0
    assert await asyncio.wait_for(ended, 10) == Ending.EXPIRED


async def test_the_lease_ends_when_the_token_is_no_longer_current() -> None:
    verifier = FakeVerifier()
    lease = SessionLease(2_000.0, verifier.current, idle_timeout=3600, clock=FakeClock(),
                         check_interval=TICK)  # fmt: skip
    ended = asyncio.create_task(lease.ended())
    assert await still_open(ended)
    assert verifier.asked >= 2  # asked again and again, not once
    verifier.good = False
    assert await asyncio.wait_for(ended, 10) == Ending.REVOKED


async def test_the_lease_ends_after_its_idle_time() -> None:
    lease = SessionLease(2_000.0, FakeVerifier().current, idle_timeout=TICK * 3,
                         clock=FakeClock(), check_interval=TICK)  # fmt: skip
    assert await asyncio.wait_for(lease.ended(), 10) == Ending.IDLE


async def read_all(ws: ClientConnection) -> None:
    while True:
        await ws.recv()


# -- through the proxy ---------------------------------------------------------------------


@dataclass
class UpgradingApp:
    """Accepts any upgrade with 101, then echoes; ``ended`` is set when the proxy lets go."""

    port: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def upgrading_app() -> AsyncIterator[UpgradingApp]:
    app = UpgradingApp()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                         b"Upgrade: x-echo\r\n\r\n")  # fmt: skip
            while data := await reader.read(65536):
                writer.write(data)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            app.ended.set()
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    app.port = server.sockets[0].getsockname()[1]
    try:
        yield app
    finally:
        server.close()


async def upgrade(rig: Rig, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
    writer.write(f"GET /echo HTTP/1.1\r\nHost: {VM}.{DOMAIN}\r\nX-aws-proxy-auth: {rig.token()}"
                 f"\r\nX-aws-proxy-port: {port}\r\nConnection: Upgrade\r\nUpgrade: x-echo"
                 "\r\n\r\n".encode())  # fmt: skip
    answer = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert answer.startswith(b"HTTP/1.1 101 ")
    writer.write(b"ping")
    assert await asyncio.wait_for(reader.readexactly(4), 10) == b"ping"
    return reader, writer


@pytest.mark.parametrize("ending", ["revoked", "expired", "idle"])
async def test_an_upgraded_connection_ends_with_its_token_or_when_idle(
    rig: Rig, ending: str
) -> None:
    admission = rig.proxy.admission
    admission.token_check_interval = TICK
    ahead = [0.0]  # the proxy's clock runs this far ahead
    admission.clock = lambda: time.time() + ahead[0]
    if ending == "idle":
        admission.session_idle_timeout = 0.2
    async with upgrading_app() as app:
        reader, writer = await upgrade(rig, app.port)
        if ending == "revoked":
            rig.tokens.rotate(revoke=True)
        if ending == "expired":  # the token (5 minutes) has expired on the proxy's clock
            ahead[0] = 3600
        assert await asyncio.wait_for(reader.read(), 10) == b""  # the proxy closed it
        await asyncio.wait_for(app.ended.wait(), 10)  # and the app's side too
        writer.close()


async def test_a_shell_is_closed_when_its_token_is_revoked(rig: Rig) -> None:
    rig.proxy.admission.token_check_interval = TICK
    offer = ["lambda-microvms", "lambda-microvms.port.8022",
             f"lambda-microvms.authentication.{rig.token(kind='shell', port=8022)}"]  # fmt: skip
    url = f"ws://{VM}.{DOMAIN}/shell"
    async with connect(url, host="127.0.0.1", port=rig.proxy.http_port, open_timeout=10,
                       subprotocols=offer, close_timeout=5) as ws:  # type: ignore[arg-type]  # fmt: skip
        await ws.send(b"echo up\n")
        rig.tokens.rotate(revoke=True)
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(read_all(ws), 10)
    assert ws.close_code == 1008
    assert ws.close_reason == Ending.REVOKED
