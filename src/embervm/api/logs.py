"""Embervm's log-streaming extension endpoints (not in the AWS model; SigV4 like the rest).

- ``GET /embervm/v1/microvm-images/{name}/versions/{version}/logs[?follow=true]``: the
  build's JSON log records, one per line;
- ``GET /embervm/v1/microvms/{microvm_id}/logs[?follow=true]``: the app's output, one line each.

Mounted with ``create_api_app(..., extra_routes=log_routes(operations))``: the app has verified
SigV4 before a handler runs, and the handler passes :func:`caller_of` on to core, which raises
``NotFoundError`` for a resource the caller cannot see before any line is sent — so an unknown
resource gets the model's ``ResourceNotFoundException`` shape (404), bad input the
``ValidationException`` one (400), like every other operation.

Every line comes from a guest or a build, so it is bounded: at most ``MAX_LINE_BYTES`` bytes
(UTF-8), with no line break inside (``\\r``/``\\n`` become spaces). ``follow=true`` keeps the
response open and sends lines as the source yields them, until the source ends (the build or
the VM ended), the client disconnects (noticed at once, even while no line comes: Starlette
only watches for a disconnect under ASGI spec < 2.4), or ``MAX_STREAM_SECONDS`` (a VM's
maximum lifetime and then some) pass. Each way, the source's generator is closed, so no
reader outlives its client. Lines already read go out together (``BATCH_BYTES`` per write):
a whole log is sent in big writes, a followed line as soon as it comes.

A follower holds its stream (and a poller of its file) for hours, so their number is bounded:
at most ``MAX_FOLLOWERS`` at once on the server and ``MAX_FOLLOWERS_PER_KEY`` per access key;
one more is answered 429 ``ThrottlingException`` before anything is looked up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Protocol

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from embervm.api._dispatch import caller_of
from embervm.api._errors import serialize_error
from embervm.core.caller import Caller
from embervm.errors import ApiError, InternalError, ThrottledError, ValidationError

log = logging.getLogger("embervm.api.logs")

MAX_LINE_BYTES = 64 * 1024
BATCH_BYTES = 64 * 1024
QUEUED_LINES = 1024  # read ahead of a slow client at most this many lines
MAX_STREAM_SECONDS = 9 * 3600  # RunMicrovm's maximumDurationInSeconds is at most 8 h
MAX_FOLLOWERS = 64  # open follow=true streams on this server
MAX_FOLLOWERS_PER_KEY = 8  # ... and of one access key
FOLLOWER_RETRY_SECONDS = 5
_FOLLOW_VALUES = {"true": True, "1": True, "false": False, "0": False}
_MEDIA_TYPE = "text/plain; charset=utf-8"


class LogLines(Protocol):
    """What ``embervm.core.Operations`` offers for logs: each raises ``NotFoundError`` (or
    another ``ApiError``) when awaited for an unknown resource, then the lines come."""

    async def build_log_lines(
        self, image: str, version: str, follow: bool = False, *, caller: Caller | None = None
    ) -> AsyncIterator[str]: ...

    async def app_log_lines(
        self, microvm_id: str, follow: bool = False, *, caller: Caller | None = None
    ) -> AsyncIterator[str]: ...


def encode_line(line: str) -> bytes:
    """One record on one line, at most ``MAX_LINE_BYTES`` bytes plus its ``\\n``."""
    data = line.replace("\r", " ").replace("\n", " ").encode("utf-8", "replace")
    if len(data) > MAX_LINE_BYTES:  # cut on a character boundary, not inside one
        data = data[:MAX_LINE_BYTES].decode("utf-8", "ignore").encode()
    return data + b"\n"


class Followers:
    """Counts the open ``follow=true`` streams, refusing one over either cap."""

    def __init__(self, limit: int = MAX_FOLLOWERS, per_key: int = MAX_FOLLOWERS_PER_KEY) -> None:
        self.limit = limit
        self.per_key = per_key
        self._by_key: Counter[str] = Counter()

    @property
    def open(self) -> int:
        return self._by_key.total()

    def take(self, key: str) -> Callable[[], None]:
        """A slot for ``key`` (``ThrottledError`` when there is none); call the result once
        to give it back."""
        if self.open >= self.limit:
            raise ThrottledError(
                f"this server already streams {self.limit} followed logs; try again later",
                retry_after=FOLLOWER_RETRY_SECONDS,
            )
        if self._by_key[key] >= self.per_key:
            raise ThrottledError(
                f"this access key already follows {self.per_key} logs; "
                "close one or try again later",
                retry_after=FOLLOWER_RETRY_SECONDS,
            )
        self._by_key[key] += 1
        given_back = False

        def give_back() -> None:
            nonlocal given_back
            if not given_back:
                given_back = True
                self._by_key[key] -= 1
                if not self._by_key[key]:
                    del self._by_key[key]

        return give_back


def _follow(request: Request) -> bool:
    value = request.query_params.get("follow", "false").lower()
    if value not in _FOLLOW_VALUES:
        raise ValidationError(f"follow must be true or false, not {value[:20]!r}")
    return _FOLLOW_VALUES[value]


def _error(error: ApiError) -> Response:
    result = serialize_error(None, error)
    return Response(result.body, status_code=result.status, headers=dict(result.headers))


class LineStream:
    """A ``text/plain`` response streaming ``lines``; ends with the source, the client, or
    ``max_seconds`` — whichever comes first — and always closes the source."""

    def __init__(
        self,
        lines: AsyncIterator[str],
        max_seconds: float = MAX_STREAM_SECONDS,
        *,
        on_end: Callable[[], None] = lambda: None,  # gives back a follower's slot
    ) -> None:
        self.lines = lines
        self.max_seconds = max_seconds
        self.on_end = on_end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self._respond(receive, send)
        finally:
            self.on_end()

    async def _respond(self, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", _MEDIA_TYPE.encode()),
                    (b"cache-control", b"no-store"),
                    (b"x-content-type-options", b"nosniff"),
                ],
            }
        )
        streaming = asyncio.ensure_future(self._stream(send))
        watching = asyncio.ensure_future(_disconnected(receive))
        try:
            done, _ = await asyncio.wait(
                {streaming, watching},
                timeout=self.max_seconds,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            for task in (streaming, watching):
                task.cancel()
            await asyncio.gather(streaming, watching, return_exceptions=True)
            await _close(self.lines)
        failure = streaming.exception() if streaming in done else None
        if failure is not None:
            # The status is sent: the only honest signal left is a body that never ends
            # properly (the server closes the connection), never a clean end of the log.
            log.error("log stream failed: %r", failure, exc_info=failure)
            return
        if watching not in done:  # the source ended or the time ran out: end the body
            with contextlib.suppress(OSError):
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream(self, send: Send) -> None:
        """Send what the source has so far in one body chunk (up to ``BATCH_BYTES``): a log
        read at once goes out in big writes, a followed line goes out as soon as it comes."""
        queue: asyncio.Queue[bytes | Exception | None] = asyncio.Queue(QUEUED_LINES)
        producer = asyncio.ensure_future(self._produce(queue))
        try:
            ended = False
            while not ended:
                batch, item = bytearray(), await queue.get()
                while True:
                    if item is None or isinstance(item, Exception):
                        ended = True
                        break
                    batch += item
                    if len(batch) >= BATCH_BYTES or queue.empty():
                        break
                    item = queue.get_nowait()
                if batch:
                    await send(
                        {"type": "http.response.body", "body": bytes(batch), "more_body": True}
                    )
                if isinstance(item, Exception):
                    raise item
        finally:
            producer.cancel()
            await asyncio.gather(producer, return_exceptions=True)

    async def _produce(self, queue: asyncio.Queue[bytes | Exception | None]) -> None:
        try:
            async for line in self.lines:
                await queue.put(encode_line(line))
        except Exception as exc:  # handed to the sender, which fails the stream with it
            await queue.put(exc)
        else:
            await queue.put(None)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _close(lines: AsyncIterator[str]) -> None:
    close = getattr(lines, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def _no_slot() -> None:
    """What a request that took no follower's slot gives back."""


