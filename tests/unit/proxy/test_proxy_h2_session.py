"""HTTP/2 client connections through the real proxy against what a hostile client (or a client
with a token plus a hostile app) can make the session hold: refusals, unauthenticated
connections, answers held for clients that grant no window (audit A2, A8, B7)."""

from __future__ import annotations

import h2.events
import h2.settings
import pytest
from tests.unit.proxy.conftest import HOST, Rig
from tests.unit.proxy.test_proxy_h2_relay import Client

pytestmark = pytest.mark.timeout(60)

NO_WINDOW = {h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}


async def test_a_refusal_ends_its_stream_for_a_client_that_grants_no_window(rig: Rig) -> None:
    client = await Client.open(rig, NO_WINDOW)
    try:
        headers = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", HOST.encode()),
                   (b":path", b"/"), (b"x-aws-proxy-auth", b"not-a-token")]  # fmt: skip
        for stream_id in range(1, 64, 2):
            client.conn.send_headers(stream_id, headers, end_stream=True)
        client.flush()
        ended: set[int] = set()
        while len(ended) < 32:
            events = await client.read(ack=False)
            assert not client.closed
            ended |= {e.stream_id for e in events if isinstance(e, h2.events.StreamEnded)}
        statuses = [dict(e.headers)[b":status"] for e in client.events
                    if isinstance(e, h2.events.ResponseReceived)]  # fmt: skip
        assert statuses == [b"403"] * 32
    finally:
        await client.close()
