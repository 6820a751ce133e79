"""``EndpointProxy``: the TLS and plain listeners and the choice of protocol per connection.

Each listener accepts on its own loop: a connection over the caps (``ConnectionLimits``: in
all, per source address) is closed as soon as it is accepted, before a TLS handshake or a read;
the others get their slot and start on ``h1.relay_h1.ClientRelay`` (HTTP/1.1 on callbacks, the fast
path). TLS connections whose ALPN chose ``h2``, plain ones that open with the HTTP/2 preface
(h2c with prior knowledge), and HTTP/1.1 requests that turn the connection into something else
(upgrades, ``/shell``, force-h2) are handed on with the bytes already read, and their slot:
HTTP/2 to ``h2.session.Http2Session`` (on callbacks again: it takes the transport back from the
streams it is given), everything else to the stream-based ``h1.session`` session. Both listeners
serve endpoint traffic and ``/shell``. At start the soft limit on open files is raised to the
hard one, and the total cap is kept under it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
import struct
import weakref
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from embervm.config import Settings
from embervm.proxy.admission import Admission, ConnectionLimits, Slot, TokenVerifier, VmRoutes
from embervm.proxy.h1.relay_h1 import ClientRelay
from embervm.proxy.h1.session import Http1Session
from embervm.proxy.h1.wire import Head
from embervm.proxy.h2.session import Http2Session, upgrade_h2c
from embervm.proxy.shell import ShellOpener
from embervm.proxy.streams import streams_over
from embervm.proxy.tls import ensure_tls, server_context
from embervm.proxy.upstream import DIRECT, Upstream

log = logging.getLogger("embervm.proxy")

TLS_HANDSHAKE_TIMEOUT = 15.0
BACKLOG = 1024
# Open files kept for everything but client connections (QMP, agents, disks, the database,
# nft and ip pipes, app connections of VMs being resumed...): each client connection may hold
# two (its own and one to an app), so the total cap is at most (soft limit - this) / 2.
FD_RESERVE = 1024
MIN_CONNECTIONS = 64
ACCEPT_RETRY_DELAY = 0.1  # after accept() failed (EMFILE...): let some connections end first
NR_OPEN = 1 << 20  # Linux's default ceiling on open files, for an unlimited hard limit


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit (the default soft limit, 1024, is
    a few hundred clients); the soft limit in force afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = NR_OPEN if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the open files limit from %d to %d: %s", soft, wanted,
                        exc)  # fmt: skip
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def connection_caps(settings: Settings, open_files: int) -> ConnectionLimits:
    """The settings' caps, the total one kept within what ``open_files`` allows."""
    room = max(MIN_CONNECTIONS, (open_files - FD_RESERVE) // 2)
    total = min(settings.proxy_max_connections, room)
    if total < settings.proxy_max_connections:
        log.info("open files limit %d: at most %d client connections", open_files, total)
    return ConnectionLimits(total, settings.proxy_max_connections_per_ip)


async def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on every address ``host`` names, as ``loop.create_server`` makes
    them (IPv6 ones IPv6 only)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from exc
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _turn_away(conn: socket.socket) -> None:
    """Close an accepted connection at once, with a reset (no TIME_WAIT kept for it)."""
    with contextlib.suppress(OSError):
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()


class EndpointProxy:
    def __init__(
        self,
        settings: Settings,
        *,
        lifecycle: VmRoutes,
        tokens: TokenVerifier,
        shells: ShellOpener,
        tls: tuple[Path, Path] | None = None,
        upstream: Upstream = DIRECT,
    ) -> None:
        self.settings = settings
        self.upstream = upstream  # how the apps are reached (a fleet's: ``TunnelUpstream``)
        idle = settings.proxy_session_idle_timeout
        self.admission = Admission(settings.domain, lifecycle, tokens, session_idle_timeout=idle)
        self.shells = shells
        self._tls = tls
        self.limits = ConnectionLimits(settings.proxy_max_connections,
                                       settings.proxy_max_connections_per_ip)  # fmt: skip
        self._listeners: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._opening: set[asyncio.Task[None]] = set()  # accepted, TLS handshake under way
        self._connections: set[asyncio.Task[None]] = set()  # handed to the stream sessions
        self._relays: weakref.WeakSet[ClientRelay] = weakref.WeakSet()
        self.tls_port = settings.proxy_port
        self.http_port = settings.proxy_http_port

    async def start(self) -> None:
        self.limits = connection_caps(self.settings, raise_open_files_limit())
        if self._tls is None:
            files = await asyncio.to_thread(ensure_tls, self.settings.tls_dir, self.settings.domain)
            cert, key = files.cert, files.key
        else:
            cert, key = self._tls
        context = server_context(cert, key)
        host = self.settings.listen_host
        loop = asyncio.get_running_loop()
        for port, tls in ((self.settings.proxy_port, context),
                          (self.settings.proxy_http_port, None)):  # fmt: skip
            sockets = await listening_sockets(host, port)
            self._listeners += sockets
            for sock in sockets:
                self._accepting.append(loop.create_task(self._accept(sock, tls)))
            if tls is None:
                self.http_port = sockets[0].getsockname()[1]
            else:
                self.tls_port = sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for task in self._accepting:
            task.cancel()
        await asyncio.gather(*self._accepting, return_exceptions=True)
        for sock in self._listeners:  # no accept waits on them any more
            sock.close()
        for relay in list(self._relays):
            relay.close()
        for task in [*self._opening, *self._connections]:
            task.cancel()
        await asyncio.gather(*self._opening, *self._connections, return_exceptions=True)
        self._accepting.clear()
        self._listeners.clear()

    async def _accept(self, listener: socket.socket, tls: ssl.SSLContext | None) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, peer = await loop.sock_accept(listener)
            except OSError as exc:  # out of file descriptors, buffers...
                log.warning("accepting a connection failed: %s", exc)
                await asyncio.sleep(ACCEPT_RETRY_DELAY)
                continue
            slot = self.limits.take(peer[0])
            if slot is None:
                _turn_away(conn)
                continue
            task = loop.create_task(self._open(conn, slot, tls))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)

    async def _open(self, conn: socket.socket, slot: Slot, tls: ssl.SSLContext | None) -> None:
        """Serve an accepted connection (after its TLS handshake, for the TLS listener)."""
        loop = asyncio.get_running_loop()
        relay = ClientRelay(self.admission, self._hand_off, tls=tls is not None, slot=slot,
                            upstream=self.upstream)  # fmt: skip
        self._relays.add(relay)
        try:
            if tls is None:
                await loop.connect_accepted_socket(lambda: relay, conn)
            else:
                handshake = TLS_HANDSHAKE_TIMEOUT
                await loop.connect_accepted_socket(
                    lambda: relay, conn, ssl=tls, ssl_handshake_timeout=handshake
                )
        except BaseException as exc:
            slot.release()  # the relay never saw the connection
            conn.close()
            if not isinstance(exc, Exception):
                raise
            log.debug("connection not opened: %r", exc)

    def _hand_off(
        self, transport: asyncio.Transport, data: bytes, http2: bool, eof: bool, slot: Slot
    ) -> None:
        reader, writer = streams_over(transport, data, eof)
        if http2:
            session = Http2Session(reader, writer, self.admission, self.upstream).run()
        else:
            session = self._http1(reader, writer)
        task = asyncio.get_running_loop().create_task(self._serve(session, slot))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    async def _serve(self, session: Coroutine[Any, Any, None], slot: Slot) -> None:
        """Run a handed-off session; its connection's slot is free when it ends (the sessions
        close their connection on the way out)."""
        try:
            with contextlib.suppress(asyncio.CancelledError):  # stop(): the task ends quietly
                await session
        finally:
            slot.release()

    async def _http1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def h2c(
            head: Head, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await upgrade_h2c(self.admission, head, reader, writer, self.upstream)

        try:
            await Http1Session(reader, writer, self.admission, self.shells, h2c=h2c,
                               dialer=self.upstream).run()  # fmt: skip
        except Exception:  # one broken connection must never take the listener down
            log.exception("HTTP/1.1 connection failed")
