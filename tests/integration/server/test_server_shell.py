"""``wss://<id>.<domain>/shell``: a PTY in a real VM through the endpoint proxy."""

from __future__ import annotations

import json
import socket
import ssl
from typing import Any

import pytest
from tests.framework.server_harness import DOMAIN, LiveServer, run_vm
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Subprotocol

pytestmark = pytest.mark.timeout(600)


def shell_token(server: LiveServer, vm_id: str) -> str:
    answer = server.client().create_microvm_shell_auth_token(
        microvmIdentifier=vm_id, expirationInMinutes=10
    )
    return str(answer["authToken"]["X-aws-proxy-auth"])


def open_shell(server: LiveServer, vm_id: str, secret: str) -> ClientConnection:
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


def session(ws: ClientConnection, *typed: str) -> tuple[str, dict[str, Any]]:
    """Type the lines, then collect terminal output until the exit message."""
    for line in typed:
        ws.send(line.encode())
    output = b""
    while True:
        try:
            message = ws.recv(timeout=60)
        except ConnectionClosed:
            return output.decode(errors="replace"), {}
        if isinstance(message, bytes):
            output += message
            continue
        control = json.loads(message)
        if control.get("type") == "exit":
            return output.decode(errors="replace"), control


@pytest.fixture(scope="module")
def shell_vm(live_server: LiveServer, flask_image: dict[str, Any]) -> Any:
    vm = run_vm(live_server, "flask-counter", "HTTP_INGRESS", "SHELL_INGRESS")
    yield vm["microvmId"]
    live_server.client().terminate_microvm(microvmIdentifier=vm["microvmId"])


def test_shell_runs_commands_resizes_and_passes_the_exit_code(
    live_server: LiveServer, shell_vm: str
) -> None:
    with open_shell(live_server, shell_vm, shell_token(live_server, shell_vm)) as ws:
        ws.send(json.dumps({"type": "resize", "cols": 123, "rows": 45}))
        output, control = session(ws, "stty size; echo marker-$((6*7))\n", "exit 3\n")
    assert "45 123" in output
    assert "marker-42" in output
    assert control.get("code", control.get("status")) == 3


def test_two_shells_at_once_are_separate(live_server: LiveServer, shell_vm: str) -> None:
    secret = shell_token(live_server, shell_vm)
    with (
        open_shell(live_server, shell_vm, secret) as one,
        open_shell(live_server, shell_vm, secret) as two,
    ):
        one.send(b"echo first-$$ > /tmp/one; exit 0\n")
        two.send(b"echo second; exit 0\n")
        out_two, _ = session(two)
        out_one, _ = session(one)
    assert "second" in out_two
    assert "second" not in out_one


def test_endpoint_token_does_not_open_a_shell(live_server: LiveServer, shell_vm: str) -> None:
    endpoint_only = live_server.client().create_microvm_auth_token(
        microvmIdentifier=shell_vm, expirationInMinutes=5, allowedPorts=[{"allPorts": {}}]
    )["authToken"]["X-aws-proxy-auth"]
    with pytest.raises(Exception, match="403"):
        open_shell(live_server, shell_vm, endpoint_only)


def test_http_only_vm_refuses_shell_tokens(
    live_server: LiveServer, flask_image: dict[str, Any]
) -> None:
    vm_id = run_vm(live_server, "flask-counter", "HTTP_INGRESS")["microvmId"]
    client = live_server.client()
    with pytest.raises(client.exceptions.ValidationException):
        client.create_microvm_shell_auth_token(microvmIdentifier=vm_id, expirationInMinutes=5)
    client.terminate_microvm(microvmIdentifier=vm_id)
