"""WebSockets through the proxy to a real ``websockets`` server (token and port as
subprotocols, which the app never sees), and ``/shell`` over a real local PTY."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest
import websockets
from tests.framework.proxy_unit_harness import HOST, VM, Rig, gather_bounded, running
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve

pytestmark = pytest.mark.timeout(60)


async def app_handler(ws: ServerConnection) -> None:
    """Tells what the upgrade request carried, then echoes every message."""
    assert ws.request is not None
    headers = {k.lower(): v for k, v in ws.request.headers.raw_items()}
    await ws.send(json.dumps({"headers": headers, "subprotocol": ws.subprotocol}))
    async for message in ws:
        await ws.send(message)


@pytest.fixture
async def ws_port() -> AsyncIterator[int]:
    async with serve(app_handler, "127.0.0.1", 0, subprotocols=["chat"]) as server:  # type: ignore[list-item]
        yield next(iter(server.sockets)).getsockname()[1]


def offer(rig: Rig, port: int, *extra: str, kind: str = "endpoint") -> list[str]:
    return ["lambda-microvms", f"lambda-microvms.authentication.{rig.token(kind=kind)}",
            f"lambda-microvms.port.{port}", *extra]  # fmt: skip


def dial(rig: Rig, path: str, subprotocols: list[str], *, tls: bool = False) -> connect:
    scheme, port = ("wss", rig.proxy.tls_port) if tls else ("ws", rig.proxy.http_port)
    return connect(f"{scheme}://{HOST}{path}", host="127.0.0.1", port=port,
                   subprotocols=subprotocols,  # type: ignore[arg-type]
                   ssl=rig.client_tls() if tls else None, server_hostname=HOST if tls else None,
                   open_timeout=10, close_timeout=5)  # fmt: skip


@pytest.mark.parametrize("tls", [False, True])
async def test_websocket_with_subprotocol_auth_echoes_and_hides_the_proxy(
    rig: Rig, ws_port: int, tls: bool
) -> None:
    async with dial(rig, "/ws", offer(rig, ws_port, "chat"), tls=tls) as ws:
        hello = json.loads(await ws.recv())
        assert ws.subprotocol == "chat"
        await ws.send("text frame")
        await ws.send(b"\x00binary\xff")
        assert await ws.recv() == "text frame"
        assert await ws.recv() == b"\x00binary\xff"
    assert hello["subprotocol"] == "chat"
    assert hello["headers"]["sec-websocket-protocol"] == "chat"
    assert not [k for k in hello["headers"] if k.startswith("x-aws-proxy")]
    assert VM in rig.routes.activity


async def test_websocket_misuse_is_refused_before_the_app(rig: Rig, ws_port: int) -> None:
    no_token = ["lambda-microvms", f"lambda-microvms.port.{ws_port}"]
    shell_token = offer(rig, ws_port, kind="shell")
    for subprotocols in (no_token, shell_token):
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with dial(rig, "/ws", subprotocols):
                pass
        assert refused.value.response.status_code == 403


# -- /shell --------------------------------------------------------------------------------


def shell_offer(rig: Rig, kind: str = "shell") -> list[str]:
    return ["lambda-microvms", "lambda-microvms.port.8022",
            f"lambda-microvms.authentication.{rig.token(kind=kind, port=8022)}"]  # fmt: skip


async def read_until(ws: ClientConnection, marker: bytes) -> bytes:
    seen = b""
    while marker not in seen:
        frame = await ws.recv()
        assert isinstance(frame, bytes), frame
        seen += frame
    return seen


async def test_shell_runs_a_command_resizes_and_passes_the_exit_status(rig: Rig) -> None:
    async with dial(rig, "/shell", shell_offer(rig), tls=True) as ws:
        assert ws.subprotocol == "lambda-microvms"
        await ws.send(b"echo marker-$((6*7))\n")
        assert b"marker-42" in await read_until(ws, b"marker-42")
        await ws.send(json.dumps({"type": "resize", "cols": 123, "rows": 45}))
        await ws.send(b"stty size\n")
        await read_until(ws, b"45 123")
        await ws.send(b"exit 3\n")
        control = None
        async for frame in ws:
            if isinstance(frame, str):
                control = json.loads(frame)
    assert control == {"type": "exit", "status": 3, "code": 3}
    assert ws.close_code == 1000
    assert rig.shells.opened[0].sizes == [(123, 45)]


async def test_two_shells_at_once_are_separate(rig: Rig) -> None:
    async def session(name: str) -> bytes:
        async with dial(rig, "/shell", shell_offer(rig)) as ws:
            await ws.send(f"NAME={name}; echo got-$NAME-done\n".encode())
            return await read_until(ws, f"got-{name}-done".encode())

    first, second = await gather_bounded(session("alpha"), session("beta"))
    assert b"got-alpha-done" in first
    assert b"beta" not in first
    assert b"got-beta-done" in second
    assert b"alpha" not in second
    assert len(rig.shells.opened) == 2


@pytest.mark.parametrize("case", ["endpoint-token", "http-ingress-only"])
async def test_shell_needs_a_shell_token_and_shell_ingress(rig: Rig, case: str) -> None:
    subprotocols = shell_offer(rig, kind="endpoint" if case == "endpoint-token" else "shell")
    if case == "http-ingress-only":
        rig.routes.vms[VM] = running(VM, "HTTP_INGRESS")
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with dial(rig, "/shell", subprotocols):
            pass
    assert refused.value.response.status_code == 403
    assert rig.shells.opened == []
