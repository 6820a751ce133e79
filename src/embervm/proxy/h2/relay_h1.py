"""One HTTP/2 stream relayed to an HTTP/1.1 app, on protocol callbacks (no task, no queue).

``H1Exchange`` writes the request head (built by ``request_head``) to a kept app connection
(``AppLink``, from the session's ``LinkPool``), forwards the client's DATA as it comes (chunked
when the client gave no length) and reads the answer: the head parsed strictly (``h1.wire``),
the body's payload unframed (``h1.body.Payload``) and handed to the frame layer as it arrives; a
small whole answer leaves in one write with the next ones of the same loop turn.

Backpressure both ways: client DATA is acknowledged to the client (its window renewed) only
once written to an app connection that is not full; the app connection is not read while the
frame layer holds data of its stream for want of the client's window, nor while the client's
connection is full. When the answer is complete the app connection goes back to the pool
unless either side said ``close``, the app sent more than its answer, or the client's body
was not finished.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, cast

from embervm.proxy.admission import PROXY_HEADER_PREFIX, Admission, Target
from embervm.proxy.h1.body import Payload
from embervm.proxy.h1.wire import (
    HEAD_END,
    NONE,
    TO_CLOSE,
    BadMessage,
    Head,
    host_only_cookie,
    parse_response,
    response_framing,
)
from embervm.proxy.h2.fields import Request
from embervm.proxy.h2.frame_layer import INTERNAL_ERROR, H2Server
from embervm.proxy.h2.hpack import Header
from embervm.proxy.limits import HOP_BY_HOP_H2, MAX_HEAD
from embervm.proxy.upstream import DIRECT, Upstream, reach

MAX_IDLE = 16  # kept app connections per target and client connection


def request_head(request: Request, ended: bool) -> tuple[bytes, bool]:
    """The HTTP/1.1 head for the app (``h2.fields`` checked every byte of it) and whether the
    body goes chunked (the client gave no length and did not end the stream)."""
    host = request.authority
    lines: list[bytes] = []
    cookies: list[bytes] = []
    for name, value in request.fields:
        if name.startswith(PROXY_HEADER_PREFIX) or name in HOP_BY_HOP_H2:
            if name == b"host" and host is None:  # :authority wins (RFC 9113 §8.3.1)
                host = value
            continue
        if name == b"cookie":  # one field again for HTTP/1.1 (RFC 9113 §8.2.3)
            cookies.append(value)
            continue
        lines += (name, b": ", value, b"\r\n")
    if cookies:
        lines += (b"cookie: ", b"; ".join(cookies), b"\r\n")
    chunked = not ended and request.length < 0
    if chunked:
        lines.append(b"transfer-encoding: chunked\r\n")
    start = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (request.method, request.path, host or b"")
    return b"".join([start, *lines, b"\r\n"]), chunked


def response_fields(head: Head) -> tuple[list[Header], bool]:
    """A response head as HTTP/2 fields (the status, then its fields but the connection-specific
    ones and those its Connection field names, RFC 9110 §7.6.1), and whether it said close."""
    fields: list[Header] = [(b":status", b"%d" % head.status)]
    listed: list[bytes] = []
    for name, value in head.fields:
        if name in HOP_BY_HOP_H2:
            if name == b"connection":
                listed.append(value)
            continue
        fields.append((name, host_only_cookie(value) if name == b"set-cookie" else value))
    if not listed:
        return fields, False
    named = {token.strip().lower() for value in listed for token in value.split(b",")}
    return [(name, value) for name, value in fields if name not in named], b"close" in named


class Owner(Protocol):
    """What an exchange needs of its session."""

    engine: H2Server
    pool: LinkPool
    loop: asyncio.AbstractEventLoop

    @property
    def client_full(self) -> bool:
        """The client takes no more for now (its connection is full, or too much is held)."""

    def flush_soon(self) -> None: ...

    def finished(self, stream_id: int) -> None:
        """The exchange is over (whatever the frame layer still holds goes out on its own)."""

    def refuse(self, stream_id: int, status: int, message: str) -> None: ...


class AppLink(asyncio.Protocol):
    """A kept connection to one app port; what it sees goes to the exchange using it."""

    transport: asyncio.Transport  # from connection_made, before anyone holds the link

    def __init__(self, pool: LinkPool, target: Target) -> None:
        self.pool = pool
        self.target = target
        self.exchange: H1Exchange | None = None
        self.closed = False
        self.counted = False  # counts in the admission's connections to the VM

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses

    def data_received(self, data: bytes) -> None:
        if self.exchange is not None:
            self.exchange.app_data(data)
        else:  # nothing was asked: not fit for reuse
            self.close()

    def eof_received(self) -> bool:
        return False  # close; connection_lost tells the exchange

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone()
        if self.exchange is not None:
            self.exchange.app_lost()
        else:
            self.pool.lost(self)

    def pause_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.app_writable(False)

    def resume_writing(self) -> None:
        if self.exchange is not None:
            self.exchange.app_writable(True)

    def close(self) -> None:
        self.exchange = None
        self._gone()
        self.transport.close()

    def _gone(self) -> None:
        self.closed = True
        if self.counted:
            self.counted = False
            self.pool.admission.closed(self.target.microvm_id)


class LinkPool:
    """A client connection's idle app connections, per target."""

    def __init__(self, admission: Admission, upstream: Upstream = DIRECT) -> None:
        self.admission = admission
        self.upstream = upstream
        self.idle: dict[Target, list[AppLink]] = {}

    def take(self, target: Target) -> AppLink | None:
        links = self.idle.get(target)
        while links:
            link = links.pop()
            if not link.closed:
                return link
        return None

    async def connect(self, target: Target) -> AppLink:
        """A new connection (OSError or TimeoutError when the app does not answer; its
        ``target`` is another when the VM's host said it is elsewhere: ``upstream.reach``)."""
        self.admission.reserve(target)  # Refusal (429) goes to the caller
        try:
            _, link = await reach(self.admission, target, self._link)
        except BaseException:
            self.admission.closed(target.microvm_id)
            raise
        link.counted = True
        return link

    async def _link(self, target: Target) -> AppLink:
        return await self.upstream.link(target, lambda: AppLink(self, target))

    def give(self, link: AppLink) -> None:
        link.exchange = None
        links = self.idle.setdefault(link.target, [])
        links.append(link)
        if len(links) > MAX_IDLE:
            links.pop(0).close()

    def lost(self, link: AppLink) -> None:
        links = self.idle.get(link.target)
        if links and link in links:
            links.remove(link)

    def close(self) -> None:
        for links in self.idle.values():
            for link in links:
                link.close()
        self.idle.clear()


