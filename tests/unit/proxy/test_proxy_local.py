"""Admission and refusals over HTTP/1.1 in front of an HTTP/1.0 app (``http.server``): token
misuse, ingress connectors, unknown hosts, bad and dead ports, suspended VMs."""

from __future__ import annotations

import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from tests.framework.proxy_unit_harness import (
    HOST,
    OTHER,
    VM,
    LocalShells,
    Routes,
    dead_port,
    running,
)

from embervm.config import Settings
from embervm.contracts import PortGrant
from embervm.core.tokens import TokenAuthority
from embervm.proxy import EndpointProxy

pytestmark = pytest.mark.timeout(60)


class Echo(BaseHTTPRequestHandler):
    """HTTP/1.0 app (http.server's default): answers with the headers it received."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@dataclass
class Rig:
    url: str
    routes: Routes
    tokens: TokenAuthority
    port: int

    def token(self, vm_id: str = VM, *, kind: str = "endpoint", port: int | None = None) -> str:
        ports = PortGrant(all_ports=True) if port is None else PortGrant(ranges=((port, port),))
        return self.tokens.issue(vm_id, kind=kind, ports=ports, expires_in_minutes=5)  # type: ignore[arg-type]

    async def get(self, token: str | None, *, host: str = HOST, port: int | None = None,
                  **headers: str) -> httpx.Response:  # fmt: skip
        sent = {"host": host, "x-aws-proxy-port": str(port or self.port), **headers}
        if token is not None:
            sent["x-aws-proxy-auth"] = token
        async with httpx.AsyncClient(timeout=10) as client:
            return await client.get(self.url + "/path", headers=sent)


@pytest.fixture
async def rig(tmp_path: Path, upstream: int) -> AsyncIterator[Rig]:
    routes = Routes({VM: running(VM), OTHER: running(OTHER)})
    tokens = TokenAuthority(tmp_path / "keys.json")
    settings = Settings(data_dir=tmp_path, proxy_port=0, proxy_http_port=0)
    proxy = EndpointProxy(settings, lifecycle=routes, tokens=tokens, shells=LocalShells())
    await proxy.start()
    try:
        yield Rig(f"http://127.0.0.1:{proxy.http_port}", routes, tokens, upstream)
    finally:
        await proxy.stop()


async def test_a_valid_token_reaches_the_app_without_proxy_headers(rig: Rig) -> None:
    answer = await rig.get(rig.token(), **{"x-custom": "kept"})
    assert answer.status_code == 200
    seen = answer.json()
    assert seen["x-custom"] == "kept"
    assert not [name for name in seen if name.startswith("x-aws-proxy")]
    assert rig.routes.activity == [VM]


@pytest.mark.parametrize(
    "case", ["missing", "forged", "other-vm", "wrong-port", "shell-kind", "expired-format"]
)
async def test_token_misuse_is_403_without_detail(rig: Rig, case: str) -> None:
    token = {
        "missing": None,
        "forged": rig.token()[:-3] + "AAA",
        "other-vm": rig.token(OTHER),
        "wrong-port": rig.token(port=rig.port + 1),
        "shell-kind": rig.token(kind="shell"),
        "expired-format": "not.a.token.at.all",
    }[case]
    answer = await rig.get(token)
    assert answer.status_code == 403
    assert answer.text == "Forbidden\n"
    assert rig.routes.activity == []


async def test_ingress_connectors_are_enforced(rig: Rig) -> None:
    rig.routes.vms[VM] = running(VM, "NO_INGRESS")
    assert (await rig.get(rig.token())).status_code == 403
    rig.routes.vms[VM] = running(VM, "SHELL_INGRESS")
    assert (await rig.get(rig.token())).status_code == 403
    rig.routes.vms[VM] = running(VM, "HTTP_INGRESS")
    assert (await rig.get(rig.token())).status_code == 200


async def test_unknown_hosts_and_vms_are_404(rig: Rig) -> None:
    assert (await rig.get(rig.token(), host="example.com")).status_code == 404
    ghost = "mvm-99999999999999999999"
    answer = await rig.get(rig.token(ghost), host=f"{ghost}.microvm.localhost")
    assert answer.status_code == 404


async def test_bad_port_header_is_400_and_a_dead_port_is_502(rig: Rig) -> None:
    assert (await rig.get(rig.token(), port=70000)).status_code == 400
    assert (await rig.get(rig.token(), port=dead_port())).status_code == 502


async def test_suspended_vms_resume_or_answer_502(rig: Rig) -> None:
    rig.routes.vms[VM] = replace(running(VM), state="SUSPENDED", address=None)
    assert (await rig.get(rig.token())).status_code == 200
    assert rig.routes.resumes == [VM]
    rig.routes.vms[VM] = replace(running(VM), state="SUSPENDED", address=None, auto_resume=False)
    assert (await rig.get(rig.token())).status_code == 502
    rig.routes.vms[VM] = replace(running(VM), state="SUSPENDED", address=None)
    rig.routes.resume_fails = True
    assert (await rig.get(rig.token())).status_code == 502
