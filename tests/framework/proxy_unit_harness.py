"""The proxy's test rig: a real ``EndpointProxy`` (both listeners, a real local CA) in front of
real local upstreams on 127.0.0.1, with a fake of core's lifecycle and a shell opener that
runs ``/bin/sh`` on a real local PTY. No VM: where the VM's address would be, 127.0.0.1 is."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import ssl
import struct
import termios
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from embervm.config import Settings
from embervm.contracts import PortGrant
from embervm.core.lifecycle import ResolvedVm
from embervm.core.tokens import TokenAuthority
from embervm.errors import ConflictError, InternalError, NotFoundError
from embervm.proxy import EndpointProxy

VM = "mvm-0123456789abcdef0123"
OTHER = "mvm-fedcba9876543210fedc"
DOMAIN = "microvm.localhost"
HOST = f"{VM}.{DOMAIN}"


def running(vm_id: str, *ingress: str, memory_mib: int = 1024) -> ResolvedVm:
    return ResolvedVm(vm_id, "RUNNING", frozenset(ingress or {"ALL_INGRESS"}), "127.0.0.1",
                      True, "", memory_mib)  # fmt: skip


def suspended(vm_id: str, *, auto_resume: bool = True) -> ResolvedVm:
    return replace(running(vm_id), state="SUSPENDED", address=None, auto_resume=auto_resume)


@dataclass
class Routes:
    """Core's ``Lifecycle`` as the proxy sees it. A resume is single flight (as core's is) and
    waits for ``resume_gate``; ``waiting`` counts the requests held on it."""

    vms: dict[str, ResolvedVm]
    resumes: list[str] = field(default_factory=list)
    activity: list[str] = field(default_factory=list)
    resume_fails: bool = False
    fresh_lookups: bool = True  # False: ``resolved`` never knows, every request awaits
    resume_gate: asyncio.Event = field(default_factory=asyncio.Event)
    waiting: int = 0
    _resuming: dict[str, asyncio.Future[ResolvedVm]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.resume_gate.set()

    async def resolve(self, microvm_id: str) -> ResolvedVm:
        if microvm_id not in self.vms:
            raise NotFoundError("no such VM")
        return self.vms[microvm_id]

    def resolved(self, microvm_id: str) -> ResolvedVm | None:
        return self.vms.get(microvm_id) if self.fresh_lookups else None

    async def ensure_running(self, microvm_id: str) -> ResolvedVm:
        vm = await self.resolve(microvm_id)
        if vm.address is not None:
            return vm
        if not vm.auto_resume:
            raise ConflictError("suspended")
        flight = self._resuming.get(microvm_id)
        if flight is None:
            flight = self._resuming[microvm_id] = asyncio.ensure_future(self._resume(vm))
        self.waiting += 1
        try:
            return await asyncio.shield(flight)
        finally:
            self.waiting -= 1

    async def _resume(self, vm: ResolvedVm) -> ResolvedVm:
        try:
            self.resumes.append(vm.microvm_id)
            await self.resume_gate.wait()
            if self.resume_fails:
                raise InternalError("resume failed")
            self.vms[vm.microvm_id] = replace(vm, state="RUNNING", address="127.0.0.1")
            return self.vms[vm.microvm_id]
        finally:
            del self._resuming[vm.microvm_id]

    def record_activity(self, microvm_id: str) -> None:
        self.activity.append(microvm_id)


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def until(check: Callable[[], Awaitable[bool] | bool], timeout: float = 20) -> None:  # noqa: ASYNC109
    """Poll ``check`` (bounded) for state that has no event of its own to wait on."""
    async with asyncio.timeout(timeout):
        while True:
            outcome = check()
            if outcome if isinstance(outcome, bool) else await outcome:
                return
            await asyncio.sleep(0.01)


class LocalPty:
    """``/bin/sh`` on a real PTY of this machine, shaped like ``embervm.guest.PtySession``."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int) -> None:
        self.proc = proc
        self.master = master
        self.sizes: list[tuple[int, int]] = []

    @classmethod
    async def spawn(cls, cols: int, rows: int) -> LocalPty:
        master, slave = os.openpty()
        fcntl.ioctl(master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        env = {"PATH": "/usr/bin:/bin", "TERM": "dumb", "PS1": "$ ", "HOME": "/tmp"}
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh", "-i", stdin=slave, stdout=slave, stderr=slave, env=env,
                start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        return cls(proc, master)

    async def _read(self) -> bytes:
        loop = asyncio.get_running_loop()
        while self.master >= 0:
            try:
                return os.read(self.master, 65536)
            except BlockingIOError:
                pass
            except OSError:  # EIO: the shell is gone
                return b""
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.master, _set_once, ready)
            try:
                await ready
            finally:
                loop.remove_reader(self.master)
        return b""

    async def _chunks(self) -> AsyncIterator[bytes]:
        while chunk := await self._read():
            yield chunk

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._chunks()

    async def write(self, data: bytes) -> None:
        os.write(self.master, data)

    async def resize(self, cols: int, rows: int) -> None:
        self.sizes.append((cols, rows))
        fcntl.ioctl(self.master, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def wait(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            return await self.proc.wait()

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            await self.proc.wait()
        if self.master >= 0:
            os.close(self.master)
            self.master = -1


@dataclass
class LocalShells:
    opened: list[LocalPty] = field(default_factory=list)

    async def open_shell(self, vm_id: str, *, cols: int, rows: int) -> LocalPty:
        pty = await LocalPty.spawn(cols, rows)
        self.opened.append(pty)
        return pty

    async def close_all(self) -> None:
        for pty in self.opened:
            await pty.close()


@dataclass
class Rig:
    proxy: EndpointProxy
    routes: Routes
    tokens: TokenAuthority
    shells: LocalShells
    ca: Path

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy.http_port}"

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.proxy.tls_port}"

    def client_tls(self) -> ssl.SSLContext:
        """Trusts only the proxy's local CA."""
        return ssl.create_default_context(cafile=str(self.ca))

    def token(self, vm_id: str = VM, *, kind: str = "endpoint", port: int | None = None) -> str:
        ports = PortGrant(all_ports=True) if port is None else PortGrant(ranges=((port, port),))
        return self.tokens.issue(vm_id, kind=kind, ports=ports, expires_in_minutes=5)  # type: ignore[arg-type]

    def headers(self, port: int, *, vm_id: str = VM, **extra: str) -> dict[str, str]:
        """Host, token and port headers for a request to ``port`` of ``vm_id``."""
        return {"host": f"{vm_id}.{DOMAIN}", "x-aws-proxy-auth": self.token(vm_id),
                "x-aws-proxy-port": str(port), **extra}  # fmt: skip


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    routes = Routes({VM: running(VM), OTHER: running(OTHER)})
    tokens = TokenAuthority(tmp_path / "keys" / "tokens.json")
    shells = LocalShells()
    settings = Settings(data_dir=tmp_path, proxy_port=0, proxy_http_port=0, domain=DOMAIN)
    proxy = EndpointProxy(settings, lifecycle=routes, tokens=tokens, shells=shells)
    await proxy.start()
    try:
        yield Rig(proxy, routes, tokens, shells, settings.tls_dir / "ca.pem")
    finally:
        await proxy.stop()
        await shells.close_all()


