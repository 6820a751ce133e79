"""HTTP/1.1 from a client to an app in a VM, through h11 on both sides.

One ``Http1Session`` per client connection: requests are parsed with h11 (heads bounded by
``MAX_HEAD``), admitted, stripped of the proxy's own headers and sent to the app over an h11
client connection that is kept for the next request to the same VM and port. Bodies stream
both ways at once with backpressure; nothing is buffered whole. A WebSocket upgrade the app
accepts (101) turns the connection into a byte splice; ``/shell`` upgrades go to ``shell``;
``Upgrade: h2c`` on the plain listener hands the connection to the HTTP/2 session;
``X-aws-proxy-force-h2: true`` sends the request to the app as h2c (``forced_h2``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import h11

from embervm.proxy import forced_h2
from embervm.proxy.admission import (
    FORCE_H2_HEADER,
    Admission,
    Refusal,
    Target,
    strip_headers,
)
from embervm.proxy.shell import ShellOpener, serve_shell_h1
from embervm.proxy.streams import READ_SIZE, close_quietly, open_upstream, splice

log = logging.getLogger("embervm.proxy.http1")

MAX_HEAD = 64 * 1024
FIRST_REQUEST_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 120.0
RESPONSE_HEAD_TIMEOUT = 300.0

H2cHandoff = Callable[
    [h11.Request, bytes, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]


class H11Peer:
    """One side of an HTTP/1.1 connection, framed by h11: events are queued as bytes and
    written by ``flush`` (one write per burst, not one per event)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        role: type[h11.CLIENT] | type[h11.SERVER],
        initial: bytes = b"",
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(role, max_incomplete_event_size=MAX_HEAD)
        if initial:
            self.conn.receive_data(initial)
        self._out: list[bytes] = []

    def send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            self._out.append(data)

    def queued(self) -> int:
        return sum(len(chunk) for chunk in self._out)

    async def flush(self) -> None:
        if self._out:
            self.writer.write(b"".join(self._out))
            self._out.clear()
        await self.writer.drain()

    async def next_event(
        self,
        timeout: float,  # noqa: ASYNC109 - per phase (head, body), not per call
        before_wait: Callable[[], Awaitable[None]] | None = None,
    ) -> Any:
        """The next event from the peer; ``before_wait`` runs before blocking on the socket."""
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            if before_wait is not None:
                await before_wait()
            async with asyncio.timeout(timeout):
                data = await self.reader.read(READ_SIZE)
            self.conn.receive_data(data)


