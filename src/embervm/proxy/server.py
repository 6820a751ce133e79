"""``EndpointProxy``: the TLS and plain listeners and the choice of protocol per connection.

TLS connections speak what ALPN chose (``h2`` or HTTP/1.1). Plain connections speak HTTP/2
when they open with the HTTP/2 preface (h2c with prior knowledge), else HTTP/1.1 (which may
ask to upgrade to h2c). Both listeners serve endpoint traffic and ``/shell``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from pathlib import Path

from embervm.config import Settings
from embervm.proxy.admission import Admission, TokenVerifier, VmRoutes
from embervm.proxy.h1wire import Head
from embervm.proxy.http1 import Http1Session
from embervm.proxy.http2 import H2_PREFACE, Http2Session, upgrade_h2c
from embervm.proxy.shell import ShellOpener
from embervm.proxy.streams import close_quietly
from embervm.proxy.tls import ensure_tls, server_context

log = logging.getLogger("embervm.proxy")

PREFACE_TIMEOUT = 30.0
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
        self.admission = Admission(settings.domain, lifecycle, tokens)
        self.shells = shells
        self._tls = tls
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
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
        tls_server = await asyncio.start_server(
            self._on_tls, host, self.settings.proxy_port, ssl=context, backlog=BACKLOG,
            ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT,
        )  # fmt: skip
        self._servers.append(tls_server)
        plain = await asyncio.start_server(
            self._on_plain, host, self.settings.proxy_http_port, backlog=BACKLOG
        )
        self._servers.append(plain)
        self.tls_port = tls_server.sockets[0].getsockname()[1]
        self.http_port = plain.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()

    def _track(self) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _on_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # stop(): the task ends quietly
            await self._serve_tls(reader, writer)

    async def _on_plain(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._serve_plain(reader, writer)

    async def _serve_tls(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._track()
        tls = writer.get_extra_info("ssl_object")
        if isinstance(tls, ssl.SSLObject) and tls.selected_alpn_protocol() == "h2":
            await Http2Session(reader, writer, self.admission).run()
        else:
            await self._http1(reader, writer, b"")

    async def _serve_plain(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """The first line tells them apart: HTTP/2's preface starts ``PRI * HTTP/2.0``."""
        self._track()
        try:
            async with asyncio.timeout(PREFACE_TIMEOUT):
                line = await reader.readuntil(b"\r\n")
        except (
            TimeoutError,
            ConnectionError,
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
        ):
            await close_quietly(writer)
            return
        if line == H2_PREFACE[:16]:
            await Http2Session(reader, writer, self.admission, initial=line).run()
        else:
            await self._http1(reader, writer, line)

    async def _http1(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, first_line: bytes
    ) -> None:
        async def h2c(
            head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await upgrade_h2c(self.admission, head, reader, writer)

        session = Http1Session(
            reader, writer, self.admission, self.shells, h2c=h2c, first_line=first_line
        )
        try:
            await session.run()
        except Exception:  # one broken connection must never take the listener down
            log.exception("HTTP/1.1 connection failed")
