"""``X-aws-proxy-force-h2: true``: requests reach an app that speaks only h2c
(``tests.framework.proxy_h2_peers.h2c_app``, written with h2), from HTTP/1.1 and HTTP/2
clients, bodies both ways, kept connection."""

from __future__ import annotations

import asyncio
import json

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
from tests.framework.proxy_unit_harness import (
    HOST,
    VM,
    Rig,
    gather_bounded,
    running,
    until,
)

from embervm.proxy.admission import connection_limit

pytestmark = pytest.mark.timeout(60)


async def test_http1_client_reaches_an_h2c_only_app(rig: Rig, h2c_port: int) -> None:
    headers = rig.headers(h2c_port, **{"x-aws-proxy-force-h2": "true", "x-custom": "kept"})
    async with httpx.AsyncClient(timeout=10) as client:
        first = await client.post(rig.http_url + "/up", content=b"z" * 300_000, headers=headers)
        second = await client.get(rig.http_url + "/again", headers=headers)
    seen = first.json()
    assert first.status_code == 200
    assert seen["size"] == 300_000
    assert seen["headers"][":path"] == "/up"
    assert seen["headers"]["x-custom"] == "kept"
    assert not [k for k in seen["headers"] if k.startswith("x-aws-proxy")]
    assert second.json()["connection"] == seen["connection"]  # one kept h2c connection


async def test_http2_client_reaches_an_h2c_only_app(rig: Rig, h2c_port: int) -> None:
    headers = rig.headers(h2c_port, **{"x-aws-proxy-force-h2": "true"})
    async with httpx.AsyncClient(http2=True, verify=rig.client_tls(), timeout=10) as client:
        answer = await client.get(rig.https_url + "/h2", headers=headers)
    assert answer.http_version == "HTTP/2"
    assert answer.json()["headers"][":path"] == "/h2"


async def test_concurrent_http2_streams_share_one_h2c_app_connection(
    rig: Rig, h2c_port: int
) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    conn.initiate_connection()
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", HOST), (":path", "/")]
    headers += [(k, v) for k, v in rig.headers(h2c_port).items() if k != "host"]
    headers.append(("x-aws-proxy-force-h2", "true"))
    for stream_id in range(1, 17, 2):  # eight at once, in one write
        conn.send_headers(stream_id, headers, end_stream=True)
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
    bodies: dict[int, bytes] = {}
    ended: set[int] = set()
    try:
        writer.write(conn.data_to_send())
        while len(ended) < 8:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the proxy closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.DataReceived):
                    bodies[event.stream_id] = bodies.get(event.stream_id, b"") + event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended.add(event.stream_id)
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert len({json.loads(body)["connection"] for body in bodies.values()}) == 1


async def test_without_force_an_h2c_only_app_is_502(rig: Rig, h2c_port: int) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.get(rig.http_url + "/", headers=rig.headers(h2c_port))
    assert answer.status_code == 502


async def test_h2c_app_connections_count_against_the_vms_limit(rig: Rig, h2c_port: int) -> None:
    rig.routes.vms[VM] = running(VM, memory_mib=512)
    limit = connection_limit(512)
    headers = rig.headers(h2c_port, **{"x-aws-proxy-force-h2": "true"})
    clients = [httpx.AsyncClient(http2=True, verify=rig.client_tls(), timeout=10)
               for _ in range(limit + 1)]  # fmt: skip
    try:  # each client connection holds its own h2c connection to the app
        held = await gather_bounded(*[c.get(rig.https_url + "/", headers=headers)
                                      for c in clients[:limit]])  # fmt: skip
        assert [a.status_code for a in held] == [200] * limit
        extra = await clients[limit].get(rig.https_url + "/", headers=headers)
        assert extra.status_code == 429
        again = await clients[0].get(rig.https_url + "/", headers=headers)  # its own: fine
        assert again.status_code == 200
        await clients[0].aclose()

        async def admitted() -> bool:  # once the proxy noticed the client left
            answer = await clients[limit].get(rig.https_url + "/", headers=headers)
            return answer.status_code == 200

        await until(admitted)
    finally:
        for client in clients:
            await client.aclose()
