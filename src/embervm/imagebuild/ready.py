"""Readiness of a freshly booted image: the ``ready``/``validate`` hooks, or the app's port.

Hooks (docs/HOOKS.md): ``POST http://<guest>:<hooks.port>/aws/lambda-microvms/runtime/
v1/<hook>``; 200 = ready, 503 = not yet (retried), anything else fails the build; the whole wait
is bounded by the hook's timeout (default 30 s). Connection errors are retried too: the app may
not listen yet. With the ready hook off, the first EXPOSEd TCP port (8080 by default) must
accept a connection within the same default timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from embervm.errors import BuildFailure
from embervm.wire import APP_PORT

HOOK_PATH = "/aws/lambda-microvms/runtime/v1/"
DEFAULT_HOOK_TIMEOUT = 30.0
DEFAULT_APP_PORT = APP_PORT
DEFAULT_HOOKS_PORT = APP_PORT
ATTEMPT_TIMEOUT = 5.0


@dataclass(frozen=True)
class HookSettings:
    """The build-time half of the model's ``hooks`` (``microvmImageHooks``)."""

    port: int = DEFAULT_HOOKS_PORT
    ready: bool = False
    ready_timeout: float = DEFAULT_HOOK_TIMEOUT
    validate: bool = False
    validate_timeout: float = DEFAULT_HOOK_TIMEOUT

    @classmethod
    def from_model(cls, hooks: Mapping[str, Any] | None) -> HookSettings:
        if not hooks:
            return cls()
        image = hooks.get("microvmImageHooks") or {}
        return cls(
            port=int(hooks.get("port", DEFAULT_HOOKS_PORT)),
            ready=image.get("ready") == "ENABLED",
            ready_timeout=float(image.get("readyTimeoutInSeconds", DEFAULT_HOOK_TIMEOUT)),
            validate=image.get("validate") == "ENABLED",
            validate_timeout=float(image.get("validateTimeoutInSeconds", DEFAULT_HOOK_TIMEOUT)),
        )


AppExited = Callable[[], Awaitable[int | None]]


async def _check_app(app_exit_code: AppExited | None, what: str) -> None:
    if app_exit_code is None:
        return
    code = await app_exit_code()
    if code is not None:
        raise BuildFailure(f"the app exited with code {code} before {what}")


HookCall = Callable[[str, float], Awaitable[int | None]]
"""``(hook, attempt_timeout) -> HTTP status``, or None when nothing answered (not listening
yet, connection reset, attempt timed out)."""

PortProbe = Callable[[float], Awaitable[bool]]
"""``(attempt_timeout) -> True`` once the port accepts a TCP connection."""


async def wait_for_hook(
    hook: str,
    call: HookCall,
    *,
    timeout: float,  # noqa: ASYNC109
    interval: float = 0.2,
    app_exit_code: AppExited | None = None,
    on_attempt: Callable[[str], None] | None = None,
) -> None:
    """Call the hook until it answers 200, within ``timeout`` seconds (503 and no answer are
    retried; any other status fails at once)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        await _check_app(app_exit_code, f"the {hook} hook answered")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BuildFailure(
                f"the {hook} hook did not answer 200 within {timeout:g} s (last: {last})"
            )
        attempt = min(ATTEMPT_TIMEOUT, remaining)
        try:
            async with asyncio.timeout(attempt + 1):
                status = await call(hook, attempt)
        except TimeoutError:
            status = None
        if status == 200:
            return
        if status is not None and status != 503:
            raise BuildFailure(
                f"the {hook} hook answered HTTP {status}; it must answer 200 (ready) or 503 "
                "(not yet)"
            )
        last = "no answer" if status is None else "HTTP 503"
        if on_attempt is not None:
            on_attempt(last)
        await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))


async def wait_for_port(
    probe: PortProbe,
    *,
    port: int,
    timeout: float,  # noqa: ASYNC109
    interval: float = 0.2,
    app_exit_code: AppExited | None = None,
) -> None:
    """Wait until ``probe`` says the app's ``port`` accepts connections, within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        await _check_app(app_exit_code, f"port {port} accepted a connection")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise BuildFailure(
                f"the app did not accept connections on port {port} within {timeout:g} s"
            )
        attempt = min(ATTEMPT_TIMEOUT, remaining)
        try:
            async with asyncio.timeout(attempt + 1):
                if await probe(attempt):
                    return
        except TimeoutError:
            pass
        await asyncio.sleep(min(interval, max(deadline - time.monotonic(), 0)))


# --- over a network path (for runtimes that reach the guest's ports from the host) ---------


async def http_hook(
    address: tuple[str, int],
    hook: str,
    timeout: float,  # noqa: ASYNC109
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> int | None:
    """POST ``/aws/lambda-microvms/runtime/v1/<hook>`` to ``address``; the status or None."""
    host, port = address
    url = f"http://{host}:{port}{HOOK_PATH}{hook}"
    async with httpx.AsyncClient(transport=transport, trust_env=False) as client:
        try:
            response = await client.post(url, content=b"", timeout=timeout)
        except httpx.HTTPError:
            return None
    return response.status_code


async def tcp_probe(address: tuple[str, int], timeout: float) -> bool:  # noqa: ASYNC109
    """True if ``address`` accepts a TCP connection within ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(*address)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True
