"""HTTP/2 from a client (TLS with ALPN ``h2``, or h2c) to an app in a VM.

Each client stream is admitted on its own (``:authority`` picks the VM). gRPC requests
(``content-type: application/grpc...``) and requests with ``X-aws-proxy-force-h2: true`` go
to the app as h2c over one multiplexed connection per VM port, trailers included; every other
request goes to the app as HTTP/1.1 (``h1wire``) over a small pool of kept connections, so
plain HTTP/1.1 apps work behind an HTTP/2 client.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable

import h2.events as ev

from embervm.proxy.admission import FORCE_H2_HEADER, Admission, Refusal, Target, strip_headers
from embervm.proxy.h1wire import (
    NONE,
    TO_CLOSE,
    BadMessage,
    Head,
    body_chunks,
    parse_response,
    read_head,
    request_head,
    response_framing,
)
from embervm.proxy.h2peer import HOP_BY_HOP, H2Peer, Header, StreamGone, new_connection
from embervm.proxy.http1 import RESPONSE_HEAD_TIMEOUT, SMALL_BODY, Upstream
from embervm.proxy.streams import READ_SIZE, close_quietly, open_upstream

log = logging.getLogger("embervm.proxy.http2")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
IDLE_TIMEOUT = 120.0
BODY_TIMEOUT = 300.0
MAX_IDLE_H1 = 16  # kept app connections per target: one per stream h2load-like clients keep busy
BAD_UPGRADE = (
    b"HTTP/1.1 400 Bad Request\r\ncontent-length: 12\r\nconnection: close\r\n\r\nBad request\n"
)


def _is_grpc(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-type", b"").startswith(b"application/grpc")


class Http2Session:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        admission: Admission,
        *,
        initial: bytes = b"",
    ) -> None:
        self.admission = admission
        self.peer = H2Peer(reader, writer, new_connection(client=False), on_new_stream=self._spawn)
        self._initial = initial
        self._tasks: set[asyncio.Task[None]] = set()
        self._h2_upstreams: dict[Target, H2Peer] = {}
        self._h1_idle: dict[Target, list[Upstream]] = {}

    def _spawn(self, request: ev.RequestReceived) -> None:
        task = asyncio.create_task(self._stream(request.stream_id, list(request.headers or []),
                                                bool(request.stream_ended)))  # fmt: skip
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self, *, upgraded: tuple[bytes, list[Header]] | None = None) -> None:
        try:
            if upgraded is None:
                self.peer.start(self._initial)
            else:
                settings, headers = upgraded
                self.peer.start(self._initial, upgrade_settings=settings)
                task = asyncio.create_task(self._stream(1, headers, True))
                self._tasks.add(task)
            await self.peer.read_loop(IDLE_TIMEOUT)
        finally:  # everything is closed before the first await (stop() may cancel again)
            self.peer.writer.close()
            for peer in self._h2_upstreams.values():
                peer.writer.close()
            for pool in self._h1_idle.values():
                for upstream in pool:
                    upstream.writer.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for peer in self._h2_upstreams.values():
                await peer.close()
            for pool in self._h1_idle.values():
                for upstream in pool:
                    self.admission.closed(upstream.target.microvm_id)
                    upstream.writer.close()
            await self.peer.close()

    # -- one stream ----------------------------------------------------------------------

    async def _stream(self, stream_id: int, raw: list[Header], ended: bool) -> None:
        try:
            pseudo = {k: v for k, v in raw if k.startswith(b":")}
            headers = [(k, v) for k, v in raw if not k.startswith(b":")]
            fields = dict(headers)
            authority = pseudo.get(b":authority") or fields.get(b"host")
            path = pseudo.get(b":path", b"/")
            try:
                ask = self.admission.ask(authority, fields, path, websocket=False)
                target = await self.admission.admit(ask)
            except Refusal as refusal:
                await self._refuse(stream_id, refusal.status, refusal.message)
                return
            upstream_h2 = _is_grpc(fields) or fields.get(FORCE_H2_HEADER, b"").lower() == b"true"
            relay = self._via_h2 if upstream_h2 else self._via_h1
            try:
                await relay(stream_id, target, pseudo, strip_headers(headers), ended)
            except (OSError, TimeoutError) as exc:
                log.debug("upstream %s failed: %r", target, exc)
                await self._refuse(
                    stream_id, 502, f"The app is not answering on port {target.port}"
                )
        except StreamGone:
            pass
        except Exception:
            log.exception("HTTP/2 stream failed")
            self.peer.reset(stream_id)
        finally:
            self.peer.forget(stream_id)

    async def _refuse(self, stream_id: int, status: int, message: str) -> None:
        body = (message + "\n").encode()
        with contextlib.suppress(StreamGone):
            head = [(b":status", str(status).encode()), (b"content-type", b"text/plain"),
                    (b"content-length", str(len(body)).encode())]  # fmt: skip
            await self.peer.send_headers(stream_id, head)
            await self.peer.send_data(stream_id, body, end=True)

    async def _client_body(
        self, stream_id: int, vm_id: str, forward: Callable[[bytes], Awaitable[None]],
        trailers: Callable[[list[Header]], Awaitable[None]] | None = None,
    ) -> None:  # fmt: skip
        """Relay the client's body (and trailers) with ``forward``; return at its end."""
        queue = self.peer.queue(stream_id)
        while True:
            async with asyncio.timeout(BODY_TIMEOUT):
                event = await queue.get()
            if isinstance(event, ev.DataReceived):
                self.admission.routes.record_activity(vm_id)
                await forward(event.data or b"")
                self.peer.acknowledge(stream_id, event.flow_controlled_length or 0)
            elif isinstance(event, ev.TrailersReceived) and trailers is not None:
                await trailers(list(event.headers or []))
                return
            elif isinstance(event, ev.StreamEnded):
                return
            elif event is None or isinstance(event, ev.StreamReset):
                raise StreamGone("client stream reset")

    # -- to an HTTP/1.1 app --------------------------------------------------------------

    async def _h1(self, target: Target) -> Upstream:
        pool = self._h1_idle.get(target)
        while pool:
            upstream = pool.pop()
            if not upstream.reader.at_eof():
                return upstream
            self.admission.closed(target.microvm_id)
            upstream.writer.close()
        reader, writer = await open_upstream(target.address, target.port)
        self.admission.opened(target.microvm_id)
        return Upstream(target, reader, writer)

    async def _via_h1(
        self, stream_id: int, target: Target, pseudo: dict[bytes, bytes],
        headers: list[Header], ended: bool,
    ) -> None:  # fmt: skip
        method = pseudo.get(b":method", b"GET")
        fields = [(b"host", pseudo.get(b":authority") or b"")]
        fields += [(k, v) for k, v in headers if k not in HOP_BY_HOP]
        chunked = not ended and not any(k == b"content-length" for k, _ in fields)
        if chunked:
            fields.append((b"transfer-encoding", b"chunked"))
        try:
            head = request_head(method, pseudo.get(b":path", b"/"), fields)
        except BadMessage:
            await self._refuse(stream_id, 400, "Bad request")
            return
        upstream = await self._h1(target)
        upstream.writer.write(head)
        reusable = False
        body: asyncio.Task[None] | None = None
        try:
            if not ended:

                async def forward(data: bytes) -> None:
                    upstream.writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                    await upstream.writer.drain()

                async def client_body() -> None:
                    await self._client_body(stream_id, target.microvm_id, forward)
                    if chunked:
                        upstream.writer.write(b"0\r\n\r\n")
                        await upstream.writer.drain()

                body = asyncio.create_task(client_body())
            try:
                reusable = await self._h1_response(stream_id, upstream, method)
                if body is not None:
                    await body
            except BadMessage:
                reusable = False
                await self._refuse(stream_id, 502, "The app sent a malformed answer")
            finally:
                await _cancelled(body)
        finally:
            self._release(upstream, reusable and (body is None or body.done()))

    def _release(self, upstream: Upstream, reusable: bool) -> None:
        target = upstream.target
        if reusable and not upstream.reader.at_eof():
            pool = self._h1_idle.setdefault(target, [])
            pool.append(upstream)
            if len(pool) > MAX_IDLE_H1:
                upstream = pool.pop(0)
            else:
                return
        self.admission.closed(target.microvm_id)
        upstream.writer.close()

    async def _h1_response(self, stream_id: int, upstream: Upstream, method: bytes) -> bool:
        while True:
            async with asyncio.timeout(RESPONSE_HEAD_TIMEOUT):
                raw = await read_head(upstream.reader)
            if raw is None:
                raise ConnectionError("the app closed the connection before answering")
            head = parse_response(raw)
            if head.status >= 200:
                break
        out = [(b":status", b"%d" % head.status)]
        out += [(k, v) for k, v in head.fields if k not in HOP_BY_HOP]
        framing = response_framing(head, method)
        if framing == NONE or 0 < framing <= SMALL_BODY:  # all of it in one write
            body = b""
            if framing != NONE:
                try:
                    async with asyncio.timeout(BODY_TIMEOUT):
                        body = await upstream.reader.readexactly(framing)
                except asyncio.IncompleteReadError:
                    raise ConnectionError("body ended early") from None
            await self.peer.send_response(stream_id, out, body)
        else:
            await self.peer.send_headers(stream_id, out)
            async for data in body_chunks(upstream.reader, framing, READ_SIZE, BODY_TIMEOUT):
                await self.peer.send_data(stream_id, data)
            await self.peer.end(stream_id)
        keep_alive = b"close" not in head.tokens(b"connection") and head.version == b"1.1"
        return framing != TO_CLOSE and keep_alive

    # -- to an h2c app (gRPC) ------------------------------------------------------------

    async def _h2(self, target: Target) -> H2Peer:
        peer = self._h2_upstreams.get(target)
        if peer is not None and not peer.closed:
            return peer
        reader, writer = await open_upstream(target.address, target.port)
        peer = H2Peer(reader, writer, new_connection(client=True))
        peer.start()
        await peer.flush()
        self._h2_upstreams[target] = peer
        task = asyncio.create_task(peer.read_loop(IDLE_TIMEOUT))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return peer

    async def _via_h2(
        self, stream_id: int, target: Target, pseudo: dict[bytes, bytes],
        headers: list[Header], ended: bool,
    ) -> None:  # fmt: skip
        app = await self._h2(target)
        up_id = app.conn.get_next_available_stream_id()
        app.queue(up_id)
        request = [(b":method", pseudo.get(b":method", b"GET")), (b":scheme", b"http"),
                   (b":authority", pseudo.get(b":authority", b"")),
                   (b":path", pseudo.get(b":path", b"/"))]  # fmt: skip
        request += [(k, v) for k, v in headers if k not in HOP_BY_HOP or k == b"te"]
        try:
            await app.send_headers(up_id, request, end=ended)
            body = None
            if not ended:

                async def forward(data: bytes) -> None:
                    await app.send_data(up_id, data)

                async def trailers(fields: list[Header]) -> None:
                    await app.send_headers(up_id, fields, end=True)

                async def client_body() -> None:
                    await self._client_body(stream_id, target.microvm_id, forward, trailers)
                    with contextlib.suppress(StreamGone):
                        await app.end(up_id)

                body = asyncio.create_task(client_body())
            try:
                await self._h2_response(stream_id, app, up_id)
            finally:
                await _cancelled(body)
        except StreamGone:
            app.reset(up_id)
            raise
        finally:
            app.forget(up_id)

    async def _h2_response(self, stream_id: int, app: H2Peer, up_id: int) -> None:
        queue = app.queue(up_id)
        while True:
            async with asyncio.timeout(BODY_TIMEOUT):
                event = await queue.get()
            if isinstance(event, ev.ResponseReceived):
                fields = [(k, v) for k, v in event.headers or [] if k not in HOP_BY_HOP]
                await self.peer.send_headers(stream_id, fields, end=bool(event.stream_ended))
                if event.stream_ended:
                    return
            elif isinstance(event, ev.DataReceived):
                await self.peer.send_data(stream_id, event.data or b"")
                app.acknowledge(up_id, event.flow_controlled_length or 0)
            elif isinstance(event, ev.TrailersReceived):
                await self.peer.send_headers(stream_id, list(event.headers or []), end=True)
                return
            elif isinstance(event, ev.StreamEnded):
                await self.peer.end(stream_id)
                return
            elif event is None or isinstance(event, ev.StreamReset):
                self.peer.reset(stream_id)
                raise StreamGone("the app reset the stream")


async def _cancelled(task: asyncio.Task[None] | None) -> None:
    """End a body task (if still running) and collect its outcome: it has no one else."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def upgrade_h2c(
    admission: Admission,
    request: Head,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """``Upgrade: h2c`` (RFC 7540 §3.2): answer 101, then serve the request as stream 1."""
    raw = (request.get(b"http2-settings") or b"").strip()
    settings = raw + b"=" * (-len(raw) % 4)  # sent unpadded (RFC 7540 §3.2.1); h2 wants padding
    try:
        if len(base64.urlsafe_b64decode(settings)) % 6:
            raise ValueError("not a list of settings")
    except ValueError:
        writer.write(BAD_UPGRADE)
        await close_quietly(writer)
        return
    writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    headers: list[Header] = [(b":method", request.method), (b":scheme", b"http"),
                             (b":authority", request.get(b"host") or b""),
                             (b":path", request.target)]  # fmt: skip
    headers += [(k, v) for k, v in request.fields if k not in HOP_BY_HOP]
    session = Http2Session(reader, writer, admission)
    await session.run(upgraded=(settings, headers))
