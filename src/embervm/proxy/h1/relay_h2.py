"""An HTTP/1.1 client's request sent to the app as h2c (``X-aws-proxy-force-h2: true``, for
apps that speak only HTTP/2 on their plaintext port).

The request becomes one stream on an h2c connection kept by the client's session (one per VM
port, reused for its next requests); the answer goes back as HTTP/1.1, chunked when the app
gave no length, with the app's trailers as chunked trailers. Bodies flow both ways at once;
data is acknowledged to the app only after the client accepted it.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

import h2.events as ev

from embervm.proxy.admission import strip_headers
from embervm.proxy.h1.wire import (
    CRLF,
    NONE,
    Head,
    body_chunks,
    host_only_cookie,
    serialize,
    status_line,
)
from embervm.proxy.h2c_upstream import H2Peer, H2Upstream, Header, StreamGone
from embervm.proxy.limits import BODY_IDLE_TIMEOUT, HOP_BY_HOP_H2, READ_SIZE


class Http1Client(Protocol):
    """What a force-h2 request needs of the client's HTTP/1.1 connection (``h1.session``'s
    ``Http1Session``, which imports this module: typed by shape, not by its class)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answered: bool  # a response head went to the client for the current request


async def relay(session: Http1Client, app: H2Upstream, request: Head, framing: int) -> bool:
    """Serve one request over ``app``; True when the client connection may carry another."""
    peer = app.peer
    stream_id = peer.conn.get_next_available_stream_id()
    responses = peer.queue(stream_id)
    head: list[Header] = [(b":method", request.method), (b":scheme", b"http"),
                          (b":authority", request.get(b"host") or b""),
                          (b":path", request.target)]  # fmt: skip
    head += [(k, v) for k, v in strip_headers(request.fields)
             if k not in HOP_BY_HOP_H2 or (k == b"te" and v.lower() == b"trailers")]  # fmt: skip
    body: asyncio.Task[None] | None = None
    try:
        await peer.send_headers(stream_id, head, end=framing == NONE)
        if framing != NONE:
            body = asyncio.create_task(_request_body(session, peer, stream_id, framing))
        done = await _response(session, peer, stream_id, responses)
        return done and (body is None or (body.done() and body.exception() is None))
    except StreamGone:
        peer.reset(stream_id)
        raise ConnectionError("the app reset the stream") from None
    finally:
        if body is not None:
            if not body.done():
                body.cancel()
            with contextlib.suppress(BaseException):
                await body
        peer.forget(stream_id)


async def _request_body(session: Http1Client, peer: H2Peer, stream_id: int, framing: int) -> None:
    async for data in body_chunks(session.reader, framing, READ_SIZE, BODY_IDLE_TIMEOUT):
        await peer.send_data(stream_id, data)
    await peer.end(stream_id)


async def _response(
    session: Http1Client, peer: H2Peer, stream_id: int, events: asyncio.Queue[ev.Event | None]
) -> bool:
    writer = session.writer
    chunked = False
    while True:
        async with asyncio.timeout(BODY_IDLE_TIMEOUT):
            event = await events.get()
        if isinstance(event, ev.ResponseReceived):
            raw = list(event.headers or [])
            status = int(next((v for k, v in raw if k == b":status"), b"502"))
            fields = [
                (k, host_only_cookie(v) if k == b"set-cookie" else v)
                for k, v in raw
                if not k.startswith(b":") and k not in HOP_BY_HOP_H2
            ]
            if status >= 200 and not event.stream_ended:
                chunked = not any(k == b"content-length" for k, _ in fields)
                if chunked:
                    fields.append((b"transfer-encoding", b"chunked"))
            elif event.stream_ended and status >= 200:
                fields = [(k, v) for k, v in fields if k != b"content-length"]
                fields.append((b"content-length", b"0"))
            session.answered = status >= 200
            writer.write(serialize(status_line(status), fields))
            await writer.drain()
            if event.stream_ended:
                return True
        elif isinstance(event, ev.DataReceived):
            data = event.data or b""
            if data:
                writer.write(b"%x\r\n%s\r\n" % (len(data), data) if chunked else data)
                await writer.drain()
            peer.acknowledge(stream_id, event.flow_controlled_length or 0)
        elif isinstance(event, ev.TrailersReceived):
            if chunked:
                trailers = [(k, v) for k, v in event.headers or [] if k not in HOP_BY_HOP_H2]
                writer.write(b"0\r\n" + b"".join(b"%s: %s\r\n" % kv for kv in trailers) + CRLF)
                await writer.drain()
            return True
        elif isinstance(event, ev.StreamEnded):
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            return True
        elif event is None or isinstance(event, ev.StreamReset):
            raise StreamGone("the app closed the stream")
