"""``TunnelListener``: where a fleet's endpoint proxies reach the guests of this host.

A proxy dials the host's ``--advertise`` address and sends one preamble line
(``embervm.tunnel_wire``: a MicroVM id, a port, a timestamp, a nonce, an HMAC with the fleet's
key). Per connection the listener

1. reads the preamble, at most ``MAX_PREAMBLE`` bytes within ``preamble_timeout`` (5 s; a
   connection that has not sent it by then is cut without an answer);
2. verifies it (shape, MAC, ±30 s, replay): ``REFUSED`` and close if it fails;
3. asks ``resolve(microvm_id)`` where that VM's guest is on this host: None is ``NOT_HERE``
   (the proxy re-resolves), and close;
4. connects to the guest's address and port within ``connect_timeout`` (10 s):
   ``UNREACHABLE`` and close if that fails;
5. answers ``OK`` and relays both ways until both directions end (a half-close is passed on)
   or either side breaks (then both are reset). Bytes from the proxy are activity:
   ``on_activity`` gets the VM id, at most once per second per connection.

The relay runs on protocol callbacks, like the proxy's HTTP/1.1 relay: no task or stream per
direction, a chunk read from one socket is written to the other at once, and a side is not
read while the other side's write buffer is over its high-water mark (backpressure; 64 KiB
plus the sockets' buffers in flight per direction). The preamble is read on the same
callbacks; only the connect to the guest runs in a task, with both sockets paused meanwhile
(a proxy that leaves then is noticed once the connect ends).

Endpoint tokens are the proxy's business; this listener only knows that the dialer holds the
key. An idle relay is the proxy's to time out; when the proxy or the guest goes away without a
word, TCP keepalive on both sockets ends the relay within about two minutes.

Bounds: connections in all and per peer address (``TunnelLimits``; one over a cap is reset as
soon as it is accepted, before a read), connections still in their preamble in all (so
unauthenticated peers cannot take every slot), the preamble's size and deadline, the replay
cache's entries. Refusals are logged at most once per ``LOG_INTERVAL`` (with the count of those
held back): a scanner cannot fill the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

from embervm.tunnel_wire import (
    MAX_PREAMBLE,
    REPLAY_CAPACITY,
    Answer,
    Preamble,
    PreambleVerifier,
    Refusal,
)

log = logging.getLogger("embervm.host.tunnel")

ACTIVITY_INTERVAL = 1.0  # seconds: on_activity at most this often per connection
LOG_INTERVAL = 10.0  # seconds between two log lines about refusals
KEEPALIVE = (60, 10, 6)  # TCP keepalive: idle seconds, seconds between probes, probes


@dataclass(frozen=True)
class TunnelLimits:
    max_connections: int = 10_000  # in all (each holds a second socket, to its guest)
    max_per_peer: int = 4_000  # per peer address (a peer is a proxy)
    max_pending: int = 1_024  # in all, still in their preamble: not yet authenticated
    preamble_timeout: float = 5.0
    connect_timeout: float = 10.0  # to the guest's port
    replay_capacity: int = REPLAY_CAPACITY


class QuietLog:
    """A warning at most once per ``interval`` seconds; the next says how many it held back."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL) -> None:
        self.logger = logger
        self.interval = interval
        self.held_back = 0
        self._next = 0.0

    def warning(self, message: str, *args: object, exc_info: bool = False) -> None:
        now = time.monotonic()
        if now < self._next:
            self.held_back += 1
            return
        self._next = now + self.interval
        if self.held_back:
            message += " (and %d more in the last %.0f s)"
            args = (*args, self.held_back, self.interval)
            self.held_back = 0
        self.logger.warning(message, *args, exc_info=exc_info)


def _socket_options(transport: asyncio.BaseTransport, *, reset: bool = False) -> None:
    sock: Any = transport.get_extra_info("socket")
    if sock is None:
        return
    with contextlib.suppress(OSError):
        if reset:  # close with a reset: no TIME_WAIT kept for a connection turned away
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            return
        idle, interval, count = KEEPALIVE
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)


