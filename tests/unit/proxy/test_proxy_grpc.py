"""gRPC through the proxy (h2c and TLS from the client, h2c to a real grpcio server): unary and
bidirectional streaming calls, metadata both ways and trailing metadata intact."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import grpc
import pytest
from tests.framework.proxy_unit_harness import HOST, Rig

pytestmark = pytest.mark.timeout(60)

SERVICE = "embervm.test.Echo"


async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
    seen = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    await context.send_initial_metadata((("x-initial", "sent"),))
    context.set_trailing_metadata((("x-trailer", "kept"), ("x-length", str(len(request)))))
    return json.dumps({"metadata": seen, "echo": request.decode()}).encode()


async def chat(
    requests: AsyncIterator[bytes],
    context: grpc.aio.ServicerContext,  # type: ignore[type-arg]
) -> AsyncIterator[bytes]:
    count = 0
    async for message in requests:
        count += 1
        yield message.upper()
    context.set_trailing_metadata((("x-count", str(count)),))


async def failing(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
    await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "not today")
    raise AssertionError("abort raises")


@pytest.fixture
async def grpc_port() -> AsyncIterator[int]:
    server = grpc.aio.server()
    handlers = {
        "Unary": grpc.unary_unary_rpc_method_handler(unary),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
        "Fail": grpc.unary_unary_rpc_method_handler(failing),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(grace=None)


def channel(rig: Rig, *, tls: bool) -> grpc.aio.Channel:
    options = [("grpc.default_authority", HOST), ("grpc.enable_http_proxy", 0)]
    if not tls:
        return grpc.aio.insecure_channel(f"127.0.0.1:{rig.proxy.http_port}", options=options)
    credentials = grpc.ssl_channel_credentials(rig.ca.read_bytes())
    options.append(("grpc.ssl_target_name_override", HOST))
    return grpc.aio.secure_channel(f"127.0.0.1:{rig.proxy.tls_port}", credentials, options)


def auth(rig: Rig, port: int) -> tuple[tuple[str, str], ...]:
    return (("x-aws-proxy-auth", rig.token()), ("x-aws-proxy-port", str(port)),
            ("x-custom", "kept"))  # fmt: skip


@pytest.mark.parametrize("tls", [False, True])
async def test_unary_call_keeps_trailing_metadata(rig: Rig, grpc_port: int, tls: bool) -> None:
    async with channel(rig, tls=tls) as chan:
        call = chan.unary_unary(f"/{SERVICE}/Unary")(b"hello", metadata=auth(rig, grpc_port))
        answer = json.loads(await call)
        initial = await call.initial_metadata()
        trailing = await call.trailing_metadata()
        code = await call.code()
    assert code == grpc.StatusCode.OK
    assert answer["echo"] == "hello"
    assert answer["metadata"]["x-custom"] == "kept"
    assert not [k for k in answer["metadata"] if k.startswith("x-aws-proxy")]
    assert ("x-initial", "sent") in list(initial or ())
    assert ("x-trailer", "kept") in list(trailing or ())
    assert ("x-length", "5") in list(trailing or ())


@pytest.mark.parametrize("tls", [False, True])
async def test_streaming_call_flows_both_ways(rig: Rig, grpc_port: int, tls: bool) -> None:
    async with channel(rig, tls=tls) as chan:
        call = chan.stream_stream(f"/{SERVICE}/Chat")(metadata=auth(rig, grpc_port))
        replies = []
        for word in (b"one", b"two", b"three"):
            await call.write(word)
            replies.append(await call.read())  # answered before the stream ends
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        trailing = await call.trailing_metadata()
    assert replies == [b"ONE", b"TWO", b"THREE"]
    assert ("x-count", "3") in list(trailing or ())


async def test_status_and_message_of_a_failed_call_arrive(rig: Rig, grpc_port: int) -> None:
    async with channel(rig, tls=False) as chan:
        call = chan.unary_unary(f"/{SERVICE}/Fail")(b"", metadata=auth(rig, grpc_port))
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
    assert failure.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert failure.value.details() == "not today"


async def test_grpc_without_a_token_is_refused(rig: Rig, grpc_port: int) -> None:
    async with channel(rig, tls=False) as chan:
        call = chan.unary_unary(f"/{SERVICE}/Unary")(
            b"x", metadata=(("x-aws-proxy-port", str(grpc_port)),)
        )
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call
    assert failure.value.code() == grpc.StatusCode.PERMISSION_DENIED  # HTTP 403
