"""HTTP/1.1, HTTP/2 over TLS and h2c through the proxy to a real local app (Starlette on
uvicorn): streaming both ways, server-sent events, header stripping, held resumes, limits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest
from tests.framework.proxy_unit_harness import (
    HOST,
    OTHER,
    VM,
    App,
    Rig,
    gather_bounded,
    running,
    seen_headers,
    suspended,
    until,
)

from embervm.proxy.admission import connection_limit

pytestmark = pytest.mark.timeout(60)


def no_proxy_headers(body: dict[str, object]) -> bool:
    return not [k for k in seen_headers(body) if k.startswith("x-aws-proxy")]  # type: ignore[arg-type]


async def test_http1_keeps_the_app_connection_and_strips_proxy_headers(rig: Rig, app: App) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        answers = [
            await client.get(
                rig.http_url + "/headers", headers=rig.headers(app.port, **{"x-custom": "kept"})
            )
            for _ in range(3)
        ]
    bodies = [a.json() for a in answers]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert all(no_proxy_headers(b) for b in bodies)
    assert seen_headers(bodies[0])["x-custom"] == "kept"
    assert seen_headers(bodies[0])["host"] == HOST
    assert len({b["client_port"] for b in bodies}) == 1  # one kept-alive app connection
    assert rig.routes.activity == [VM, VM, VM]


async def test_request_body_reaches_the_app_before_the_client_finished_it(
    rig: Rig, app: App
) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"first "
        await asyncio.wait_for(app.state.first_chunk.wait(), 20)  # fails if the proxy buffers
        yield b"second"

    async with httpx.AsyncClient(timeout=20) as client:
        answer = await client.post(rig.http_url + "/echo", content=body(),
                                   headers=rig.headers(app.port))  # fmt: skip
    assert answer.status_code == 200
    assert answer.content == b"first second"


async def test_a_large_streamed_answer_arrives_intact(rig: Rig, app: App) -> None:
    async with httpx.AsyncClient(timeout=20) as client:
        answer = await client.get(rig.http_url + "/big", headers=rig.headers(app.port))
    assert answer.content == b"".join(bytes([i]) * 65536 for i in range(64))


async def test_server_sent_events_arrive_one_by_one(rig: Rig, app: App) -> None:
    async with (
        httpx.AsyncClient(timeout=20) as client,
        client.stream("GET", rig.http_url + "/events", headers=rig.headers(app.port)) as answer,
    ):
        assert answer.headers["content-type"].startswith("text/event-stream")
        chunks = answer.aiter_bytes()
        first = b""
        while b"\n\n" not in first:  # the second event is not even written yet
            first += await anext(chunks)
        assert first == b"data: one\n\n"
        app.state.next_event.set()
        rest = b"".join([chunk async for chunk in chunks])
    assert rest == b"data: two\n\n"


async def test_http2_over_tls_verified_against_the_local_ca(rig: Rig, app: App) -> None:
    async with httpx.AsyncClient(http2=True, verify=rig.client_tls(), timeout=10) as client:
        answer = await client.get(rig.https_url + "/headers", headers=rig.headers(app.port))
        posted = await client.post(rig.https_url + "/echo", content=b"x" * 200_000,
                                   headers=rig.headers(app.port))  # fmt: skip
    assert answer.http_version == "HTTP/2"
    assert answer.status_code == 200
    assert no_proxy_headers(answer.json())
    assert posted.content == b"x" * 200_000


@pytest.mark.parametrize("size", [0, 1, 16 * 1024, 16 * 1024 + 1, 70_000, 3_000_000])
async def test_http2_answers_of_every_size_arrive_intact(rig: Rig, app: App, size: int) -> None:
    """Small ones go out in one write, larger ones frame by frame within the windows."""
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        answer = await client.get(f"{rig.http_url}/sized?n={size}", headers=rig.headers(app.port))
        head = await client.head(f"{rig.http_url}/sized?n={size}", headers=rig.headers(app.port))
    assert answer.http_version == "HTTP/2"
    assert answer.content == bytes(i % 251 for i in range(size))
    assert head.status_code == 200
    assert head.content == b""


async def test_http1_over_tls(rig: Rig, app: App) -> None:
    async with httpx.AsyncClient(verify=rig.client_tls(), timeout=10) as client:
        answer = await client.get(rig.https_url + "/headers", headers=rig.headers(app.port))
    assert answer.http_version == "HTTP/1.1"
    assert answer.status_code == 200


async def test_h2c_with_prior_knowledge(rig: Rig, app: App) -> None:
    async with httpx.AsyncClient(http1=False, http2=True, timeout=10) as client:
        answers = await gather_bounded(*[
            client.get(rig.http_url + "/headers", headers=rig.headers(app.port))
            for _ in range(5)
        ])  # fmt: skip
    assert {a.http_version for a in answers} == {"HTTP/2"}
    assert all(a.status_code == 200 and no_proxy_headers(a.json()) for a in answers)


async def test_h2c_upgrade_serves_the_request_as_stream_one(rig: Rig, app: App) -> None:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection().rstrip(b"=")  # unpadded, as curl sends it
    head = ["GET /headers HTTP/1.1", "Connection: Upgrade, HTTP2-Settings",
            "Upgrade: h2c", f"HTTP2-Settings: {settings.decode()}"]  # fmt: skip
    head += [f"{k}: {v}" for k, v in rig.headers(app.port).items()]
    reader, writer = await asyncio.open_connection("127.0.0.1", rig.proxy.http_port)
    try:
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode())
        status_line = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert status_line.startswith(b"HTTP/1.1 101")
        writer.write(conn.data_to_send())
        status, body, ended = b"", b"", False
        while not ended:
            data = await asyncio.wait_for(reader.read(65536), 10)
            assert data, "the proxy closed the connection"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    status = dict(event.headers)[b":status"]
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, 1)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = True
            writer.write(conn.data_to_send())
    finally:
        writer.close()
    assert status == b"200"
    assert no_proxy_headers(json.loads(body))


async def test_token_for_one_vm_never_reaches_another(rig: Rig, app: App) -> None:
    wrong = {**rig.headers(app.port), "host": f"{OTHER}.microvm.localhost"}
    async with httpx.AsyncClient(timeout=10) as client:
        h1 = await client.get(rig.http_url + "/headers", headers=wrong)
    async with httpx.AsyncClient(http2=True, verify=rig.client_tls(), timeout=10) as client:
        h2_answer = await client.get(rig.https_url + "/headers", headers=wrong)
    assert (h1.status_code, h1.text) == (403, "Forbidden\n")
    assert (h2_answer.status_code, h2_answer.text) == (403, "Forbidden\n")
    assert app.state.hits == 0
    assert rig.routes.activity == []


async def test_http2_refusals_carry_no_detail(rig: Rig, app: App) -> None:
    async with httpx.AsyncClient(http2=True, verify=rig.client_tls(), timeout=10) as client:
        bare = {"host": HOST, "x-aws-proxy-port": str(app.port)}
        missing = await client.get(rig.https_url + "/headers", headers=bare)
        wrong_port = await client.get(rig.https_url + "/headers", headers={
            "host": HOST, "x-aws-proxy-port": str(app.port),
            "x-aws-proxy-auth": rig.token(port=app.port + 1)})  # fmt: skip
        elsewhere = {**rig.headers(app.port), "host": "example.com"}
        unknown = await client.get(rig.https_url + "/headers", headers=elsewhere)
    assert (missing.status_code, missing.text) == (403, "Forbidden\n")
    assert (wrong_port.status_code, wrong_port.text) == (403, "Forbidden\n")
    assert unknown.status_code == 404
    assert app.state.hits == 0


@pytest.mark.parametrize("http2", [False, True])
async def test_twenty_requests_to_a_suspended_vm_wait_for_one_resume(
    rig: Rig, app: App, http2: bool
) -> None:
    rig.routes.vms[VM] = suspended(VM)
    rig.routes.resume_gate.clear()
    url = rig.https_url if http2 else rig.http_url
    limits = httpx.Limits(max_connections=20)
    async with httpx.AsyncClient(http2=http2, verify=rig.client_tls(), timeout=20,
                                 limits=limits) as client:  # fmt: skip
        calls = [
            asyncio.create_task(client.get(url + "/headers", headers=rig.headers(app.port)))
            for _ in range(20)
        ]
        await until(lambda: rig.routes.waiting == 20)  # all twenty are held, none refused
        assert not any(call.done() for call in calls)
        rig.routes.resume_gate.set()
        answers = await gather_bounded(*calls)
    assert [a.status_code for a in answers] == [200] * 20
    assert rig.routes.resumes == [VM]
    assert app.state.hits == 20


async def test_a_failed_resume_answers_502(rig: Rig, app: App) -> None:
    rig.routes.vms[VM] = suspended(VM)
    rig.routes.resume_fails = True
    async with httpx.AsyncClient(http2=True, verify=rig.client_tls(), timeout=10) as client:
        answer = await client.get(rig.https_url + "/headers", headers=rig.headers(app.port))
    assert answer.status_code == 502
    assert app.state.hits == 0


async def test_connections_beyond_the_vms_size_are_429(rig: Rig, app: App) -> None:
    rig.routes.vms[VM] = running(VM, memory_mib=512)
    limit = connection_limit(512)
    hdrs = rig.headers(app.port)
    clients = [httpx.AsyncClient(timeout=10) for _ in range(limit + 1)]
    try:
        held = await gather_bounded(*[
            c.get(rig.http_url + "/headers", headers=rig.headers(app.port))
            for c in clients[:limit]
        ])  # fmt: skip
        assert [a.status_code for a in held] == [200] * limit
        extra = await clients[limit].get(rig.http_url + "/headers",
                                         headers=rig.headers(app.port))  # fmt: skip
        assert extra.status_code == 429
        await clients[0].aclose()

        async def admitted() -> bool:  # once the proxy noticed the client left
            again = await clients[limit].get(rig.http_url + "/headers", headers=hdrs)
            return again.status_code == 200

        await until(admitted)
    finally:
        for client in clients:
            await client.aclose()


async def test_a_client_at_the_limit_keeps_using_its_own_connection(rig: Rig, app: App) -> None:
    rig.routes.vms[VM] = running(VM, memory_mib=512)
    limit = connection_limit(512)
    clients = [httpx.AsyncClient(timeout=10) for _ in range(limit)]
    try:
        first = await gather_bounded(*[
            c.get(rig.http_url + "/headers", headers=rig.headers(app.port)) for c in clients
        ])  # fmt: skip
        assert [a.status_code for a in first] == [200] * limit
        # Every one of them at the limit asks again on the connection it already holds.
        again = await gather_bounded(*[
            c.get(rig.http_url + "/headers", headers=rig.headers(app.port)) for c in clients
        ])  # fmt: skip
        assert [a.status_code for a in again] == [200] * limit
    finally:
        for client in clients:
            await client.aclose()
