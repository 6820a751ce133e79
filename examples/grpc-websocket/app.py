"""A gRPC service and a WebSocket echo in one asyncio process.

gRPC without generated code: the service ``embervm.example.Greeter`` takes and returns raw
bytes (no protobuf), which keeps the example to two dependencies:
  ``/embervm.example.Greeter/Hello``  unary: b"world" → b"hello world"
  ``/embervm.example.Greeter/Count``  server streaming: b"3" → b"1", b"2", b"3"
WebSocket: every text message comes back as ``echo: <message>``.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import grpc
from websockets.asyncio.server import ServerConnection, serve

SERVICE = "embervm.example.Greeter"
HOST = os.environ.get("BIND_HOST", "0.0.0.0")
GRPC_PORT = int(os.environ.get("GRPC_PORT", "8080"))
WS_PORT = int(os.environ.get("WS_PORT", "8081"))
MAX_COUNT = 1000


async def hello(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    context.set_trailing_metadata((("x-served-by", "embervm-example"),))
    return b"hello " + request


async def count(request: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
    try:
        n = int(request or b"0")
    except ValueError:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "send a number")
    for i in range(1, min(n, MAX_COUNT) + 1):
        yield str(i).encode()


async def echo(websocket: ServerConnection) -> None:
    async for message in websocket:
        text = message if isinstance(message, str) else message.decode(errors="replace")
        await websocket.send(f"echo: {text}")


async def main() -> None:
    server = grpc.aio.server()
    handlers = {  # no serializers given: requests and responses are raw bytes
        "Hello": grpc.unary_unary_rpc_method_handler(hello),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_insecure_port(f"{HOST}:{GRPC_PORT}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(echo, HOST, WS_PORT):
        print(f"gRPC on {HOST}:{GRPC_PORT}, WebSocket on {HOST}:{WS_PORT}", flush=True)
        await stop.wait()
    await server.stop(grace=2)


if __name__ == "__main__":
    asyncio.run(main())
