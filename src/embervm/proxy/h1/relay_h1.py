"""HTTP/1.1 from a client to an app, on protocol callbacks: the proxy's hot path.

``ClientRelay`` is the protocol of a client connection; ``AppLink`` the protocol of the
connection it keeps to the app's port. Each request head is parsed strictly (``h1.wire``),
admitted (token on every request, VM, port, ingress), stripped of the proxy's own fields and
written to the app in one write with whatever body bytes came with it; the rest of the body
and the answer are forwarded as they arrive, ``h1.body`` following the framing only to find
where each message ends. Backpressure: a side whose peer's write buffer is full stops being
read until it drains. Pipelined requests wait in a bounded buffer for their turn.

No coroutine or stream per request: the streams relay (``h1.session``) cost ~70 µs of CPU per
request, mostly in the machinery around the bytes. The rare cases, where the relay would have
to become something else, are handed to the stream-based sessions with the bytes already read:
upgrades (WebSocket, ``/shell``, h2c), ``X-aws-proxy-force-h2``, HTTP/2 (prior knowledge on the
plain listener, ALPN ``h2`` on TLS).

Timeouts (one timer per connection, moved forward lazily): 30 s for the first request's head,
120 s between requests, 300 s without a byte either way during an exchange, 10 s to connect.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import cast

from embervm.proxy.admission import (
    AUTH_HEADER,
    FORCE_H2_HEADER,
    PORT_HEADER,
    Admission,
    Ask,
    Refusal,
    Slot,
    Target,
    strip_headers,
)
from embervm.proxy.h1.body import NO_BODY, BodyEnd
from embervm.proxy.h1.wire import (
    HEAD_END,
    NONE,
    BadMessage,
    Head,
    forwarded_fields,
    host_only_cookies,
    parse_request,
    request_framing,
    response_summary,
    serialize,
    status_line,
)
from embervm.proxy.limits import (
    BODY_IDLE_TIMEOUT,
    FIRST_REQUEST_TIMEOUT,
    KEEPALIVE_TIMEOUT,
    MAX_HEAD,
)
from embervm.proxy.upstream import DIRECT, Upstream, reach

log = logging.getLogger("embervm.proxy.h1relay")

MAX_PENDING = 64 * 1024  # client bytes held while an exchange runs (pipelining) before pausing
EXCHANGE_IDLE_TIMEOUT = BODY_IDLE_TIMEOUT
H2_PREFACE_LINE = b"PRI * HTTP/2.0\r\n"

# what a connection does next
_NEW, _HEAD, _ADMIT, _EXCHANGE, _GONE = range(5)

HandOff = Callable[[asyncio.Transport, bytes, bool, bool, Slot], None]
"""``(transport, bytes read and unused, http2, eof seen, the connection's slot)``: serve the
rest of the connection with the stream-based sessions (which release the slot at its end)."""


class AppLink(asyncio.Protocol):
    """A kept connection to one app port; everything it sees goes to its relay."""

    transport: asyncio.Transport  # from connection_made, before anyone holds the link

    def __init__(self, relay: ClientRelay, target: Target) -> None:
        self.relay = relay
        self.target = target
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        self.relay.app_data(self, data)

    def eof_received(self) -> bool:
        return False  # close; connection_lost tells the relay

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.relay.app_lost(self)

    def pause_writing(self) -> None:
        self.relay.app_writable(self, False)

    def resume_writing(self) -> None:
        self.relay.app_writable(self, True)

    def close(self) -> None:
        self.closed = True
        self.transport.close()


class ClientRelay(asyncio.Protocol):
    """One client connection speaking HTTP/1.1, and the requests it carries."""

    transport: asyncio.Transport  # from connection_made, before any other callback

    def __init__(
        self,
        admission: Admission,
        hand_off: HandOff,
        *,
        tls: bool,
        slot: Slot,
        upstream: Upstream = DIRECT,
    ) -> None:
        self.admission = admission
        self.upstream = upstream  # how app connections are opened (``upstream``)
        self.hand_off = hand_off
        self.tls = tls
        self.slot = slot  # this connection's place under the connection caps
        self.sniff_h2 = not tls  # plain listener: the first bytes may be HTTP/2's preface
        self.loop = asyncio.get_running_loop()
        self.state = _NEW  # a TLS handshake may still be under way
        self.buf = b""  # client bytes not yet forwarded (a head, or pipelined requests)
        self.scanned = 0  # where to look for the head's end in ``buf`` next time
        self.eof = False
        self.reading = True
        self.app: AppLink | None = None
        self.app_full = False  # the app's write buffer is full: stop reading the client
        self.task: asyncio.Task[None] | None = None
        self.deadline = self.loop.time() + FIRST_REQUEST_TIMEOUT
        self.timer: asyncio.TimerHandle | None = None
        # the exchange under way
        self.method = b""
        self.keep = False  # both sides allow another request on these connections
        self.request_body = NO_BODY
        self.response_body: BodyEnd | None = None  # None until the answer's head has come
        self.response_head = b""
        self.answered = False  # a final response head went to the client
        self.app_reusable = True  # the app sent nothing beyond its answer
        self.ask: Ask | None = None
        self.ask_key: tuple[bytes | None, ...] = ()

    # -- the client's connection ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.state = _HEAD
        tls = transport.get_extra_info("ssl_object")
        if tls is not None and tls.selected_alpn_protocol() == "h2":
            self._hand_off(b"", http2=True)
            return
        self.timer = self.loop.call_at(self.deadline, self._on_timer)

    def data_received(self, data: bytes) -> None:
        if self.state == _EXCHANGE and not self.request_body.done:
            self._forward_body(data)
            return
        self.buf += data
        if self.state == _HEAD:
            self._next_request()
        elif len(self.buf) > MAX_PENDING:
            self._update_reading()

    def eof_received(self) -> bool:
        self.eof = True
        if self.state == _HEAD:
            if self.buf.strip():
                self.refuse(400, "Bad request")  # a head cut short
            else:
                self._close()
        elif self.state == _EXCHANGE and not self.request_body.done:
            self._abort()  # stopped mid-body: the app would wait for the rest forever
        return not self.tls  # an answer under way still goes out (TLS cannot half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = _GONE
        self.slot.release()
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None:
            self.task.cancel()
        self._drop_app()

    def pause_writing(self) -> None:
        if self.app is not None:
            self.app.transport.pause_reading()

    def resume_writing(self) -> None:
        self.deadline = self.loop.time() + EXCHANGE_IDLE_TIMEOUT
        if self.app is not None:
            self.app.transport.resume_reading()

    def close(self) -> None:
        """Stop: the listener is going away."""
        if self.state not in (_NEW, _GONE):
            self._abort()

    # -- requests ------------------------------------------------------------------------

    def _next_request(self) -> None:
        buf = self.buf
        if self.sniff_h2 and len(buf) < len(H2_PREFACE_LINE) and H2_PREFACE_LINE.startswith(buf):
            return  # not enough to tell yet
        if self.sniff_h2:
            self.sniff_h2 = False
            if buf.startswith(H2_PREFACE_LINE):
                self._hand_off(buf, http2=True)
                return
        end = buf.find(HEAD_END, self.scanned)
        if end < 0:
            if len(buf) > MAX_HEAD:
                self.refuse(431, "Bad request")
            else:
                self.scanned = max(0, len(buf) - 3)
            return
        end += len(HEAD_END)
        if end > MAX_HEAD:
            self.refuse(431, "Bad request")
            return
        raw, self.buf, self.scanned = buf[:end], buf[end:], 0
        try:
            head = parse_request(raw)
            framing = request_framing(head)
        except BadMessage as bad:
            self.refuse(bad.status, "Bad request")
            return
        fields = dict(head.fields)
        if b"upgrade" in fields or fields.get(FORCE_H2_HEADER, b"").lower() == b"true":
            self._hand_off(raw + self.buf, http2=False)
            return
        try:
            ask = self._ask(fields, head.target)
        except Refusal as refusal:
            self.refuse(refusal.status, refusal.message)
            return
        self.state = _ADMIT
        try:
            target = self.admission.admit_now(ask)
        except Refusal as refusal:
            self.refuse(refusal.status, refusal.message)
            return
        app = self.app
        if target is not None and app is not None and not app.closed and app.target == target:
            self._send(app, head, framing)  # the common case: no task, no await
            return
        self.deadline = math.inf  # a resume has its own time limit in core
        self.task = self.loop.create_task(self._admit(ask, head, framing, target))

    def _ask(self, fields: dict[bytes, bytes], target: bytes) -> Ask:
        """What the request asks for; the same fields as the last request's ask the same
        (no upgrade here, so the path does not matter). The token is checked in ``admit``."""
        key = (fields.get(b"host"), fields.get(AUTH_HEADER), fields.get(PORT_HEADER))
        if key != self.ask_key or self.ask is None:
            self.ask = self.admission.ask(key[0], fields, target, websocket=False)
            self.ask_key = key
        return self.ask

    async def _admit(self, ask: Ask, head: Head, framing: int, target: Target | None) -> None:
        """Admit (unless ``admit_now`` already did), connect if needed, send the head."""
        try:
            if target is None:
                target = await self.admission.admit(ask)
            app = self.app
            if app is None or app.closed or app.target != target:
                app = await self._connect(target)
            if app is not None and self.state == _ADMIT:
                self._send(app, head, framing)
        except Refusal as refusal:
            self.refuse(refusal.status, refusal.message)
        except Exception:  # one broken connection must never take the listener down
            log.exception("HTTP/1.1 request failed")
            self._abort()
        finally:
            self.task = None

    async def _connect(self, target: Target) -> AppLink | None:
        """A new kept connection to the target (None: refused with 502, or the client left)."""
        self._drop_app()
        self.admission.reserve(target)  # Refusal (429) goes to the caller
        try:  # the target may change: the VM's host said it is elsewhere (a fleet)
            target, app = await reach(self.admission, target, self._link)
        except BaseException as exc:
            self.admission.closed(target.microvm_id)
            if isinstance(exc, OSError | TimeoutError):
                self.refuse(502, f"The app is not answering on port {target.port}")
                return None
            raise
        if self.state != _ADMIT:  # the client went away meanwhile
            self.admission.closed(target.microvm_id)
            app.close()
            return None
        self.app = app
        return app

    async def _link(self, target: Target) -> AppLink:
        return await self.upstream.link(target, lambda: AppLink(self, target))

    def _send(self, app: AppLink, head: Head, framing: int) -> None:
        self.state = _EXCHANGE
        self.method = head.method
        self.keep = head.version == b"1.1" and b"close" not in head.tokens(b"connection")
        self.request_body = NO_BODY if framing == NONE else BodyEnd(framing)
        self.response_body = None
        self.response_head = b""
        self.answered = False
        self.app_reusable = True
        self.deadline = self.loop.time() + EXCHANGE_IDLE_TIMEOUT
        out = serialize(head.start, strip_headers(forwarded_fields(head)))
        if framing != NONE and self.buf:
            try:
                end = self.request_body.feed(self.buf)
            except BadMessage:
                self.refuse(400, "Bad request")
                return
            out += self.buf[:end]
            self.buf = self.buf[end:]
        app.transport.write(out)
        if not self.request_body.done and self.eof:
            self._abort()
            return
        self._update_reading()

    def _forward_body(self, data: bytes) -> None:
        """Request body bytes (and maybe the next requests) while the exchange runs."""
        assert self.app is not None  # the exchange ends when the app's connection does
        try:
            end = self.request_body.feed(data)
        except BadMessage:
            if self.answered:
                self._abort()
            else:
                self.refuse(400, "Bad request")
            return
        self.deadline = self.loop.time() + EXCHANGE_IDLE_TIMEOUT
        if end < len(data):
            self.app.transport.write(data[:end])
            self.buf += data[end:]
            self._update_reading()
        else:
            self.app.transport.write(data)

    # -- the app's side --------------------------------------------------------------------

    def app_data(self, app: AppLink, data: bytes) -> None:
        if app is not self.app:
            return
        if self.state != _EXCHANGE:  # nothing was asked: the connection is not fit for reuse
            self._drop_app()
            return
        self.deadline = self.loop.time() + EXCHANGE_IDLE_TIMEOUT
        body = self.response_body
        if body is None:
            self._response_head(data)
            return
        end = body.feed(data)
        if end < len(data):
            self.app_reusable = False  # bytes beyond the answer: never trust this connection again
            data = data[:end]
        self.transport.write(data)
        if body.done:
            self._exchange_done()

    def _response_head(self, data: bytes) -> None:
        pending = self.response_head + data
        while True:
            end = pending.find(HEAD_END)
            if end < 0:
                if len(pending) > MAX_HEAD:
                    self._app_failed("The app sent a malformed answer")
                else:
                    self.response_head = pending
                return
            end += len(HEAD_END)
            raw, pending = pending[:end], pending[end:]
            try:
                status, framing, keep = response_summary(raw, self.method)
            except BadMessage:
                self._app_failed("The app sent a malformed answer")
                return
            if status >= 200:
                break
            self.transport.write(raw)  # 100 Continue, 103 Early Hints...
        self.answered = True
        self.response_head = b""
        self.response_body = body = NO_BODY if framing == NONE else BodyEnd(framing)
        self.keep = self.keep and keep
        try:
            end = body.feed(pending)
        except BadMessage:
            self._abort()
            return
        if end < len(pending):
            self.app_reusable = False
        raw = host_only_cookies(raw)
        self.transport.write(raw + pending[:end] if end else raw)
        if body.done:
            self._exchange_done()

    def app_lost(self, app: AppLink) -> None:
        if app is not self.app:
            return
        self.app = None
        self.admission.closed(app.target.microvm_id)
        if self.state != _EXCHANGE:
            return
        body = self.response_body
        if body is not None and body.to_close:
            body.done = True  # this answer ends with the connection
            self._exchange_done()
        elif not self.answered:
            self._app_failed("The app closed the connection")
        else:
            self._abort()  # the answer is cut short: so must the client's connection be

    def app_writable(self, app: AppLink, writable: bool) -> None:
        if app is self.app:
            self.app_full = not writable
            self._update_reading()

    def _app_failed(self, message: str) -> None:
        if self.answered:
            self._abort()
        else:
            self.refuse(502, message)

    def _exchange_done(self) -> None:
        if not self.request_body.done:  # answered before the body's end: it stays unread
            self._close()
            return
        if not (self.keep and self.app_reusable):
            self._drop_app()
        if not self.keep or self.eof:
            self._close()
            return
        self.state = _HEAD
        self.deadline = self.loop.time() + KEEPALIVE_TIMEOUT
        self._update_reading()
        if self.buf:
            self._next_request()

    # -- ending ----------------------------------------------------------------------------

    def refuse(self, status: int, message: str) -> None:
        """Answer with a fixed body, then close (the connection's framing is not to be trusted
        any more, or the request was refused)."""
        if self.state == _GONE:
            return
        body = (message + "\n").encode()
        fields = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(body)),
                  (b"connection", b"close")]  # fmt: skip
        self.transport.write(serialize(status_line(status), fields) + body)
        self._close()

    def _close(self) -> None:
        """Close after what was written has gone out."""
        self.state = _GONE
        self._drop_app()
        self.transport.close()

    def _abort(self) -> None:
        self.state = _GONE
        self._drop_app()
        self.transport.abort()

    def _drop_app(self) -> None:
        app, self.app = self.app, None
        if app is not None:
            self.admission.closed(app.target.microvm_id)
            app.close()
        self.app_full = False

    def _hand_off(self, data: bytes, *, http2: bool) -> None:
        self.state = _GONE
        if self.timer is not None:
            self.timer.cancel()
        self._drop_app()
        self.hand_off(self.transport, data, http2, self.eof, self.slot)

    def _update_reading(self) -> None:
        want = not self.app_full and len(self.buf) <= MAX_PENDING and self.state != _GONE
        if want != self.reading and not self.transport.is_closing():
            self.reading = want
            if want:
                self.transport.resume_reading()
            else:
                self.transport.pause_reading()

    def _on_timer(self) -> None:
        if self.state == _GONE:
            return
        now = self.loop.time()
        if now < self.deadline:
            self.timer = self.loop.call_at(min(self.deadline, now + KEEPALIVE_TIMEOUT),
                                           self._on_timer)  # fmt: skip
            return
        if self.state == _EXCHANGE and not self.answered:
            self.refuse(504, "The app did not answer in time")
        else:
            self._close()
