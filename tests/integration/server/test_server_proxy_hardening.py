"""The endpoint proxy's HTTP/1.1 hardening in a real ``embervm server`` with a real VM (a
stdlib app, ``hardening_app``, that echoes the fields it got and sets a parent-domain cookie):
heads two parsers could route differently are 400 before the app, hop-by-hop fields never
reach it (A15), its cookie comes back host-only (A18), a shell ends when the key that sealed
its token is revoked by ``embervm tokens rotate --revoke`` (A16), and connections over the
per-address cap are closed at once while the held ones keep working (A8)."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.framework.integration_cache import test_cache_dir
from tests.framework.server_harness import DOMAIN, LiveServer, build_image, free_port, run_vm, token
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

from embervm.guest.artifacts import GuestArtifacts

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def vm_id(live_server: LiveServer) -> Iterator[str]:
    image = build_image(live_server, "hardening", Path(__file__).parent / "hardening_app")
    assert image["state"] == "CREATED", image
    vm = run_vm(live_server, "hardening", "HTTP_INGRESS", "SHELL_INGRESS")
    yield vm["microvmId"]
    live_server.client().terminate_microvm(microvmIdentifier=vm["microvmId"])


def exchange(port: int, head: bytes) -> bytes:
    """Send a head on a new connection and read until the proxy closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def request(vm_id: str, secret: str, first: str, *extra: str) -> bytes:
    lines = [first, f"Host: {vm_id}.{DOMAIN}", f"X-aws-proxy-auth: {secret}", *extra,
             "Connection: close"]  # fmt: skip
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def test_heads_two_parsers_could_route_differently_are_refused_before_the_app(
    live_server: LiveServer, vm_id: str
) -> None:
    secret = token(live_server, vm_id)
    port = live_server.proxy_http_port
    assert exchange(port, request(vm_id, secret, "GET / HTTP/1.1")).startswith(b"HTTP/1.1 200 ")
    for head in (
        request(vm_id, secret, "GET / HTTP/1.1", f"Host: other.{DOMAIN}"),
        request(vm_id, secret, "GET http://other.example/ HTTP/1.1"),
        request(vm_id, secret, "POST / HTTP/1.0", "Transfer-Encoding: chunked"),
        request(
            vm_id,
            secret,
            "GET / HTTP/1.1",
            "Connection: Upgrade",
            "Upgrade: websocket",
            f"Host: {vm_id}.{DOMAIN}",
        ),
    ):
        assert exchange(port, head).startswith(b"HTTP/1.1 400 "), head


def test_the_app_gets_no_hop_by_hop_field_and_its_cookie_comes_back_host_only(
    live_server: LiveServer, vm_id: str
) -> None:
    head = request(vm_id, token(live_server, vm_id), "GET / HTTP/1.1",
                   "Connection: keep-alive, X-Secret", "X-Secret: 1", "Keep-Alive: timeout=5",
                   "Proxy-Authorization: Basic eA==", "TE: trailers", "X-Kept: yes")  # fmt: skip
    answer = exchange(live_server.proxy_http_port, head)
    fields, _, body = answer.partition(b"\r\n\r\n")
    assert fields.startswith(b"HTTP/1.1 200 ")
    seen = {name for name, _ in json.loads(body)["headers"]}
    assert "x-kept" in seen
    assert not seen & {"x-secret", "keep-alive", "proxy-authorization", "te", "x-aws-proxy-auth"}
    assert b"Set-Cookie: session=1; Path=/" in fields.replace(b"set-cookie", b"Set-Cookie")
    assert b"domain" not in fields.lower()


def open_shell(server: LiveServer, vm_id: str) -> ClientConnection:
    answer = server.client().create_microvm_shell_auth_token(
        microvmIdentifier=vm_id, expirationInMinutes=10
    )
    secret = answer["authToken"]["X-aws-proxy-auth"]
    host = f"{vm_id}.{DOMAIN}"
    sock = socket.create_connection(("127.0.0.1", server.proxy_port), timeout=30)
    return connect(
        f"wss://{host}:{server.proxy_port}/shell",
        sock=sock,
        ssl=ssl.create_default_context(cafile=str(server.ca)),
        server_hostname=host,
        subprotocols=[
            Subprotocol("lambda-microvms"),
            Subprotocol("lambda-microvms.port.8022"),
            Subprotocol(f"lambda-microvms.authentication.{secret}"),
        ],
        open_timeout=60,
    )


def test_a_shell_ends_when_its_tokens_key_is_revoked(live_server: LiveServer, vm_id: str) -> None:
    with open_shell(live_server, vm_id) as ws:
        ws.send(b"echo shell-$((6*7))\n")
        seen = b""
        while b"shell-42" not in seen:
            frame = ws.recv(timeout=60)
            seen += frame if isinstance(frame, bytes) else b""
        subprocess.run(
            [sys.executable, "-m", "embervm.cli", "--data-dir", str(live_server.data_dir),
             "tokens", "rotate", "--revoke"],
            check=True, capture_output=True, timeout=60,
        )  # fmt: skip
        with pytest.raises(ConnectionClosed):
            read_all(ws)  # the proxy looks every 5 s
    assert ws.close_code == 1008
    assert ws.close_reason == "token revoked"


def read_all(ws: ClientConnection) -> None:
    while True:
        ws.recv(timeout=30)


@pytest.fixture
def capped_server(guest_artifacts: GuestArtifacts, tmp_path: Path) -> Iterator[LiveServer]:
    """A second server (no VM needed) that lets 3 connections per address in."""
    (tmp_path / "artifacts").symlink_to(test_cache_dir() / "artifacts")
    server = LiveServer(tmp_path, free_port(), free_port(), free_port(),
                        extra_args=["--proxy-max-connections-per-ip", "3"])  # fmt: skip
    server.start()
    try:
        yield server
    finally:
        server.stop()


def turned_away(port: int) -> bool:
    """A connection that sends nothing is closed by the proxy at once (a TLS listener would
    otherwise wait for the ClientHello, a plain one for a request). The close can be a reset
    that arrives before ``connect`` itself returns (with a timeout, Python's connect polls and
    then reads ``SO_ERROR``, which is ECONNRESET by then)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
            return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def test_connections_over_the_per_address_cap_are_closed_and_held_ones_keep_working(
    capped_server: LiveServer,
) -> None:
    unknown = f"GET / HTTP/1.1\r\nHost: mvm-00000000000000000000.{DOMAIN}\r\n\r\n".encode()
    held = [socket.create_connection(("127.0.0.1", capped_server.proxy_http_port), timeout=30)
            for _ in range(3)]  # fmt: skip
    try:
        assert turned_away(capped_server.proxy_http_port)
        assert turned_away(capped_server.proxy_port)
        held[0].sendall(unknown)
        assert held[0].recv(65536).startswith(b"HTTP/1.1 403 ")  # no token: still served
    finally:
        for sock in held:
            sock.close()
