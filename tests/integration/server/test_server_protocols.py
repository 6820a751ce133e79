"""Every protocol the endpoint promises, with real clients against apps in real VMs: HTTP/1.1,
HTTP/2 over TLS and h2c, server-sent events, gRPC (unary, streaming, trailers), WebSocket."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest
from tests.framework.server_harness import DOMAIN, LiveServer, run_vm, token
from websockets.sync.client import connect
from websockets.typing import Subprotocol

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def flask_vm(live_server: LiveServer, flask_image: dict[str, Any]) -> Iterator[tuple[str, str]]:
    vm_id = run_vm(live_server, "flask-counter")["microvmId"]
    yield vm_id, token(live_server, vm_id)
    live_server.client().terminate_microvm(microvmIdentifier=vm_id)


@pytest.fixture(scope="module")
def grpc_vm(live_server: LiveServer, grpc_ws_image: dict[str, Any]) -> Iterator[tuple[str, str]]:
    vm_id = run_vm(live_server, "grpc-ws")["microvmId"]
    yield vm_id, token(live_server, vm_id)
    live_server.client().terminate_microvm(microvmIdentifier=vm_id)


def test_the_app_never_sees_proxy_headers(live_server: LiveServer, flask_vm: Any) -> None:
    vm_id, secret = flask_vm
    answer = live_server.get(
        vm_id, secret, "/headers", headers={"x-aws-proxy-port": "8080", "x-custom": "kept"}
    )
    seen = answer.json()
    assert seen["x-custom"] == "kept"
    assert not [name for name in seen if name.startswith("x-aws-proxy")]


@pytest.mark.parametrize("tls", [True, False], ids=["h2-tls", "h2c"])
def test_http2(live_server: LiveServer, flask_vm: Any, tls: bool) -> None:
    vm_id, secret = flask_vm
    base, host = live_server.endpoint(vm_id, tls=tls)
    verify: Any = live_server.tls() if tls else False
    with httpx.Client(http2=True, http1=tls, verify=verify, timeout=60) as client:
        answer = client.get(base + "/", headers={**host, "x-aws-proxy-auth": secret})
    assert answer.status_code == 200
    assert answer.http_version == "HTTP/2"


def test_server_sent_events_arrive_one_by_one(live_server: LiveServer, flask_vm: Any) -> None:
    vm_id, secret = flask_vm
    base, host = live_server.endpoint(vm_id)
    arrivals: list[tuple[float, dict[str, Any]]] = []
    with httpx.stream(
        "GET", base + "/events?n=3", headers={**host, "x-aws-proxy-auth": secret}, timeout=60
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                arrivals.append((time.monotonic(), json.loads(line[6:])))
    assert [event["event"] for _, event in arrivals] == [1, 2, 3]
    assert arrivals[-1][0] > arrivals[0][0]  # streamed, not delivered in one piece


def test_grpc_unary_streaming_and_trailers(live_server: LiveServer, grpc_vm: Any) -> None:
    vm_id, secret = grpc_vm
    credentials = grpc.ssl_channel_credentials(live_server.ca.read_bytes())
    options = [("grpc.ssl_target_name_override", f"{vm_id}.{DOMAIN}"),
               ("grpc.default_authority", f"{vm_id}.{DOMAIN}")]  # fmt: skip
    metadata = (("x-aws-proxy-auth", secret),)
    with grpc.secure_channel(f"127.0.0.1:{live_server.proxy_port}", credentials, options) as ch:
        hello = ch.unary_unary("/embervm.example.Greeter/Hello")
        reply, call = hello.with_call(b"embervm", metadata=metadata, timeout=60)
        assert reply == b"hello embervm"
        assert ("x-served-by", "embervm-example") in call.trailing_metadata()
        count = ch.unary_stream("/embervm.example.Greeter/Count")
        assert [int(x) for x in count(b"5", metadata=metadata, timeout=60)] == [1, 2, 3, 4, 5]
        with pytest.raises(grpc.RpcError) as refused:
            hello(b"x", metadata=(("x-aws-proxy-auth", "forged"),), timeout=60)
        assert refused.value.code() in (grpc.StatusCode.PERMISSION_DENIED,
                                        grpc.StatusCode.UNAVAILABLE,
                                        grpc.StatusCode.UNKNOWN)  # fmt: skip


def test_websocket_with_subprotocol_auth_and_port(live_server: LiveServer, grpc_vm: Any) -> None:
    vm_id, secret = grpc_vm
    sock = socket.create_connection(("127.0.0.1", live_server.proxy_http_port), timeout=30)
    with connect(
        f"ws://{vm_id}.{DOMAIN}:{live_server.proxy_http_port}/",
        sock=sock,
        subprotocols=[
            Subprotocol("lambda-microvms"),
            Subprotocol("lambda-microvms.port.8081"),
            Subprotocol(f"lambda-microvms.authentication.{secret}"),
        ],
        open_timeout=60,
    ) as ws:
        ws.send("ping")
        assert ws.recv(timeout=60) == "echo: ping"
