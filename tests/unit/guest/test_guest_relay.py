"""The agent's HTTP relay (lifecycle hooks) against a local app that never answers."""

from __future__ import annotations

import asyncio

import pytest

from embervm.guest.agent.relay import RelayError, http_request


async def test_a_silent_app_times_out_with_a_readable_limit() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # never answers; returns when the relay gives up and closes
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(RelayError) as failure:
            await http_request("POST", port, "/aws/lambda-microvms/runtime/v1/run", [], b"",
                               0.2999999)  # fmt: skip
    finally:
        server.close()
        await server.wait_closed()
    assert failure.value.code == "timeout"
    assert str(failure.value) == f"no response from port {port} in 0.3 s"
