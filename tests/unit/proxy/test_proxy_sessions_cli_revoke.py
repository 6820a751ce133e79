"""``embervm tokens rotate --revoke``, run as its own process, ends a shell the proxy holds open
(A17 with A16): the proxy notices the key file changed (one stat) and the token's key is gone."""

from __future__ import annotations

import asyncio
import sys

import pytest
import websockets
from tests.framework.proxy_unit_harness import DOMAIN, VM, Rig
from websockets.asyncio.client import ClientConnection, connect

from embervm.proxy.streams import Ending

pytestmark = pytest.mark.timeout(60)


async def _read_all(ws: ClientConnection) -> None:
    while True:
        await ws.recv()


async def _cli(*args: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "embervm.cli", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()


async def test_tokens_rotate_revoke_closes_an_open_shell(rig: Rig) -> None:
    rig.proxy.admission.token_check_interval = 0.05
    data_dir = rig.tokens.keys_file.parent.parent
    offer = ["lambda-microvms", "lambda-microvms.port.8022",
             f"lambda-microvms.authentication.{rig.token(kind='shell', port=8022)}"]  # fmt: skip
    async with connect(f"ws://{VM}.{DOMAIN}/shell", host="127.0.0.1", port=rig.proxy.http_port,
                       open_timeout=10, subprotocols=offer,  # type: ignore[arg-type]
                       close_timeout=5) as ws:  # fmt: skip
        await ws.send(b"echo up\n")
        await _cli("--data-dir", str(data_dir), "tokens", "rotate")  # old tokens stay good
        await asyncio.sleep(0.3)
        assert ws.close_code is None
        await _cli("--data-dir", str(data_dir), "tokens", "rotate", "--revoke")
        with pytest.raises(websockets.ConnectionClosed):
            await asyncio.wait_for(_read_all(ws), 20)
    assert ws.close_code == 1008
    assert ws.close_reason == Ending.REVOKED