class _Activity:
    """Calls ``callback(microvm_id)`` at most once per ``ACTIVITY_INTERVAL``."""

    __slots__ = ("callback", "errors", "loop", "microvm_id", "next_call")

    def __init__(self, callback: Callable[[str], None], microvm_id: str, errors: QuietLog) -> None:
        self.callback = callback
        self.microvm_id = microvm_id
        self.errors = errors
        self.loop = asyncio.get_running_loop()
        self.next_call = 0.0

    def __call__(self) -> None:
        now = self.loop.time()
        if now < self.next_call:
            return
        self.next_call = now + ACTIVITY_INTERVAL
        try:
            self.callback(self.microvm_id)
        except Exception as exc:  # a bug of the host's; the relay goes on
            self.errors.warning("tunnel on_activity(%s) failed: %r", self.microvm_id, exc)


class _Side(asyncio.Protocol):
    """One socket of a relay, on protocol callbacks (no task, no stream per direction): what
    it reads is written to the other side's transport, and it is not read while the other
    side's write buffer is over its high-water mark (backpressure both ways). An EOF is
    passed on as a half-close; when both directions have ended, both sockets close; when one
    breaks, both are reset."""

    transport: asyncio.Transport
    other: _Side | None = None
    eof = False
    full = False  # our write buffer is over its high-water mark: the other side is paused
    activity: _Activity | None = None

    def data_received(self, data: bytes) -> None:
        other = self.other
        if other is not None:
            if self.activity is not None:
                self.activity()
            other.transport.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        other = self.other
        if other is None:
            return False
        if other.eof:  # both directions have ended: close both (their buffers are flushed)
            other.transport.close()
            return False
        other.transport.write_eof()
        return True  # keep ours open: the other direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        other = self.other
        if other is not None and not other.transport.is_closing():
            if exc is None and self.eof and other.eof:
                other.transport.close()
            else:  # it broke (or ended without its EOF): the other side is of no use
                other.transport.abort()

    def pause_writing(self) -> None:
        self.full = True
        if self.other is not None and not self.other.transport.is_closing():
            self.other.transport.pause_reading()

    def resume_writing(self) -> None:
        self.full = False
        if self.other is not None and not self.other.transport.is_closing():
            self.other.transport.resume_reading()