class H1Upstream(H11Peer):
    """One keep-alive HTTP/1.1 connection to an app port."""

    def __init__(
        self, target: Target, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        super().__init__(reader, writer, h11.CLIENT)
        self.target = target

    def reusable(self) -> bool:
        """Both sides finished the last exchange and the app has not hung up since."""
        done = self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE
        return done and not self.reader.at_eof()


class Http1Session(H11Peer):
    """The client's side of one connection, and the requests it carries."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        admission: Admission,
        shells: ShellOpener,
        *,
        h2c: H2cHandoff | None = None,
        initial: bytes = b"",
    ) -> None:
        super().__init__(reader, writer, h11.SERVER, initial)
        self.admission = admission
        self.shells = shells
        self.h2c = h2c
        self.upstream: H1Upstream | None = None
        self.h2_upstream: forced_h2.H2Upstream | None = None

    async def refuse(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]  # fmt: skip
        with contextlib.suppress(h11.LocalProtocolError):
            self.send(h11.Response(status_code=status, headers=headers))
            self.send(h11.Data(data=body))
            self.send(h11.EndOfMessage())
        with contextlib.suppress(ConnectionError):
            await self.flush()

    async def run(self) -> None:
        try:
            timeout = FIRST_REQUEST_TIMEOUT
            while True:
                try:
                    event = await self.next_event(timeout)
                except (TimeoutError, ConnectionError):
                    return
                except h11.RemoteProtocolError as exc:
                    await self.refuse(exc.error_status_hint, "Bad request")
                    return
                if not isinstance(event, h11.Request):
                    return
                if not await self._handle(event):
                    return
                if self.conn.our_state is not h11.DONE or self.conn.their_state is not h11.DONE:
                    return
                self.conn.start_next_cycle()
                timeout = KEEPALIVE_TIMEOUT
        finally:  # everything is closed before the first await (stop() may cancel again)
            self.writer.close()
            for writer in self._upstream_writers():
                writer.close()
            await self._drop_upstream()
            await self._drop_h2()
            await close_quietly(self.writer)

    def _upstream_writers(self) -> list[asyncio.StreamWriter]:
        h1 = [self.upstream.writer] if self.upstream is not None else []
        return h1 + ([self.h2_upstream.peer.writer] if self.h2_upstream is not None else [])

    async def _drop_upstream(self) -> None:
        if self.upstream is not None:
            self.admission.closed(self.upstream.target.microvm_id)
            await close_quietly(self.upstream.writer)
            self.upstream = None

    # -- one request ---------------------------------------------------------------------

    async def _handle(self, request: h11.Request) -> bool:
        """Serve one request; False when the connection must end afterwards."""
        headers = dict(request.headers)
        upgrade = headers.get(b"upgrade", b"").lower()
        websocket = upgrade == b"websocket"
        if upgrade == b"h2c" and self.h2c is not None and _h2c_upgradable(headers):
            await self.h2c(request, self.conn.trailing_data[0], self.reader, self.writer)
            return False
        try:
            ask = self.admission.ask(headers.get(b"host"), headers, request.target,
                                     websocket=websocket)  # fmt: skip
            target = await self.admission.admit(ask)
        except Refusal as refusal:
            await self.refuse(refusal.status, refusal.message)
            return False
        if ask.kind == "shell":
            await serve_shell_h1(self, request, target, self.shells)
            return False
        if not websocket and headers.get(FORCE_H2_HEADER, b"").lower() == b"true":
            return await self._forced_h2(request, target)
        try:
            upstream = await self._upstream_for(target)
        except (OSError, TimeoutError):
            await self.refuse(502, f"The app is not answering on port {target.port}")
            return False
        upstream.send(h11.Request(method=request.method, target=request.target,
                                  headers=strip_headers(request.headers)))  # fmt: skip
        return await self._exchange(upstream, websocket)

    async def _forced_h2(self, request: h11.Request, target: Target) -> bool:
        """``X-aws-proxy-force-h2: true``: this request goes to the app as h2c."""
        app = self.h2_upstream
        if app is None or not app.usable(target):
            await self._drop_h2()
            try:
                app = await forced_h2.H2Upstream.open(target)
            except (OSError, TimeoutError):
                await self.refuse(502, f"The app is not answering on port {target.port}")
                return False
            self.h2_upstream = app
            self.admission.opened(target.microvm_id)
        try:
            return await forced_h2.relay(self, app, request)
        except (TimeoutError, ConnectionError, h11.ProtocolError) as exc:
            log.debug("h2c exchange failed: %r", exc)
            if self.conn.our_state is h11.SEND_RESPONSE:
                await self.refuse(502, "The app closed the connection")
            await self._drop_h2()
            return False

    async def _drop_h2(self) -> None:
        if self.h2_upstream is not None:
            self.admission.closed(self.h2_upstream.target.microvm_id)
            await self.h2_upstream.close()
            self.h2_upstream = None

    async def _upstream_for(self, target: Target) -> H1Upstream:
        current = self.upstream
        if current is not None and current.target == target and current.reusable():
            current.conn.start_next_cycle()
            return current
        await self._drop_upstream()
        reader, writer = await open_upstream(target.address, target.port)
        self.upstream = H1Upstream(target, reader, writer)
        self.admission.opened(target.microvm_id)
        return self.upstream

    async def _exchange(self, upstream: H1Upstream, websocket: bool) -> bool:
        first = self.conn.next_event()
        body: asyncio.Task[None] | None = None
        if isinstance(first, h11.EndOfMessage):  # no body (most requests): no second task
            upstream.send(first)
            await upstream.flush()
        else:
            body = asyncio.create_task(self._request_body(upstream, first))
        try:
            keep = await self._response(upstream, websocket)
        except (TimeoutError, ConnectionError, h11.ProtocolError) as exc:
            log.debug("upstream exchange failed: %r", exc)
            if self.conn.our_state is h11.SEND_RESPONSE:
                await self.refuse(502, "The app closed the connection")
            keep = False
        finally:
            if body is not None:
                if not body.done():
                    body.cancel()
                with contextlib.suppress(BaseException):
                    await body
        if not keep or not upstream.reusable():
            await self._drop_upstream()
        return keep

    async def _request_body(self, upstream: H1Upstream, event: Any) -> None:
        while True:
            if event is h11.NEED_DATA:
                await upstream.flush()
                event = await self.next_event(KEEPALIVE_TIMEOUT)
            if isinstance(event, h11.Data):
                upstream.send(event)
            elif isinstance(event, h11.EndOfMessage):
                upstream.send(event)
                await upstream.flush()
                return
            else:
                await upstream.flush()
                return
            event = self.conn.next_event()

    async def _response(self, upstream: H1Upstream, websocket: bool) -> bool:
        """Relay the app's answer; client bytes are written whenever the app makes us wait
        (so a streamed body flows at once, and a small answer goes out in one write)."""
        while True:
            event = await upstream.next_event(RESPONSE_HEAD_TIMEOUT, self.flush)
            if isinstance(event, h11.InformationalResponse):
                if event.status_code == 101 and websocket:
                    return await self._switch(upstream, event)
                self.send(_as_http11(event))
                continue
            if isinstance(event, h11.Response):
                self.send(_as_http11(event))
                break
            raise ConnectionError("the app closed the connection before answering")
        while True:
            event = await upstream.next_event(KEEPALIVE_TIMEOUT, self.flush)
            if isinstance(event, h11.Data):
                self.send(event)
                if self.queued() >= READ_SIZE:
                    await self.flush()
            elif isinstance(event, h11.EndOfMessage):
                self.send(event)
                await self.flush()
                return True
            else:
                raise ConnectionError("the app closed the connection mid-response")

    async def _switch(self, upstream: H1Upstream, response: h11.InformationalResponse) -> bool:
        """The app accepted a WebSocket: relay its 101, then bytes both ways."""
        self.send(_as_http11(response))
        await self.flush()
        client_rest = self.conn.trailing_data[0]
        app_rest = upstream.conn.trailing_data[0]
        if client_rest:
            upstream.writer.write(client_rest)
        if app_rest:
            self.writer.write(app_rest)
        vm_id = upstream.target.microvm_id
        await splice(
            (self.reader, self.writer),
            (upstream.reader, upstream.writer),
            lambda: self.admission.routes.record_activity(vm_id),
        )
        return False


def _h2c_upgradable(headers: dict[bytes, bytes]) -> bool:
    """An ``Upgrade: h2c`` we take: it has settings and no body (one with a body is served as
    HTTP/1.1, which RFC 7540 allows; its body would otherwise have to be read first)."""
    bodiless = headers.get(b"content-length", b"0") == b"0" and b"transfer-encoding" not in headers
    return b"http2-settings" in headers and bodiless


def _as_http11(event: h11.Response | h11.InformationalResponse) -> Any:
    """The same answer as HTTP/1.1 (h11 speaks only 1.1; an HTTP/1.0 app's response is
    framed by h11 on the way in, so nothing is lost)."""
    return type(event)(status_code=event.status_code, headers=event.headers, reason=event.reason)