async def _respond(
    request: Request,
    open_lines: Callable[[bool], Awaitable[AsyncIterator[str]]],
    followers: Followers,
) -> Response | LineStream:
    """Take a follower's slot, look the resource up (errors answered in the model's shapes),
    then stream its lines."""
    give_back = _no_slot
    try:
        follow = _follow(request)
        if follow and request.method != "HEAD":
            give_back = followers.take(caller_of(request).access_key_id)
        lines = await open_lines(follow)
    except ApiError as exc:
        give_back()
        return _error(exc)
    except Exception:
        give_back()
        log.exception("opening %s failed", request.url.path[:200])
        return _error(InternalError("Internal server error"))
    if request.method == "HEAD":  # it exists; HEAD has no body to stream
        await _close(lines)
        return Response(status_code=200, media_type=_MEDIA_TYPE)
    return LineStream(lines, on_end=give_back)


def log_routes(source: LogLines, followers: Followers | None = None) -> list[BaseRoute]:
    """The two log endpoints over ``source`` (core's ``Operations``); ``followers`` bounds
    the open ``follow=true`` streams (default: the module's caps)."""
    slots = followers or Followers()

    async def build_logs(request: Request) -> Response | LineStream:
        name, version = request.path_params["name"], request.path_params["version"]
        caller = caller_of(request)
        return await _respond(
            request,
            lambda follow: source.build_log_lines(name, version, follow, caller=caller),
            slots,
        )

    async def app_logs(request: Request) -> Response | LineStream:
        microvm_id, caller = request.path_params["microvm_id"], caller_of(request)
        return await _respond(
            request, lambda follow: source.app_log_lines(microvm_id, follow, caller=caller), slots
        )

    return [
        Route(
            "/embervm/v1/microvm-images/{name}/versions/{version}/logs",
            build_logs,
            methods=["GET"],
        ),
        Route("/embervm/v1/microvms/{microvm_id}/logs", app_logs, methods=["GET"]),
    ]
