"""The host client against a hostile or broken agent (a scripted peer on a socketpair)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from embervm.errors import GuestError
from embervm.guest._logbuffer import LOG_BUFFER_BYTES
from embervm.guest.agent.apps import MAX_LINE
from embervm.guest.agent.protocol import Decoder, Frame, encode
from embervm.guest.client import AgentClient

Script = Callable[["FakeAgent", Frame], Awaitable[None]]


class FakeAgent:
    """Answers ``hello`` properly, then hands every other request to ``script``."""

    def __init__(self, sock: socket.socket, script: Script) -> None:
        self.sock = sock
        self.script = script
        self.loop = asyncio.get_running_loop()

    async def send(self, header: dict[str, Any], body: bytes = b"") -> None:
        await self.loop.sock_sendall(self.sock, encode(header, body))

    async def raw(self, data: bytes) -> None:
        await self.loop.sock_sendall(self.sock, data)

    async def serve(self) -> None:
        dec = Decoder()
        while True:
            data = await self.loop.sock_recv(self.sock, 1 << 20)
            if not data:
                return
            for f in dec.feed(data):
                if f.op == "hello":
                    # A stale reply first (wrong nonce): the client must skip it.
                    await self.send({"op": "result", "id": f.header["id"], "version": 1,
                                     "nonce": "stale"})  # fmt: skip
                    await self.raw(b"\x00garbage\xff" * 10)
                    await self.send({"op": "result", "id": f.header["id"], "version": 1,
                                     "nonce": f.header["nonce"]})  # fmt: skip
                else:
                    await self.script(self, f)


@pytest.fixture
def script_box() -> list[Script]:
    return []


@pytest.fixture
async def client(script_box: list[Script]) -> AsyncIterator[AgentClient]:
    host, guest = socket.socketpair()
    guest.setblocking(False)

    async def dispatch(agent: FakeAgent, f: Frame) -> None:
        await script_box[0](agent, f)

    fake = FakeAgent(guest, dispatch)
    task = asyncio.ensure_future(fake.serve())
    c = await AgentClient.over_socket(host, timeout=5, request_timeout=2)
    try:
        yield c
    finally:
        await c.close()
        task.cancel()
        guest.close()


async def test_hello_skips_stale_replies_and_garbage(client: AgentClient) -> None:
    assert client.hello["nonce"] != "stale"


async def test_non_integer_exit_code_is_rejected(
    client: AgentClient, script_box: list[Script]
) -> None:
    async def script(a: FakeAgent, f: Frame) -> None:
        await a.send({"op": "exec.exit", "id": f.header["id"], "exit_code": "0"})

    script_box.append(script)
    with pytest.raises(GuestError, match="exit_code"):
        await client.exec(["true"])


async def test_file_data_beyond_max_bytes_is_rejected(
    client: AgentClient, script_box: list[Script]
) -> None:
    async def script(a: FakeAgent, f: Frame) -> None:
        await a.send({"op": "file.data", "id": f.header["id"], "offset": 0}, b"x" * 100)
        await a.send({"op": "result", "id": f.header["id"], "size": 100})

    script_box.append(script)
    with pytest.raises(GuestError, match="more than"):
        await client.get_file("/etc/passwd", max_bytes=10)


async def test_file_data_out_of_order_is_rejected(
    client: AgentClient, script_box: list[Script]
) -> None:
    async def script(a: FakeAgent, f: Frame) -> None:
        await a.send({"op": "file.data", "id": f.header["id"], "offset": 5}, b"abc")

    script_box.append(script)
    with pytest.raises(GuestError, match="out of order"):
        await client.get_file("/x", max_bytes=100)


async def test_file_size_mismatch_is_rejected(
    client: AgentClient, script_box: list[Script]
) -> None:
    async def script(a: FakeAgent, f: Frame) -> None:
        await a.send({"op": "file.data", "id": f.header["id"], "offset": 0}, b"abc")
        await a.send({"op": "result", "id": f.header["id"], "size": 4})

    script_box.append(script)
    with pytest.raises(GuestError, match="disagrees"):
        await client.get_file("/x", max_bytes=100)


async def test_silent_agent_times_out(client: AgentClient, script_box: list[Script]) -> None:
    async def script(a: FakeAgent, f: Frame) -> None:
        return None

    script_box.append(script)
    with pytest.raises(GuestError, match="in time"):
        await client.health()


async def test_unknown_stream_name_is_rejected(
    client: AgentClient, script_box: list[Script]
) -> None:
    async def script(a: FakeAgent, f: Frame) -> None:
        await a.send({"op": "exec.out", "id": f.header["id"], "stream": "stdfoo"}, b"x")

    script_box.append(script)
    with pytest.raises(GuestError, match="stream"):
        await client.exec(["true"])


async def test_agent_disconnect_fails_pending_requests(
    client: AgentClient, script_box: list[Script]
) -> None:
    async def script(a: FakeAgent, f: Frame) -> None:
        a.sock.shutdown(socket.SHUT_RDWR)

    script_box.append(script)
    with pytest.raises(GuestError, match="closed"):
        await client.exec(["sleep", "100"])
    assert client.closed


async def test_connect_to_missing_socket_gives_up_with_guest_error(tmp_path: Any) -> None:
    with pytest.raises(GuestError, match="did not answer"):
        await AgentClient.connect(tmp_path / "nope.sock", timeout=0.3)


async def test_a_damaged_frame_after_hello_ends_the_channel(
    client: AgentClient, script_box: list[Script]
) -> None:
    # A1: once in sync, the host does not resynchronise for a guest: the channel closes.
    async def damage(agent: FakeAgent, f: Frame) -> None:
        bad = bytearray(encode({"op": "result", "id": f.header["id"]}, b"xxxx"))
        bad[-1] ^= 1
        await agent.raw(bytes(bad))

    script_box.append(damage)
    with pytest.raises(GuestError):
        await client.exec(["true"])
    assert client.closed


async def test_unread_app_output_is_bounded_by_bytes(
    client: AgentClient, script_box: list[Script]
) -> None:
    # A6: 10,000 app.log frames of 1 MiB each used to be held whole (~10 GiB).
    async def flood(agent: FakeAgent, f: Frame) -> None:
        for seq in range(40):
            await agent.send({"op": "app.log", "name": "app", "stream": "stdout",
                              "ts_ns": 1, "seq": seq}, b"x" * (1 << 20))  # fmt: skip
        await agent.send({"op": "app.log", "name": "end", "stream": "stdout",
                          "ts_ns": 1, "seq": 40})  # fmt: skip
        await agent.send({"op": "result", "id": f.header["id"], "status": "ok"})

    script_box.append(flood)
    with contextlib.suppress(GuestError):
        await client.health()
    held = 0
    async with asyncio.timeout(10):
        async for line in client.app_logs():
            if line.name == "end":
                break
            assert len(line.line) <= MAX_LINE
            held += len(line.line)
    assert held <= LOG_BUFFER_BYTES
