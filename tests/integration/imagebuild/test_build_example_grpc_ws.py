"""examples/grpc-websocket really serves gRPC (unary + streaming) and WebSocket: run it on the
host (the same Python packages the image installs) and talk to it over loopback."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import grpc
import pytest
from websockets.asyncio.client import connect

pytestmark = pytest.mark.integration
APP = Path(__file__).resolve().parents[3] / "examples" / "grpc-websocket" / "app.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_listening(port: int) -> None:
    async with asyncio.timeout(20):
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            return


async def test_grpc_and_websocket_example_answers() -> None:
    grpc_port, ws_port = free_port(), free_port()
    env = {**os.environ, "BIND_HOST": "127.0.0.1", "GRPC_PORT": str(grpc_port),
           "WS_PORT": str(ws_port)}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(APP), env=env, stdout=asyncio.subprocess.DEVNULL
    )
    try:
        await wait_listening(grpc_port)
        await wait_listening(ws_port)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            hello = channel.unary_unary("/embervm.example.Greeter/Hello")
            assert await hello(b"embervm", timeout=5) == b"hello embervm"
            count = channel.unary_stream("/embervm.example.Greeter/Count")
            assert [m async for m in count(b"3", timeout=5)] == [b"1", b"2", b"3"]
        async with connect(f"ws://127.0.0.1:{ws_port}/", open_timeout=5) as ws:
            await ws.send("ping")
            assert await asyncio.wait_for(ws.recv(), 5) == "echo: ping"
    finally:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0  # SIGTERM is a clean shutdown