# -- an HTTP/1.1 app (Starlette on uvicorn) ----------------------------------------------


@dataclass
class AppState:
    """What the app saw, and gates the tests open to let it go on."""

    first_chunk: asyncio.Event = field(default_factory=asyncio.Event)
    next_event: asyncio.Event = field(default_factory=asyncio.Event)
    hits: int = 0


def make_app(state: AppState) -> Starlette:
    async def headers(request: Request) -> Response:
        state.hits += 1
        seen = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.scope["headers"]]
        return JSONResponse({"headers": seen, "path": request.url.path,
                             "client_port": request.client.port if request.client else 0,
                             "http_version": request.scope["http_version"]})  # fmt: skip

    class Echo:
        """Raw ASGI: each chunk of the request body goes back as soon as it arrives (Starlette's
        StreamingResponse would race the body for ``receive``)."""

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            message = await receive()  # before answering: an Expect: 100-continue gets its 100
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"application/octet-stream")]})  # fmt: skip
            while True:
                if message["type"] != "http.request":
                    return
                if message.get("body"):
                    state.first_chunk.set()
                    await send({"type": "http.response.body", "body": message["body"],
                                "more_body": True})  # fmt: skip
                if not message.get("more_body"):
                    break
                message = await receive()
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def events(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            yield b"data: one\n\n"
            await asyncio.wait_for(state.next_event.wait(), 20)
            yield b"data: two\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def sized(request: Request) -> Response:
        """``/sized?n=N``: N bytes with a Content-Length (the patterned bytes show a mix-up)."""
        size = int(request.query_params["n"])
        return Response(bytes(i % 251 for i in range(size)), media_type="application/octet-stream")

    async def big(request: Request) -> Response:
        async def stream() -> AsyncIterator[bytes]:
            for i in range(64):
                yield bytes([i]) * 65536

        return StreamingResponse(stream())

    return Starlette(routes=[
        Route("/headers", headers), Route("/echo", Echo(), methods=["POST"]),
        Route("/events", events), Route("/big", big), Route("/sized", sized),
    ])  # fmt: skip


def listening_socket() -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    sock.setblocking(False)
    return sock


@dataclass
class App:
    port: int
    state: AppState


@pytest.fixture
async def app() -> AsyncIterator[App]:
    state = AppState()
    sock = listening_socket()
    config = uvicorn.Config(make_app(state), lifespan="off", log_level="warning", ws="none",
                            http="h11", timeout_graceful_shutdown=1)  # fmt: skip
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await until(lambda: bool(server.started))
    try:
        yield App(sock.getsockname()[1], state)
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)
        sock.close()


def seen_headers(body: dict[str, Any]) -> dict[str, str]:
    return {k: v for k, v in body["headers"]}


def dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def gather_bounded(*aws: Awaitable[Any], timeout: float = 30) -> list[Any]:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        return list(await asyncio.gather(*aws))
