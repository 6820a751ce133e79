"""One HTTP/2 stream relayed to an h2c app: gRPC (``content-type: application/grpc...``) and
``X-aws-proxy-force-h2: true``, trailers included.

The rare path, so a task per stream: the client's body and trailers come through a queue, the
answer goes to the frame layer, and the app's side is an h2 connection per VM port kept by the
session (``h2c_upstream.H2Upstream``, h2 doing its framing). Data is acknowledged to the app only
once the client's window and connection took it, and to the client only once the app's h2
connection took it: backpressure end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import h2.events as ev

from embervm.proxy.admission import Admission, Refusal, Target, strip_headers
from embervm.proxy.h1.wire import host_only_cookie
from embervm.proxy.h2.fields import Request
from embervm.proxy.h2.frame_layer import CANCEL
from embervm.proxy.h2.hpack import Header
from embervm.proxy.h2.relay_h1 import Owner
from embervm.proxy.h2c_upstream import H2Peer, H2Upstream, StreamGone
from embervm.proxy.limits import BODY_IDLE_TIMEOUT, HOP_BY_HOP_H2
from embervm.proxy.upstream import DIRECT, Upstream, reach

log = logging.getLogger("embervm.proxy.http2")

# h2c app connections per client connection: each may hold its window of answer (1 MiB) that
# the client has not taken yet, so this bounds what a client and its apps pin (B7).
MAX_H2_TARGETS = 4
TOO_MANY_TARGETS = Refusal(429, "Too many HTTP/2 app connections on this connection")
_END = b"end"  # in the queue: the client finished (an object no DATA frame is)


class H2Upstreams:
    """A client connection's h2c connections to apps, one per target (streams that ask for
    one at once share the one being opened). Each counts against its VM's connection limit
    (``Admission.reserve``) from the moment it is being opened until it is closed, and a
    client connection has at most ``MAX_H2_TARGETS`` (a 429 for a stream that needs one more)."""

    def __init__(self, admission: Admission, upstream: Upstream = DIRECT) -> None:
        self.admission = admission
        self.upstream = upstream
        self.open: dict[Target, H2Upstream] = {}
        self.opening: dict[Target, asyncio.Task[H2Upstream]] = {}
        self.retired: list[H2Upstream] = []

    async def get(self, target: Target) -> H2Peer:
        upstream = self.open.get(target)
        if upstream is not None and upstream.usable(target):
            return upstream.peer
        opening = self.opening.get(target)
        if opening is None:
            live = sum(1 for kept, up in self.open.items() if kept != target and up.usable(kept))
            if len(self.opening) + live >= MAX_H2_TARGETS:
                raise TOO_MANY_TARGETS
            self.admission.reserve(target)  # Refusal (429) goes to the stream
            opening = self.opening[target] = asyncio.create_task(self._open(target))
            opening.add_done_callback(lambda task: self._opened(target, task))
        fresh = await asyncio.shield(opening)
        kept = fresh.target  # not ``target`` if the VM's host said it is elsewhere
        if self.open.get(kept) is not fresh:
            stale = self.open.get(kept)
            if stale is not None:
                self.retired.append(stale)
            self.open[kept] = fresh
        return fresh.peer

    async def _open(self, target: Target) -> H2Upstream:
        _, opened = await reach(self.admission, target, self._open_once)
        return opened

    async def _open_once(self, target: Target) -> H2Upstream:
        return await H2Upstream.open(target, self.upstream)

    def _opened(self, target: Target, task: asyncio.Task[H2Upstream]) -> None:
        self.opening.pop(target, None)
        if task.cancelled() or task.exception() is not None:
            self.admission.closed(target.microvm_id)  # never opened: the reservation ends

    async def close(self) -> None:
        openings = list(self.opening.values())
        for opening in openings:
            opening.cancel()
        for opened in await asyncio.gather(*openings, return_exceptions=True):
            if isinstance(opened, H2Upstream) and opened not in self.open.values():
                self.retired.append(opened)
        for upstream in [*self.open.values(), *self.retired]:
            await upstream.close()
            self.admission.closed(upstream.target.microvm_id)
        self.open.clear()
        self.retired.clear()


class H2Exchange:
    def __init__(self, owner: Owner, upstreams: H2Upstreams, stream_id: int, request: Request,
                 ended: bool) -> None:  # fmt: skip
        self.owner = owner
        self.upstreams = upstreams
        self.stream_id = stream_id
        self.request = request
        self.ended = ended
        self.events: asyncio.Queue[bytes | list[Header] | None] = asyncio.Queue()
        self.window = asyncio.Event()  # the frame layer sent what it held for the stream
        self.room = asyncio.Event()  # the client's connection is not full
        self.window.set()
        self.room.set()
        self.task: asyncio.Task[None] | None = None

    # -- the session's calls -----------------------------------------------------------------

    def start(self, target: Target) -> None:
        self.task = self.owner.loop.create_task(self._run(target))

    def data(self, data: bytes) -> None:
        self.events.put_nowait(data)

    def trailers(self, fields: list[Header]) -> None:
        self.events.put_nowait(fields)

    def end(self) -> None:
        self.events.put_nowait(_END)

    def reset(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.events.put_nowait(None)

    def drained(self) -> None:
        self.window.set()

    def client_writable(self, writable: bool) -> None:
        if writable:
            self.room.set()
        else:
            self.room.clear()

    def expired(self, now: float, idle: float) -> bool:
        return False  # the task has its own time limits

    # -- the relay ---------------------------------------------------------------------------

    async def _run(self, target: Target) -> None:
        engine, stream_id = self.owner.engine, self.stream_id
        try:
            try:
                app = await self.upstreams.get(target)
            except Refusal as refusal:
                self.owner.refuse(stream_id, refusal.status, refusal.message)
                return
            except (OSError, TimeoutError) as exc:
                log.debug("upstream %s failed: %r", target, exc)
                self.owner.refuse(stream_id, 502, f"The app is not answering on port {target.port}")
                return
            await self._relay(app, target)
        except StreamGone:
            engine.reset(stream_id, CANCEL)
        except Exception:
            log.exception("HTTP/2 stream failed")
            engine.reset(stream_id, CANCEL)
        finally:
            self.owner.flush_soon()
            self.owner.finished(stream_id)

    async def _relay(self, app: H2Peer, target: Target) -> None:
        request = self.request
        up_id = app.conn.get_next_available_stream_id()
        app.queue(up_id)
        head = [(b":method", request.method), (b":scheme", b"http"),
                (b":authority", request.authority or b""), (b":path", request.path)]  # fmt: skip
        head += [
            (k, v) for k, v in strip_headers(request.fields) if k not in HOP_BY_HOP_H2 or k == b"te"
        ]
        body: asyncio.Task[None] | None = None
        try:
            await app.send_headers(up_id, head, end=self.ended)
            if not self.ended:
                body = asyncio.create_task(self._client_body(app, up_id, target.microvm_id))
            await self._response(app, up_id)
        except StreamGone:
            app.reset(up_id)
            raise
        finally:
            if body is not None:
                body.cancel()
                with contextlib.suppress(BaseException):
                    await body
            app.forget(up_id)

    async def _client_body(self, app: H2Peer, up_id: int, vm_id: str) -> None:
        routes = self.owner.pool.admission.routes
        while True:
            async with asyncio.timeout(BODY_IDLE_TIMEOUT):
                event = await self.events.get()
            if event is None:
                raise StreamGone("client stream reset")
            if event is _END:
                await app.end(up_id)
                return
            if isinstance(event, bytes):
                routes.record_activity(vm_id)
                await app.send_data(up_id, event)
                self.owner.engine.consumed(self.stream_id, len(event))
                self.owner.flush_soon()
            else:
                await app.send_headers(up_id, event, end=True)
                self.events.get_nowait()  # the end that follows trailers
                return

    async def _response(self, app: H2Peer, up_id: int) -> None:
        engine, stream_id = self.owner.engine, self.stream_id
        queue = app.queue(up_id)
        while True:
            async with asyncio.timeout(BODY_IDLE_TIMEOUT):
                event = await queue.get()
            if isinstance(event, ev.ResponseReceived):
                fields = [(k, host_only_cookie(v) if k == b"set-cookie" else v)
                          for k, v in event.headers or [] if k not in HOP_BY_HOP_H2]  # fmt: skip
                engine.send_headers(stream_id, fields, end=bool(event.stream_ended))
                self.owner.flush_soon()
                if event.stream_ended:
                    return
            elif isinstance(event, ev.DataReceived):
                await self._send(event.data or b"")
                app.acknowledge(up_id, event.flow_controlled_length or 0)
            elif isinstance(event, ev.TrailersReceived):
                engine.send_headers(stream_id, list(event.headers or []), end=True)
                self.owner.flush_soon()
                return
            elif isinstance(event, ev.StreamEnded):
                engine.send_data(stream_id, b"", end=True)
                self.owner.flush_soon()
                return
            elif event is None or isinstance(event, ev.StreamReset):
                raise StreamGone("the app reset the stream")

    async def _send(self, data: bytes) -> None:
        if not self.owner.engine.send_data(self.stream_id, data):
            if self.stream_id not in self.owner.engine.streams:
                raise StreamGone("client stream gone")
            self.window.clear()
        self.owner.flush_soon()
        async with asyncio.timeout(BODY_IDLE_TIMEOUT):
            await self.window.wait()
            await self.room.wait()