class _Guest(_Side):
    """The connection to the guest's port: not read until it is linked to its client."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.pause_reading()
        _socket_options(transport)


class _Client(_Side):
    """A connection from a proxy: its preamble, then its half of the relay."""

    def __init__(self, listener: TunnelListener) -> None:
        self.listener = listener
        self.peer = "?"
        self.admitted = False  # holds a slot of the caps
        self.pending = False  # holds a slot of the connections in their preamble
        self.buffer = b""
        self.timer: asyncio.TimerHandle | None = None
        self.opening: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        peername = transport.get_extra_info("peername")
        self.peer = str(peername[0]) if peername else "?"
        listener = self.listener
        if not listener.take(self.peer):
            listener.refusals.warning("tunnel: turned %s away: over a connection cap", self.peer)
            _socket_options(transport, reset=True)
            self.transport.abort()
            return
        self.admitted = self.pending = True
        listener.clients.add(self)
        _socket_options(transport)
        timeout = listener.limits.preamble_timeout
        reason = f"no preamble within {timeout:g} s"
        self.timer = asyncio.get_running_loop().call_later(timeout, self.cut, reason)

    def data_received(self, data: bytes) -> None:
        if self.other is not None:
            super().data_received(data)
            return
        if not self.pending:  # not linked yet, reading paused: a late chunk waits with the rest
            self.buffer += data
            return
        self.buffer += data
        end = self.buffer.find(b"\n", 0, MAX_PREAMBLE)
        if end < 0:
            if len(self.buffer) >= MAX_PREAMBLE:
                self.cut(f"no line end in the first {MAX_PREAMBLE} bytes")
            return
        line, self.buffer = self.buffer[: end + 1], self.buffer[end + 1 :]
        self.leave_pending()
        preamble = self.listener.verifier.verify(line)
        if isinstance(preamble, Refusal):
            self.listener.refusals.warning("tunnel: refused %s: %s", self.peer, preamble.value)
            self.answer(Answer.REFUSED)
            return
        self.transport.pause_reading()  # until linked to the guest
        self.opening = asyncio.get_running_loop().create_task(self.listener.open(self, preamble))

    def eof_received(self) -> bool:
        if self.other is None:
            self.cut("closed before its preamble" if self.pending else "closed while opening")
            return False
        return super().eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.leave_pending()
        if self.opening is not None:
            self.opening.cancel()
        if self.admitted:
            self.admitted = False
            self.listener.release(self.peer)
            self.listener.clients.discard(self)

    def leave_pending(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        if self.pending:
            self.pending = False
            self.listener.pending -= 1

    def cut(self, reason: str) -> None:
        """End a connection that gets no answer."""
        if self.pending:
            self.listener.refusals.warning("tunnel: cut %s: %s", self.peer, reason)
        self.transport.abort()

    def answer(self, answer: Answer) -> None:
        """The answer that ends the connection."""
        self.transport.write(answer.line)
        self.transport.close()


class TunnelListener:
    """Serves the fleet tunnel on ``host:port`` (``port`` 0: any; the ``port`` property says
    which once started). ``resolve(microvm_id)`` is the guest's address if the VM runs on this
    host, else None; ``on_activity(microvm_id)`` hears of bytes from the proxy."""

    def __init__(
        self,
        key: bytes,
        resolve: Callable[[str], str | None],
        *,
        host: str,
        port: int,
        limits: TunnelLimits | None = None,
        on_activity: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.limits = limits or TunnelLimits()
        self.verifier = PreambleVerifier(
            key, replay_capacity=self.limits.replay_capacity, clock=clock
        )
        self.resolve = resolve
        self.on_activity = on_activity
        self.host = host
        self._port = port
        self.held = 0
        self.pending = 0
        self._by_peer: dict[str, int] = {}
        self._server: asyncio.Server | None = None
        self.clients: set[_Client] = set()
        self.refusals = QuietLog(log)  # peers that get no tunnel
        self.errors = QuietLog(log)  # the host's own bugs (resolve, on_activity)

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Client(self), self.host, self._port, backlog=1024
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and end every connection."""
        if self._server is None:
            return
        self._server.close()
        clients = list(self.clients)
        for client in clients:
            client.transport.abort()  # cancels its opening; resets its guest connection
        opening = [client.opening for client in clients if client.opening is not None]
        await asyncio.gather(*opening, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        await asyncio.sleep(0)  # the aborted transports close their sockets

    def take(self, peer: str) -> bool:
        """A slot for a new connection from ``peer``, unless that is over a cap."""
        on_peer = self._by_peer.get(peer, 0)
        limits = self.limits
        if (
            self.held >= limits.max_connections
            or on_peer >= limits.max_per_peer
            or self.pending >= limits.max_pending
        ):
            return False
        self.held += 1
        self.pending += 1
        self._by_peer[peer] = on_peer + 1
        return True

    def release(self, peer: str) -> None:
        self.held -= 1
        left = self._by_peer[peer] - 1
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]

    async def open(self, client: _Client, preamble: Preamble) -> None:
        """Link a verified client to its guest, or answer why not."""
        vm, port = preamble.microvm_id, preamble.port
        try:
            address = self.resolve(vm)
        except Exception as exc:  # the host's bug: close without an answer
            self.errors.warning("tunnel: resolve(%s) failed: %r", vm, exc, exc_info=True)
            client.transport.abort()
            return
        if address is None:
            log.debug("tunnel: %s is not here (asked by %s)", vm, client.peer)
            client.answer(Answer.NOT_HERE)
            return
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.limits.connect_timeout):
                _, guest = await loop.create_connection(_Guest, address, port)
        except (OSError, TimeoutError) as exc:
            log.debug("tunnel: %s port %d unreachable at %s: %r", vm, port, address, exc)
            client.answer(Answer.UNREACHABLE)
            return
        if client.transport.is_closing():  # the proxy went away meanwhile
            guest.transport.abort()
            return
        client.other, guest.other = guest, client
        if self.on_activity is not None:
            client.activity = _Activity(self.on_activity, vm, self.errors)
        client.transport.write(Answer.OK.line)
        early, client.buffer = client.buffer, b""
        if early:  # sent right behind the preamble, before our answer
            client.data_received(early)
        if not guest.full:  # the early bytes may have filled the guest's buffer already
            client.transport.resume_reading()
        guest.transport.resume_reading()
