"""``EndpointProxy``: the TLS and plain listeners and the choice of protocol per connection.

Every connection starts on ``h1relay.ClientRelay`` (HTTP/1.1 on callbacks, the fast path).
TLS connections whose ALPN chose ``h2``, plain ones that open with the HTTP/2 preface (h2c
with prior knowledge), and HTTP/1.1 requests that turn the connection into something else
(upgrades, ``/shell``, force-h2) are handed on with the bytes already read: HTTP/2 to
``http2.Http2Session`` (on callbacks again: it takes the transport back from the streams it is
given), everything else to the stream-based ``http1`` session. Both listeners serve endpoint
traffic and ``/shell``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from embervm.config import Settings
from embervm.proxy.admission import Admission, TokenVerifier, VmRoutes
from embervm.proxy.h1relay import ClientRelay
from embervm.proxy.h1wire import Head
from embervm.proxy.http1 import Http1Session
from embervm.proxy.http2 import Http2Session, upgrade_h2c
from embervm.proxy.shell import ShellOpener
from embervm.proxy.streams import streams_over
from embervm.proxy.tls import ensure_tls, server_context

log = logging.getLogger("embervm.proxy")

TLS_HANDSHAKE_TIMEOUT = 15.0
BACKLOG = 1024


class EndpointProxy:
    def __init__(
        self,
        settings: Settings,
        *,
        lifecycle: VmRoutes,
        tokens: TokenVerifier,
        shells: ShellOpener,
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        self.settings = settings
        idle = settings.proxy_session_idle_timeout
        self.admission = Admission(settings.domain, lifecycle, tokens, session_idle_timeout=idle)
        self.shells = shells
        self._tls = tls
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()  # handed to the stream sessions
        self._relays: weakref.WeakSet[ClientRelay] = weakref.WeakSet()
        self.tls_port = settings.proxy_port
        self.http_port = settings.proxy_http_port

    async def start(self) -> None:
        if self._tls is None:
            files = await asyncio.to_thread(ensure_tls, self.settings.tls_dir, self.settings.domain)
            cert, key = files.cert, files.key
        else:
            cert, key = self._tls
        context = server_context(cert, key)
        host = self.settings.listen_host
        loop = asyncio.get_running_loop()
        tls_server = await loop.create_server(
            lambda: self._relay(tls=True), host, self.settings.proxy_port, ssl=context,
            backlog=BACKLOG, ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )  # fmt: skip
        self._servers.append(tls_server)
        plain = await loop.create_server(
            lambda: self._relay(tls=False), host, self.settings.proxy_http_port, backlog=BACKLOG
        )
        self._servers.append(plain)
        self.tls_port = tls_server.sockets[0].getsockname()[1]
        self.http_port = plain.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for relay in list(self._relays):
            relay.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    def _relay(self, *, tls: bool) -> ClientRelay:
        relay = ClientRelay(self.admission, self._hand_off, tls=tls)
        self._relays.add(relay)
        return relay

    def _hand_off(self, transport: asyncio.Transport, data: bytes, http2: bool, eof: bool) -> None:
        reader, writer = streams_over(transport, data, eof)
        if http2:
            session = Http2Session(reader, writer, self.admission).run()
        else:
            session = self._http1(reader, writer)
        task = asyncio.get_running_loop().create_task(self._serve(session))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, session: Coroutine[Any, Any, None]) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # stop(): the task ends quietly
            await session

    async def _http1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def h2c(
            head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await upgrade_h2c(self.admission, head, reader, writer)

        try:
            await Http1Session(reader, writer, self.admission, self.shells, h2c=h2c).run()
        except Exception:  # one broken connection must never take the listener down
            log.exception("HTTP/1.1 connection failed")
