"""Compose the parts into one running server, and take them down in reverse.

Start-up order (each part's shutdown is pushed on one exit stack, so a failure half-way
releases exactly what was acquired): data dir and credentials → the host's parts
(``embervm.host.start_host_parts``: guest artifacts, accelerator, network, runtime, build
machines, the adapters of core's seams) → store → core services → the VMs of the last run taken
back (leftovers reclaimed, suspended VMs kept) → timers → control API listener → endpoint proxy
listeners → ``embervm ready api=... proxy=...``.

Every listening socket is bound before anything is announced, so a port in use is reported
as one readable line, not as a traceback from deep inside a web server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from embervm.api import CredentialStore, create_api_app
from embervm.api.extensions import extension_routes
from embervm.background import start_background
from embervm.blobs.uploads import UploadArea
from embervm.config import Settings
from embervm.core import CoreLimits, Operations, host_memory_budget_mib
from embervm.core.tokens import TokenAuthority
from embervm.errors import EmbervmError
from embervm.host import LocalHost, start_host_parts
from embervm.proxy import EndpointProxy
from embervm.server import roles
from embervm.server.api_listener import serve_api
from embervm.server.datadir import secure_data_dir
from embervm.store import open_repository

log = logging.getLogger("embervm.server")

Progress = Callable[[str], None]


def _stderr_progress(message: str) -> None:
    print(f"embervm: {message}", file=sys.stderr, flush=True)


@dataclass
class RunningServer:
    """What a started server exposes (tests and the demo use the URLs)."""

    settings: Settings
    operations: Operations
    host: LocalHost
    api_url: str
    proxy_url: str
    proxy_http_url: str

    @property
    def ready_line(self) -> str:
        return f"embervm ready api={self.api_url} proxy={self.proxy_url}"


async def _serve_api(stack: contextlib.AsyncExitStack, settings: Settings, ops: Operations) -> str:
    credentials = CredentialStore(settings.credentials_file)
    routes, streamed = extension_routes(ops, UploadArea(settings.uploads_dir))
    app = create_api_app(
        ops, credentials, settings=settings, extra_routes=routes, streamed_paths=streamed
    )
    return await serve_api(stack, settings, app)


async def start_server(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    *,
    progress: Progress = _stderr_progress,
    limits: CoreLimits | None = None,
) -> RunningServer:
    """Start every part; each shutdown is pushed on ``stack`` (closing it stops the server)."""
    tightened = await asyncio.to_thread(secure_data_dir, settings.data_dir)
    if tightened:
        progress(f"{settings.data_dir} was open to other users: {tightened} entries made private")
    for path in (settings.run_dir, settings.vms_dir, settings.images_dir):
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(CredentialStore(settings.credentials_file).ensure)

    ops_ref: list[Operations] = []

    async def vm_exited(vm_id: str, reason: str) -> None:
        if ops_ref:
            await ops_ref[0].vm_exited(vm_id, reason)

    parts = await start_host_parts(settings, stack, on_exit=vm_exited, progress=progress)
    repository = await open_repository(settings.effective_database_url)
    stack.push_async_callback(repository.close)
    tokens = TokenAuthority(settings.token_keys_file)
    start_background(
        stack, tokens.keep_rotating(settings.token_key_rotation_hours), name="token-key-rotation"
    )
    ops = Operations(
        settings=settings,
        repository=repository,
        host=parts.backend,
        builder=parts.builder,
        tokens=tokens,
        limits=limits or CoreLimits(host_memory_budget_mib=host_memory_budget_mib()),
        build_logs=parts.build_logs,
        app_logs=parts.app_logs,
    )
    ops_ref.append(ops)
    running = [vm.microvm_id for vm in await repository.microvms_in_states(["RUNNING"])]
    # A launch cut short is not taken back (its /run hook may not have run): it is reclaimed.
    parked = [
        vm.microvm_id
        for vm in await repository.microvms_in_states(["SUSPENDED", "SUSPENDING", "PENDING"])
        if vm.state != "PENDING" or vm.suspended_at is not None
    ]
    held, removed = await parts.take_back(running, parked)
    if held or removed:
        progress(f"took back {len(held)} VMs of the last run; removed {removed} leftovers")
    await ops.start()
    stack.push_async_callback(ops.stop)

    api_url = await _serve_api(stack, settings, ops)
    if settings.api_listen is None and settings.api_host != settings.listen_host:
        # --listen used to move the API too: say where it is now (A7).
        progress(f"control API on {api_url} only; --api-listen puts it on the network (HTTPS)")
    proxy = EndpointProxy(settings, lifecycle=ops.lifecycle, tokens=tokens, shells=parts.runtime)
    await proxy.start()
    stack.push_async_callback(proxy.stop)
    return RunningServer(
        settings=settings,
        operations=ops,
        host=parts.runtime,
        api_url=api_url,
        proxy_url=f"https://{settings.listen_host}:{proxy.tls_port}",
        proxy_http_url=f"http://{settings.listen_host}:{proxy.http_port}",
    )


async def _wait_for_signal() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop's event loop when it is installed (the endpoint proxy relays ~20 % more requests
    per second on it, the control API answers faster), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop
    return uvloop.new_event_loop


async def start_role(
    settings: Settings, stack: contextlib.AsyncExitStack, progress: Progress = _stderr_progress
) -> str:
    """Start what ``settings.role`` plays (docs/FLEET.md); returns its ready line."""
    if settings.role == "all":
        return (await start_server(settings, stack, progress=progress)).ready_line
    roles.check_fleet_settings(settings)
    if settings.role == "host":
        return (await roles.start_host_role(settings, stack, progress)).ready_line
    if settings.role == "api":
        return (await roles.start_api_role(settings, stack, _serve_api)).ready_line
    return (await roles.start_proxy_role(settings, stack)).ready_line


async def run_server(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM: 0 after a clean stop, 1 when start-up failed."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        async with contextlib.AsyncExitStack() as stack:
            print(await start_role(settings, stack), flush=True)
            await _wait_for_signal()
            _stderr_progress("stopping")
    except EmbervmError as exc:
        _stderr_progress(f"error: {exc}")
        return 1
    _stderr_progress("stopped")
    return 0
