"""HTTP/1.1 from a client to an app in a VM, on streams: the connections ``h1.relay_h1`` hands
over when a request turns the connection into something else.

One ``Http1Session`` per such connection: each request head is parsed strictly (``h1.wire``),
admitted, stripped of the proxy's own fields and written to the app over a connection kept for
the next request to the same VM and port. Bodies are copied as they are, both ways at once,
with backpressure (``drain``). A WebSocket (or other) upgrade the app accepts with 101 turns the
connection into a byte splice; ``/shell`` upgrades go to ``shell``; ``Upgrade: h2c`` on the
plain listener hands the connection to the HTTP/2 session; ``X-aws-proxy-force-h2: true``
sends the request to the app as h2c (``h1.relay_h2``). Plain requests that follow on the same
connection are served here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

from embervm.proxy.admission import FORCE_H2_HEADER, Admission, Refusal, Target, strip_headers
from embervm.proxy.h1 import relay_h2
from embervm.proxy.h1.wire import (
    NONE,
    TO_CLOSE,
    BadMessage,
    Head,
    copy_body,
    forwarded_fields,
    host_only_cookies,
    parse_request,
    parse_response,
    read_head,
    request_framing,
    response_framing,
    serialize,
    status_line,
)
from embervm.proxy.h2c_upstream import H2Upstream
from embervm.proxy.limits import (
    BODY_IDLE_TIMEOUT,
    FIRST_REQUEST_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    READ_SIZE,
)
from embervm.proxy.shell import ShellOpener, serve_shell_h1
from embervm.proxy.streams import SessionLease, close_quietly, splice
from embervm.proxy.upstream import DIRECT, reach
from embervm.proxy.upstream import Upstream as Dialer

log = logging.getLogger("embervm.proxy.http1")

RESPONSE_HEAD_TIMEOUT = 300.0
SMALL_BODY = 16 * 1024

H2cHandoff = Callable[[Head, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass(slots=True)
class Upstream:
    """One keep-alive connection to an app port."""

    target: Target
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


class Http1Session:
    """The client's side of one connection, and the requests it carries."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        admission: Admission,
        shells: ShellOpener,
        *,
        h2c: H2cHandoff | None = None,
        dialer: Dialer = DIRECT,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.admission = admission
        self.dialer = dialer  # how app connections are opened (``proxy.upstream``)
        self.shells = shells
        self.h2c = h2c
        self.upstream: Upstream | None = None
        self.h2_upstream: H2Upstream | None = None
        self.answered = False  # a response head went to the client for the current request

    async def refuse(self, status: int, message: str) -> None:
        body = (message + "\n").encode()
        fields = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body)),
                  (b"connection", b"close")]  # fmt: skip
        self.writer.write(serialize(status_line(status), fields) + body)
        with contextlib.suppress(ConnectionError):
            await self.writer.drain()

    async def run(self) -> None:
        try:
            timeout = FIRST_REQUEST_TIMEOUT
            while True:
                try:
                    async with asyncio.timeout(timeout):
                        raw = await read_head(self.reader)
                    if raw is None:
                        return
                    head = parse_request(raw)
                    framing = request_framing(head)
                except BadMessage as bad:
                    await self.refuse(bad.status, "Bad request")
                    return
                except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                    return
                except asyncio.LimitOverrunError:
                    await self.refuse(431, "Bad request")
                    return
                if not await self._handle(head, framing):
                    return
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

    async def _drop_h2(self) -> None:
        if self.h2_upstream is not None:
            self.admission.closed(self.h2_upstream.target.microvm_id)
            await self.h2_upstream.close()
            self.h2_upstream = None

    # -- one request ---------------------------------------------------------------------

    async def _handle(self, head: Head, framing: int) -> bool:
        """Serve one request; False when the connection must end afterwards."""
        self.answered = False
        fields = dict(head.fields)
        # an upgrade names itself in Connection, and only HTTP/1.1 has them (RFC 9110 §7.8)
        upgrading = head.version == b"1.1" and b"upgrade" in head.tokens(b"connection")
        upgrade = head.tokens(b"upgrade") if upgrading else set()
        websocket = b"websocket" in upgrade
        if b"h2c" in upgrade and self.h2c is not None and _h2c_upgradable(fields, framing):
            await self.h2c(head, self.reader, self.writer)
            return False
        try:
            ask = self.admission.ask(fields.get(b"host"), fields, head.target,
                                     websocket=websocket)  # fmt: skip
            target, lease = await self.admission.admit_session(ask)
        except Refusal as refusal:
            await self.refuse(refusal.status, refusal.message)
            return False
        if ask.kind == "shell":
            await serve_shell_h1(self, fields, target, self.shells, lease)
            return False
        keep = head.version == b"1.1" and b"close" not in head.tokens(b"connection")
        if not websocket and fields.get(FORCE_H2_HEADER, b"").lower() == b"true":
            return await self._forced_h2(head, framing, target) and keep
        try:
            upstream = await self._upstream_for(target)
        except Refusal as refusal:
            await self.refuse(refusal.status, refusal.message)
            return False
        except (OSError, TimeoutError):
            await self.refuse(502, f"The app is not answering on port {target.port}")
            return False
        forwarded = forwarded_fields(head, upgrade=bool(upgrade))
        upstream.writer.write(serialize(head.start, strip_headers(forwarded)))
        return await self._exchange(upstream, head, framing, lease if upgrade else None) and keep

    async def _upstream_for(self, target: Target) -> Upstream:
        current = self.upstream
        if current is not None and current.target == target and not current.reader.at_eof():
            return current
        await self._drop_upstream()
        self.admission.reserve(target)  # Refusal (429) goes to the caller
        try:  # the target may change: the VM's host said it is elsewhere (a fleet)
            target, (reader, writer) = await reach(self.admission, target, self.dialer.connect)
        except BaseException:
            self.admission.closed(target.microvm_id)
            raise
        self.upstream = Upstream(target, reader, writer)
        return self.upstream

    async def _open_h2(self, target: Target) -> H2Upstream:
        return await H2Upstream.open(target, self.dialer)

    async def _exchange(
        self, upstream: Upstream, head: Head, framing: int, upgrade: SessionLease | None
    ) -> bool:
        """One request and its answer; ``upgrade``: the request asks for one, and an app that
        accepts it turns the connection into a splice held by this lease."""
        keep = False
        body: asyncio.Task[None] | None = None
        try:
            if framing == NONE:  # most requests: no second task
                keep = await self._response(upstream, head, upgrade)
            else:
                body = asyncio.create_task(copy_body(self.reader, upstream.writer, framing,
                                                     READ_SIZE, BODY_IDLE_TIMEOUT))  # fmt: skip
                keep = await self._response_while(body, upstream, head, upgrade)
        except BadMessage:
            if not self.answered:
                await self.refuse(502, "The app sent a malformed answer")
        except (TimeoutError, ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
            log.debug("upstream exchange failed: %r", exc)
            if not self.answered:
                await self.refuse(502, "The app closed the connection")
        finally:
            if body is not None:
                body.cancel()
                with contextlib.suppress(BaseException):
                    await body
        if not keep:
            await self._drop_upstream()
        return keep

    async def _response_while(
        self, body: asyncio.Task[None], upstream: Upstream, head: Head, upgrade: SessionLease | None
    ) -> bool:
        """The answer, relayed while the request body still flows; a client that stops short
        ends the exchange (the app would wait for the rest forever)."""
        response = asyncio.create_task(self._response(upstream, head, upgrade))
        try:
            await asyncio.wait({body, response}, return_when=asyncio.FIRST_COMPLETED)
            if body.done() and body.exception() is not None:
                raise ConnectionError("the client's body ended early") from body.exception()
            keep = await response
            return keep and body.done()  # an answer before the body's end leaves it unread
        finally:
            if not response.done():
                response.cancel()
                with contextlib.suppress(BaseException):
                    await response

    async def _response(
        self, upstream: Upstream, request: Head, upgrade: SessionLease | None
    ) -> bool:
        """Relay the app's answer; True when both connections may carry another request."""
        while True:
            async with asyncio.timeout(RESPONSE_HEAD_TIMEOUT):
                raw = await read_head(upstream.reader)
            if raw is None:
                raise ConnectionError("the app closed the connection before answering")
            head = parse_response(raw)
            if head.status == 101 and upgrade is not None:
                self.answered = True
                self.writer.write(host_only_cookies(raw))
                vm_id = upstream.target.microvm_id
                activity = partial(self.admission.routes.record_activity, vm_id)
                app = (upstream.reader, upstream.writer)
                ended = await splice((self.reader, self.writer), app, activity, upgrade)
                if ended is not None:
                    log.info("upgraded connection to %s closed: %s", vm_id, ended)
                return False
            if head.status >= 200:
                break
            self.writer.write(raw)
        self.answered = True
        raw = host_only_cookies(raw)
        framing = response_framing(head, request.method)
        if 0 < framing <= SMALL_BODY:  # head and body in one write: one syscall, one packet
            async with asyncio.timeout(BODY_IDLE_TIMEOUT):
                raw += await upstream.reader.readexactly(framing)
            framing = NONE
        self.writer.write(raw)
        if framing == NONE:
            await self.writer.drain()
        else:
            await copy_body(upstream.reader, self.writer, framing, READ_SIZE, BODY_IDLE_TIMEOUT)
        return (
            framing != TO_CLOSE
            and head.version == b"1.1"
            and (b"close" not in head.tokens(b"connection"))
        )

    async def _forced_h2(self, head: Head, framing: int, target: Target) -> bool:
        """``X-aws-proxy-force-h2: true``: this request goes to the app as h2c."""
        app = self.h2_upstream
        if app is None or not app.usable(target):
            await self._drop_h2()
            try:
                self.admission.reserve(target)
            except Refusal as refusal:
                await self.refuse(refusal.status, refusal.message)
                return False
            try:
                _, opened = await reach(self.admission, target, self._open_h2)
            except BaseException as exc:
                self.admission.closed(target.microvm_id)
                if isinstance(exc, Refusal):
                    await self.refuse(exc.status, exc.message)
                    return False
                if not isinstance(exc, OSError | TimeoutError):
                    raise
                await self.refuse(502, f"The app is not answering on port {target.port}")
                return False
            self.h2_upstream = app = opened
        try:
            return await relay_h2.relay(self, app, head, framing)
        except (TimeoutError, ConnectionError, BadMessage, asyncio.IncompleteReadError) as exc:
            log.debug("h2c exchange failed: %r", exc)
            if not self.answered:
                await self.refuse(502, "The app closed the connection")
            await self._drop_h2()
            return False


def _h2c_upgradable(fields: dict[bytes, bytes], framing: int) -> bool:
    """An ``Upgrade: h2c`` we take: it has settings and no body (one with a body is served as
    HTTP/1.1, which RFC 9113 allows; its body would otherwise have to be read first)."""
    return b"http2-settings" in fields and framing == NONE
