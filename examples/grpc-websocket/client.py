"""Try the example: ``python3 client.py <host> [grpc_port] [ws_port]`` (plain, no proxy)."""

from __future__ import annotations

import asyncio
import sys

import grpc
from websockets.asyncio.client import connect


async def main(host: str, grpc_port: int, ws_port: int) -> None:
    async with grpc.aio.insecure_channel(f"{host}:{grpc_port}") as channel:
        hello = channel.unary_unary("/embervm.example.Greeter/Hello")
        print((await hello(b"world", timeout=5)).decode())
        count = channel.unary_stream("/embervm.example.Greeter/Count")
        print([m.decode() async for m in count(b"3", timeout=5)])
    async with connect(f"ws://{host}:{ws_port}/", open_timeout=5) as ws:
        await ws.send("hi")
        print(await asyncio.wait_for(ws.recv(), 5))


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(args[0] if args else "127.0.0.1",
                     int(args[1]) if len(args) > 1 else 8080,
                     int(args[2]) if len(args) > 2 else 8081))  # fmt: skip
