"""The control API's listener: uvicorn over h11 with bounded pre-auth input, TLS off loopback.

What a client without credentials can make the server hold (A7):

- a request head of at most ``MAX_HEAD_BYTES`` (h11's incomplete-event limit: a longer head is
  answered 400 and the connection closed; httptools, used before, set no limit at all);
- for at most ``HEAD_TIMEOUT`` seconds from the first byte of a head (or from the connection),
  not reset per byte, so a client trickling header lines is cut off;
- at most ``MAX_CONNECTIONS`` connections at once (uvicorn's ``limit_concurrency``: beyond it
  requests get 503 and keep-alive ends);
- and no body: ``api._app`` checks the SigV4 key id and date before reading one (then at most
  6 MiB in 30 s).

``serve_api`` binds before anything is announced and answers the URL clients use:
``https://`` when the settings ask for TLS (``Settings.api_tls``: an address off loopback, or an
operator's certificate), with a certificate the local CA issues unless one was given.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Generator

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from embervm.config import Settings
from embervm.errors import ConfigError
from embervm.proxy.tls import ensure_api_tls

MAX_HEAD_BYTES = 32 * 1024  # a signed request's head is ~1.5 KiB
HEAD_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
KEEP_ALIVE_TIMEOUT = 5.0


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with an absolute deadline on every request head."""

    head_timeout: float = HEAD_TIMEOUT
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # still waiting for a complete head
            self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE:
            self.transport.close()


def bind(host: str, port: int, what: str) -> socket.socket:
    """A listening TCP socket, or a ConfigError that names the flag to change."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        hint = "another process listens there" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"cannot listen on {host}:{port} for the {what}: {hint}") from exc
    sock.setblocking(False)
    return sock


class _QuietUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the server owns SIGINT/SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def api_config(app: ASGIApp, *, protocol: type[H11Protocol] = BoundedH11Protocol) -> uvicorn.Config:
    """The uvicorn settings that bound what an unauthenticated client can make us hold."""
    return uvicorn.Config(
        app,
        http=protocol,
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        limit_concurrency=MAX_CONNECTIONS,
        timeout_keep_alive=int(KEEP_ALIVE_TIMEOUT),
        log_level="warning",
        lifespan="off",
        access_log=False,
    )


async def serve_api(
    stack: contextlib.AsyncExitStack,
    settings: Settings,
    app: ASGIApp,
    *,
    protocol: type[H11Protocol] = BoundedH11Protocol,
) -> str:
    """Start the control API on ``settings.api_host``; its URL. Stopping is pushed on
    ``stack``."""
    config = api_config(app, protocol=protocol)
    if settings.api_tls:
        if settings.api_tls_cert is not None and settings.api_tls_key is not None:
            cert, key = settings.api_tls_cert, settings.api_tls_key
        else:
            files = await asyncio.to_thread(
                ensure_api_tls, settings.tls_dir, settings.domain, settings.api_host
            )
            cert, key = files.cert, files.key
        config.ssl_certfile, config.ssl_keyfile = str(cert), str(key)
    sock = bind(settings.api_host, settings.api_port, "control API (--api-listen, --api-port)")
    server = _QuietUvicorn(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name="api")

    async def stop() -> None:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()

    stack.push_async_callback(stop)
    while not server.started:
        if task.done():
            task.result()
            raise ConfigError("the control API stopped while starting")
        await asyncio.sleep(0.01)
    host, port = sock.getsockname()[:2]
    scheme = "https" if settings.api_tls else "http"
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}"
