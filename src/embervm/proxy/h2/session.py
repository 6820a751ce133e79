"""HTTP/2 from a client (TLS with ALPN ``h2``, h2c with prior knowledge, or ``Upgrade: h2c``)
to an app in a VM, on protocol callbacks.

``ClientSession`` is the protocol of the client's connection: ``h2.frame_layer`` does the framing,
each request is admitted on its own (``:authority`` picks the VM; token on every request) in
the callback that read it when core's view of the VM is fresh (``Admission.admit_now``), in a
task otherwise (resolve, auto-resume) or when a new app connection must be opened. Plain
requests go to the app as HTTP/1.1 over kept connections (``h2.relay_h1``: no task or queue per
stream); gRPC and ``X-aws-proxy-force-h2: true`` go as h2c over one multiplexed connection per
VM port (``h2.relay_h2``, a task per stream). What the frame layer has to send leaves in one write
per turn of the event loop.

Timeouts: 30 s for a connection that has sent no request with a valid token (from the
hand-over, whatever it sends: the same deadline as HTTP/1.1's first request, audit A8), then
120 s without a stream before the connection is closed (GOAWAY), 300 s without a byte either
way on a stream, 30 s for the client's first bytes after the hand-over.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from typing import cast

from embervm.proxy.admission import (
    AUTH_HEADER,
    FORCE_H2_HEADER,
    PORT_HEADER,
    Admission,
    Ask,
    Refusal,
    Target,
)
from embervm.proxy.h1.wire import Head
from embervm.proxy.h2 import fields as request_fields
from embervm.proxy.h2.fields import Malformed, Request
from embervm.proxy.h2.frame_layer import CANCEL, H2Server
from embervm.proxy.h2.hpack import Header
from embervm.proxy.h2.relay_h1 import H1Exchange, LinkPool
from embervm.proxy.h2.relay_h2 import H2Exchange, H2Upstreams
from embervm.proxy.limits import (
    BODY_IDLE_TIMEOUT,
    FIRST_REQUEST_TIMEOUT,
    HOP_BY_HOP_H2,
    KEEPALIVE_TIMEOUT,
)
from embervm.proxy.streams import close_quietly
from embervm.proxy.upstream import DIRECT, Upstream

log = logging.getLogger("embervm.proxy.http2")

TICK = 5.0  # how often a connection looks at its streams' and its own idle time
# Answer bytes the frame layer may hold for a client that grants no window before every app
# connection of the client's connection stops being read (B7). What a connection can pin, in
# all: this, plus one app read that came before the pause (256 KiB), plus the h2c apps'
# windows (h2.relay_h2.MAX_H2_TARGETS x 1 MiB), plus the client's own window (1 MiB): under 7 MiB.
HELD_BUDGET = 1024 * 1024
HAND_OVER_READ = 1 << 30  # "everything buffered": the bytes read before the hand-over
BAD_UPGRADE = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\nconnection: close\r\n\r\nBad request\n"
)

Exchange = H1Exchange | H2Exchange


class ClientSession(asyncio.Protocol):
    """One client's HTTP/2 connection and the streams it carries."""

    def __init__(
        self, transport: asyncio.Transport, admission: Admission, upstream: Upstream = DIRECT
    ) -> None:
        self.transport = transport
        self.admission = admission
        self.loop = asyncio.get_running_loop()
        self.engine = H2Server(self)
        self.pool = LinkPool(admission, upstream)
        self.upstreams = H2Upstreams(admission, upstream)
        self.exchanges: dict[int, Exchange] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.transport_full = False  # the client's connection does not take what we write
        self.over_budget = False  # the frame layer holds more than HELD_BUDGET for the client
        self.flushing = False
        self.gone = False
        self.done: asyncio.Future[None] = self.loop.create_future()
        self.idle_since = self.started = self.loop.time()
        self.authenticated = False  # a request with a valid token came: KEEPALIVE_TIMEOUT applies
        self.timer = self.loop.call_later(TICK, self._tick)
        self.ask: Ask | None = None
        self.ask_key: tuple[bytes | None, ...] = ()

    # -- the client's connection -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        self.engine.receive(data)
        self.flush_soon()

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.gone = True
        self.timer.cancel()
        for task in self.tasks:
            task.cancel()
        exchanges, self.exchanges = self.exchanges, {}
        for exchange in exchanges.values():
            exchange.reset()
        self.pool.close()
        if not self.done.done():
            self.done.set_result(None)

    @property
    def client_full(self) -> bool:
        """The client takes no more for now: the apps' answers wait where they are."""
        return self.transport_full or self.over_budget

    def pause_writing(self) -> None:
        self.transport.pause_reading()  # nor read what it asks of us meanwhile (PING, SETTINGS)
        self._room(transport_full=True, over_budget=self.over_budget)

    def resume_writing(self) -> None:
        if not self.gone:
            self.transport.resume_reading()
        self._room(transport_full=False, over_budget=self.over_budget)

    def _room(self, *, transport_full: bool, over_budget: bool) -> None:
        was_full = self.client_full
        self.transport_full, self.over_budget = transport_full, over_budget
        if self.client_full != was_full:
            for exchange in list(self.exchanges.values()):
                exchange.client_writable(not self.client_full)

    def flush_soon(self) -> None:
        """Write what the frame layer has to send, once this turn of the loop is over (and
        look at what it holds: every call follows a change of it)."""
        over_budget = self.engine.held_bytes > HELD_BUDGET
        if over_budget != self.over_budget:
            self._room(transport_full=self.transport_full, over_budget=over_budget)
        if not self.flushing:
            self.flushing = True
            self.loop.call_soon(self._flush)

    def _flush(self) -> None:
        self.flushing = False
        out = self.engine.out
        if out and not self.transport.is_closing():
            self.engine.out = bytearray()
            self.transport.write(out)  # never changed again: the transport may keep it
        leaving = self.engine.goaway_received and not self.exchanges and not self.engine.streams
        if self.engine.closed or leaving:
            self.close()

    def close(self) -> None:
        """Close after what was written has gone out."""
        if not self.transport.is_closing():
            out, self.engine.out = self.engine.out, bytearray()
            if out:
                self.transport.write(out)
            self.transport.close()

    def _tick(self) -> None:
        now = self.loop.time()
        for exchange in list(self.exchanges.values()):
            exchange.expired(now, BODY_IDLE_TIMEOUT)
        idle = not self.exchanges and now - self.idle_since > KEEPALIVE_TIMEOUT  # or only held data
        if idle or (not self.authenticated and now - self.started > FIRST_REQUEST_TIMEOUT):
            self.engine.close()
            self.close()
            return
        self.flush_soon()
        self.timer = self.loop.call_later(TICK, self._tick)

    # -- streams (h2.frame_layer's calls) ----------------------------------------------------------

    def on_request(self, stream_id: int, request: Request, ended: bool) -> None:
        fields = dict(request.fields)
        authority = request.authority or fields.get(b"host")
        try:
            ask = self._ask(authority, fields, request.path)
            target = self.admission.admit_now(ask)  # the token checked first: Refusal if bad
        except Refusal as refusal:
            self.refuse(stream_id, refusal.status, refusal.message)
            return
        self.authenticated = True
        exchange: Exchange
        if (fields.get(b"content-type", b"").startswith(b"application/grpc")
                or fields.get(FORCE_H2_HEADER, b"").lower() == b"true"):  # fmt: skip
            exchange = H2Exchange(self, self.upstreams, stream_id, request, ended)
        else:
            exchange = H1Exchange(self, stream_id, request, ended)
        self.exchanges[stream_id] = exchange
        if target is not None:
            if isinstance(exchange, H2Exchange):
                exchange.start(target)
                return
            link = self.pool.take(target)
            if link is not None:
                exchange.start(link)  # the common case: no task, no await
                return
        task = self.loop.create_task(self._admit(exchange, ask, target))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _ask(self, host: bytes | None, fields: dict[bytes, bytes], path: bytes) -> Ask:
        """The same fields as the last request's ask the same (no upgrade here, so the path
        does not matter). The token is checked on every request, in ``admit``."""
        key = (host, fields.get(AUTH_HEADER), fields.get(PORT_HEADER))
        if key != self.ask_key or self.ask is None:
            self.ask = self.admission.ask(host, fields, path, websocket=False)
            self.ask_key = key
        return self.ask

    async def _admit(self, exchange: Exchange, ask: Ask, target: Target | None) -> None:
        """Admit (unless ``admit_now`` already did) and open an app connection if none is kept."""
        stream_id = exchange.stream_id
        try:
            if target is None:
                target = await self.admission.admit(ask)
            if self.exchanges.get(stream_id) is not exchange:
                return  # reset meanwhile
            if isinstance(exchange, H2Exchange):
                exchange.start(target)
                return
            link = self.pool.take(target) or await self.pool.connect(target)
            if self.exchanges.get(stream_id) is not exchange:
                self.pool.give(link)
                return
            exchange.start(link)
        except Refusal as refusal:
            self.refuse(stream_id, refusal.status, refusal.message)
        except (OSError, TimeoutError) as exc:
            log.debug("upstream %s failed: %r", target, exc)
            port = target.port if target is not None else ask.port
            self.refuse(stream_id, 502, f"The app is not answering on port {port}")
        except Exception:  # one broken stream must never take the connection down
            log.exception("HTTP/2 stream failed")
            self.engine.reset(stream_id, CANCEL)
            self.finished(stream_id)
            self.flush_soon()

    def on_data(self, stream_id: int, data: bytes) -> None:
        exchange = self.exchanges.get(stream_id)
        if exchange is not None:
            exchange.data(data)
        else:  # answered already: nobody wants it
            self.engine.consumed(stream_id, len(data))

    def on_trailers(self, stream_id: int, trailers: list[Header]) -> None:
        exchange = self.exchanges.get(stream_id)
        if isinstance(exchange, H2Exchange):  # HTTP/1.1 apps get none (as before)
            exchange.trailers(trailers)

    def on_end(self, stream_id: int) -> None:
        exchange = self.exchanges.get(stream_id)
        if exchange is not None:
            exchange.end()

    def on_reset(self, stream_id: int) -> None:
        exchange = self.exchanges.pop(stream_id, None)
        if exchange is not None:
            exchange.reset()
            self._maybe_idle()

    def on_drained(self, stream_id: int) -> None:
        exchange = self.exchanges.get(stream_id)
        if exchange is not None:
            exchange.drained()

    # -- the exchanges' calls ----------------------------------------------------------------

    def finished(self, stream_id: int) -> None:
        self.exchanges.pop(stream_id, None)
        self._maybe_idle()

    def _maybe_idle(self) -> None:
        if not self.exchanges:
            self.idle_since = self.loop.time()
            if self.engine.goaway_received:
                self.flush_soon()

    def refuse(self, stream_id: int, status: int, message: str) -> None:
        """A whole answer with a fixed body (refusals carry no detail). When the client's
        windows have no room for the body, the head alone ends the stream: a refused stream
        never waits, held, for a client that grants no window (A2)."""
        body = (message + "\n").encode()
        if self.engine.window(stream_id) < len(body):
            self.engine.send_headers(stream_id, [(b":status", b"%d" % status)], end=True)
        else:
            head = [(b":status", b"%d" % status), (b"content-type", b"text/plain"),
                    (b"content-length", b"%d" % len(body))]  # fmt: skip
            self.engine.send_headers(stream_id, head)
            self.engine.send_data(stream_id, body, end=True)
        self.flush_soon()
        self.finished(stream_id)

    def abort(self) -> None:
        if not self.gone:
            self.transport.abort()