class H1Exchange:
    __slots__ = ("answered", "app_full", "blocked", "buffered", "chunked", "ended", "head", "held",
                 "link", "method", "owner", "payload", "response", "reusable", "stream_id",
                 "touched")  # fmt: skip

    def __init__(self, owner: Owner, stream_id: int, request: Request, ended: bool) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.method = request.method
        self.head, self.chunked = request_head(request, ended)
        self.ended = ended  # the client finished its body
        self.buffered: list[bytes] = []  # client DATA that came before the app connection
        self.held = 0  # client DATA written while the app connection was full: not yet acked
        self.link: AppLink | None = None
        self.app_full = False
        self.blocked = False  # the frame layer holds data of ours for want of window
        self.response = b""  # the answer's head so far
        self.payload: Payload | None = None  # None until the answer's head has come
        self.answered = False
        self.reusable = True
        self.touched = owner.loop.time()

    # -- the client's side -------------------------------------------------------------------

    def start(self, link: AppLink) -> None:
        self.link = link
        link.exchange = self
        self.touched = self.owner.loop.time()
        out = self.head
        if self.buffered:
            out += b"".join(self._frame(data) for data in self.buffered)
        if self.ended and self.chunked:
            out += b"0\r\n\r\n"
        link.transport.write(out)
        for data in self.buffered:
            self.owner.engine.consumed(self.stream_id, len(data))
        self.buffered = []
        if self.owner.client_full:
            link.transport.pause_reading()

    def _frame(self, data: bytes) -> bytes:
        return b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data

    def data(self, data: bytes) -> None:
        link = self.link
        if link is None:
            self.buffered.append(data)  # bounded by the stream's window: nothing acked yet
            return
        self.touched = self.owner.loop.time()
        self.owner.pool.admission.routes.record_activity(link.target.microvm_id)
        link.transport.write(self._frame(data))
        if self.app_full:
            self.held += len(data)
        else:
            self.owner.engine.consumed(self.stream_id, len(data))

    def end(self) -> None:
        self.ended = True
        if self.link is not None and self.chunked:
            self.link.transport.write(b"0\r\n\r\n")

    def reset(self) -> None:
        """The client reset the stream (or its connection is gone)."""
        self._drop_link()

    def drained(self) -> None:
        self.blocked = False
        if self.link is not None and not self.owner.client_full:
            self.link.transport.resume_reading()

    def client_writable(self, writable: bool) -> None:
        if self.link is not None:
            if not writable:
                self.link.transport.pause_reading()
            elif not self.blocked:
                self.link.transport.resume_reading()

    def expired(self, now: float, idle: float) -> bool:
        """Nothing either way for ``idle`` seconds: answered 504, or reset if an answer began
        (not while it waits for admission: a resume has its own time limit in core)."""
        if now - self.touched < idle or (self.link is None and not self.answered):
            return False
        if self.answered:
            self.owner.engine.reset(self.stream_id, INTERNAL_ERROR)
            self._drop_link()
            self.owner.finished(self.stream_id)
        else:
            self._fail(504, "The app did not answer in time")
        return True

    # -- the app's side ----------------------------------------------------------------------

    def app_data(self, data: bytes) -> None:
        self.touched = self.owner.loop.time()
        if self.payload is None:
            self._response_head(data)
        else:
            self._body(self.payload, data)

    def _body(self, payload: Payload, data: bytes, *, always: bool = False) -> None:
        """Send on the answer's payload in ``data`` (``always``: even an empty piece)."""
        try:
            body, end = payload.payload(data)
        except BadMessage:
            self._cut_short()
            return
        if end < len(data):
            self.reusable = False  # bytes beyond the answer: never trust this connection again
        self._send(body, payload.done, always=always)

    def _response_head(self, data: bytes) -> None:
        pending = self.response + data if self.response else data
        while True:
            end = pending.find(HEAD_END)
            if end < 0:
                if len(pending) > MAX_HEAD:
                    self._fail(502, "The app sent a malformed answer")
                else:
                    self.response = pending
                return
            end += len(HEAD_END)
            raw, pending = pending[:end], pending[end:]
            try:
                head = parse_response(raw)
                framing = response_framing(head, self.method)
            except BadMessage:
                self._fail(502, "The app sent a malformed answer")
                return
            if head.status >= 200:
                break  # 1xx (100 Continue, 103 Early Hints) are the app's business
        self.response = b""
        self.answered = True
        fields, close = response_fields(head)
        keep = head.version == b"1.1" and not close and framing != TO_CLOSE
        self.reusable = keep
        self.payload = payload = Payload(framing)
        if framing == NONE:
            self.reusable = keep and not pending
            self.owner.engine.send_headers(self.stream_id, fields, end=True)
            self.owner.flush_soon()
            self._done()
            return
        self.owner.engine.send_headers(self.stream_id, fields)
        self._body(payload, pending, always=True)

    def _send(self, body: bytes, done: bool, *, always: bool = False) -> None:
        if body or done or always:
            sent = self.owner.engine.send_data(self.stream_id, body, end=done)
            self.owner.flush_soon()
            if not sent and self.link is not None and not done:
                self.blocked = True
                self.link.transport.pause_reading()  # until on_drained
        if done:
            self._done()

    def app_lost(self) -> None:
        self.link = None
        payload = self.payload
        if payload is not None and payload.to_close:
            payload.done = True  # this answer ends with the connection
            self.reusable = False
            self._send(b"", True)
        elif not self.answered:
            self._fail(502, "The app closed the connection")
        else:
            self._cut_short()

    def app_writable(self, writable: bool) -> None:
        self.app_full = not writable
        if writable and self.held:
            held, self.held = self.held, 0
            self.owner.engine.consumed(self.stream_id, held)
            self.owner.flush_soon()

    # -- ending ------------------------------------------------------------------------------

    def _done(self) -> None:
        """The answer is complete (the frame layer may still hold its last bytes)."""
        if not self.ended:
            self.reusable = False  # the app may still wait for the rest of the body
        link, self.link = self.link, None
        if link is not None:
            if self.reusable and not link.closed:
                if self.owner.client_full:
                    link.transport.resume_reading()
                self.owner.pool.give(link)
            else:
                link.close()
        self.owner.finished(self.stream_id)

    def _fail(self, status: int, message: str) -> None:
        self._drop_link()
        self.owner.refuse(self.stream_id, status, message)

    def _cut_short(self) -> None:
        """The answer broke off after it began: the client's stream is reset."""
        self._drop_link()
        self.owner.engine.reset(self.stream_id, INTERNAL_ERROR)
        self.owner.flush_soon()
        self.owner.finished(self.stream_id)

    def _drop_link(self) -> None:
        link, self.link = self.link, None
        if link is not None:
            link.close()
