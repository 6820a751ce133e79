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
   or either side breaks (then both are closed). Each direction reads only while the other
   side's writes drain (backpressure). Bytes from the proxy are activity: ``on_activity``
   gets the VM id, at most once per second per connection.

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
from typing import Any

from embervm.tunnel_wire import MAX_PREAMBLE, REPLAY_CAPACITY, Answer, PreambleVerifier, Refusal

log = logging.getLogger("embervm.host.tunnel")

READ_SIZE = 64 * 1024  # one read from either socket; each reader buffers at most about twice
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


def _socket_options(writer: asyncio.StreamWriter, *, reset: bool = False) -> None:
    sock: Any = writer.get_extra_info("socket")
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


async def _read_preamble(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | str:
    """The preamble line (LF included) and whatever came after it in the same reads, never
    reading more than ``MAX_PREAMBLE`` bytes in all; or why there is none."""
    data = b""
    while (end := data.find(b"\n")) < 0:
        if len(data) >= MAX_PREAMBLE:
            return f"no line end in the first {MAX_PREAMBLE} bytes"
        chunk = await reader.read(MAX_PREAMBLE - len(data))
        if not chunk:
            return "closed before its preamble"
        data += chunk
    return data[: end + 1], data[end + 1 :]


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    on_data: Callable[[], None] | None,
) -> bool:
    """Copy until EOF, each write drained before the next read, then half-close ``writer``:
    True. False when either side broke."""
    try:
        while data := await reader.read(READ_SIZE):
            if on_data is not None:
                on_data()
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        return True
    except (ConnectionError, OSError):
        return False


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
        self._tasks: set[asyncio.Task[Any]] = set()
        self.refusals = QuietLog(log)  # peers that get no tunnel
        self.errors = QuietLog(log)  # the host's own bugs (resolve, on_activity)

    @property
    def port(self) -> int:
        return self._port

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self._port, limit=READ_SIZE, backlog=1024
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening and end every connection."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        self._server = None
        await asyncio.sleep(0)  # the aborted transports close their sockets

    def _take(self, peer: str) -> bool:
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

    def _release(self, peer: str) -> None:
        self.held -= 1
        left = self._by_peer[peer] - 1
        if left:
            self._by_peer[peer] = left
        else:
            del self._by_peer[peer]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        peer = str(peername[0]) if peername else "?"
        if not self._take(peer):
            self.refusals.warning("tunnel: turned %s away: over a connection cap", peer)
            _socket_options(writer, reset=True)
            writer.transport.abort()
            return
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        pending = True
        clean = True  # False: close both sides at once, whatever is still buffered
        guest: asyncio.StreamWriter | None = None
        try:
            _socket_options(writer)
            try:
                async with asyncio.timeout(self.limits.preamble_timeout):
                    read = await _read_preamble(reader)
            except TimeoutError:
                read = f"no preamble within {self.limits.preamble_timeout:g} s"
            except (ConnectionError, OSError) as exc:
                read = f"broke in its preamble: {exc!r}"
            if isinstance(read, str):
                self.refusals.warning("tunnel: cut %s: %s", peer, read)
                clean = False  # nothing to say to it
                return
            line, early = read
            preamble = self.verifier.verify(line)
            self.pending -= 1
            pending = False
            if isinstance(preamble, Refusal):
                self.refusals.warning("tunnel: refused %s: %s", peer, preamble.value)
                writer.write(Answer.REFUSED.line)
                return
            vm, port = preamble.microvm_id, preamble.port
            address = self.resolve(vm)
            if address is None:
                log.debug("tunnel: %s is not here (asked by %s)", vm, peer)
                writer.write(Answer.NOT_HERE.line)
                return
            try:
                async with asyncio.timeout(self.limits.connect_timeout):
                    guest_reader, guest = await asyncio.open_connection(
                        address, port, limit=READ_SIZE
                    )
            except (OSError, TimeoutError) as exc:
                log.debug("tunnel: %s port %d unreachable at %s: %r", vm, port, address, exc)
                writer.write(Answer.UNREACHABLE.line)
                return
            _socket_options(guest)
            writer.write(Answer.OK.line)
            clean = await self._relay(vm, (reader, writer), (guest_reader, guest), early)
        except Exception as exc:  # resolve() broke: close without an answer
            clean = False
            self.errors.warning("tunnel: serving %s failed: %r", peer, exc, exc_info=True)
        except asyncio.CancelledError:  # stop(): this task is the connection's own, and
            clean = False  # ends here (3.11's StreamReaderProtocol logs a cancelled one)
        finally:
            if pending:
                self.pending -= 1
            for side in (writer, guest):
                if side is None:
                    continue
                if clean:  # an answer or the relay's last bytes may be buffered: flush them
                    side.close()
                else:
                    side.transport.abort()
            self._release(peer)
            self._tasks.discard(task)

    async def _relay(
        self,
        vm: str,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        guest: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        early: bytes,
    ) -> bool:
        """Relay until both directions end (True) or a side breaks (False)."""
        activity = None
        if self.on_activity is not None:
            activity = _Activity(self.on_activity, vm, self.errors)
        if early:  # sent right behind the preamble, before our answer
            if activity is not None:
                activity()
            guest[1].write(early)
        inbound = asyncio.create_task(_pipe(client[0], guest[1], activity))
        outbound = asyncio.create_task(_pipe(guest[0], client[1], None))
        try:
            pending: set[asyncio.Task[bool]] = {inbound, outbound}
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if not all(task.result() for task in done):
                    return False
            return True
        finally:
            inbound.cancel()
            outbound.cancel()