class Http2Session:
    """Serves a connection handed over as streams (``h1.relay_h1`` read its first bytes): takes the
    bytes the streams hold and gives the transport to a ``ClientSession``."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        admission: Admission,
        upstream: Upstream = DIRECT,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.admission = admission
        self.upstream = upstream

    async def run(self, *, upgraded: tuple[bytes, Request] | None = None) -> None:
        transport = cast(asyncio.Transport, self.writer.transport)
        session = ClientSession(transport, self.admission, self.upstream)
        attached = False
        try:
            if upgraded is not None:
                session.engine.upgraded(*upgraded)
                session.flush_soon()
            async with asyncio.timeout(FIRST_REQUEST_TIMEOUT):
                data = await self.reader.read(HAND_OVER_READ)  # what is buffered, or the next
            eof = self.reader.at_eof()
            if transport.is_closing():
                return
            # from here to set_protocol nothing awaits: no byte can land in the reader
            transport.set_protocol(session)
            attached = True
            transport.resume_reading()
            if data:
                session.data_received(data)
            if eof:
                session.eof_received()
            await asyncio.shield(session.done)
        except TimeoutError:
            pass  # no byte from the client in time
        finally:
            session.abort()
            if not attached:  # the transport never told the session anything
                session.connection_lost(None)
            await session.upstreams.close()


def _upgrade_request(request: Head) -> Request:
    headers: list[Header] = [(b":method", request.method), (b":scheme", b"http"),
                             (b":authority", request.get(b"host") or b""),
                             (b":path", request.target)]  # fmt: skip
    headers += [(k, v) for k, v in request.fields if k not in HOP_BY_HOP_H2]
    return request_fields.request(headers)


async def upgrade_h2c(
    admission: Admission,
    request: Head,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    upstream: Upstream = DIRECT,
) -> None:
    """``Upgrade: h2c`` (RFC 7540 §3.2): answer 101, then serve the request as stream 1."""
    raw = (request.get(b"http2-settings") or b"").strip()
    try:
        settings = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))  # sent unpadded
        if len(settings) % 6:
            raise ValueError("not a list of settings")
        stream_one = _upgrade_request(request)
    except (ValueError, Malformed):
        writer.write(BAD_UPGRADE)
        await close_quietly(writer)
        return
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    await Http2Session(reader, writer, admission, upstream).run(upgraded=(settings, stream_one))
