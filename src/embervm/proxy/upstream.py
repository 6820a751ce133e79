"""How the proxy reaches a guest's port: the seam between the sessions and the network.

Every place that opens a connection to an app goes through an ``Upstream``: ``connect(target)``
gives streams (the stream-based sessions, h2c apps), ``link(target, factory)`` a connection
served by the protocol ``factory`` makes (the callback relays). Both raise ``OSError`` or
``TimeoutError`` when the guest does not answer (the sessions answer 502, "The app is not
answering on port N") and ``NotHere`` when the route was stale: the VM does not run where it
was looked for.

- ``DirectUpstream`` (``embervm server``, one machine): a TCP connection to the guest's address
  on this host, exactly as the sessions made it before the seam.
- ``TunnelUpstream`` (a fleet's ``--role proxy``, issue #13): the VM's host's tunnel listener,
  dialled with the fleet's key (``embervm.tunnel_wire``, ``host_dial``); the guest's address on
  its host is of no use to the proxy, only the host id, the VM id and the port count. Hosts'
  addresses come from an injected loader (the store's host rows, read by whoever composes the
  proxy: the proxy does not import the store), cached in ``HostAddresses``.

``reach`` is the re-resolve rule every session applies around an attempt: on ``NotHere`` the
VM is resolved again from the store (``Admission.reresolve``, which bypasses core's cache) and
the attempt made once more; a second ``NotHere`` is answered as a VM that is not running (502).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar, cast

from embervm.proxy.admission import NOT_RUNNING, Admission, Refusal, Target
from embervm.proxy.host_dial import (
    GuestUnreachable,
    NotHere,
    TunnelError,
    TunnelRefused,
    dial_via_host,
    split_address,
)
from embervm.proxy.limits import CONNECT_TIMEOUT
from embervm.proxy.streams import open_upstream
from embervm.tunnel_wire import MAX_ANSWER, Answer, check_key, new_preamble, parse_answer

log = logging.getLogger("embervm.proxy.upstream")

P = TypeVar("P", bound=asyncio.Protocol)
T = TypeVar("T")
Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
HostLoader = Callable[[], Awaitable[Mapping[str, str]]]
"""Every host's tunnel address (``ADDR:PORT``) by host id: the store's host rows."""

REFRESH_INTERVAL = 1.0  # seconds: the hosts' addresses are read at most this often


class Upstream(Protocol):
    async def connect(self, target: Target) -> Streams:
        """Streams to the target's port (``OSError``/``TimeoutError``; ``NotHere``)."""
        ...

    async def link(self, target: Target, factory: Callable[[], P]) -> P:
        """A connection to the target's port served by ``factory()``, as
        ``loop.create_connection`` makes one (``OSError``/``TimeoutError``; ``NotHere``)."""
        ...


class DirectUpstream:
    """The guest's port at its address on this machine (``embervm server``)."""

    async def connect(self, target: Target) -> Streams:
        return await open_upstream(target.address, target.port)

    async def link(self, target: Target, factory: Callable[[], P]) -> P:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, protocol = await loop.create_connection(factory, target.address, target.port)
        return protocol


DIRECT = DirectUpstream()


async def reach(
    admission: Admission, target: Target, attempt: Callable[[Target], Awaitable[T]]
) -> tuple[Target, T]:
    """``attempt(target)``, and the target it succeeded with. On ``NotHere`` the VM is
    resolved again from the store and ``attempt`` made once more with what that says; a second
    ``NotHere`` is ``Refusal(502)``, as for a VM that is not running. The re-resolve's
    refusals are ``admit``'s (404 for a VM that is gone, 502/503 for a resume that fails)."""
    try:
        return target, await attempt(target)
    except NotHere as exc:
        log.debug("%s: %s; resolving it again", target.microvm_id, exc)
    target = await admission.reresolve(target)
    try:
        return target, await attempt(target)
    except NotHere as exc:
        log.info("%s is not where the store says (%s): answered as not running",
                 target.microvm_id, exc)  # fmt: skip
        raise Refusal(502, NOT_RUNNING) from None


class HostAddresses:
    """Host id → tunnel address, read through ``load`` and cached: read again when a host is
    not known, or after ``stale()`` (a NOT_HERE, a host that did not answer), at most once
    per ``interval`` seconds and one read at a time. Between reads nothing touches the store:
    a known, fresh host costs a dict lookup. A read that fails keeps what was known."""

    def __init__(
        self,
        load: HostLoader,
        *,
        interval: float = REFRESH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.load = load
        self.interval = interval
        self.clock = clock
        self.known: dict[str, str] = {}
        self.fresh = False
        self.read_at = -math.inf
        self.reads = 0
        self._reading: asyncio.Task[None] | None = None

    def stale(self) -> None:
        """Read again at the next chance (within the interval's bound)."""
        self.fresh = False

    async def address(self, host_id: str) -> str | None:
        address = self.known.get(host_id)
        if address is not None and self.fresh:
            return address
        if self._reading is None and self.clock() - self.read_at >= self.interval:
            self.read_at = self.clock()
            self._reading = asyncio.create_task(self._read())
        if self._reading is not None:
            await asyncio.shield(self._reading)
        return self.known.get(host_id)

    async def _read(self) -> None:
        self.reads += 1
        try:
            rows = await self.load()
            known: dict[str, str] = {}
            for host_id, address in rows.items():
                try:
                    split_address(address)
                except ValueError:
                    log.warning("host %s has no usable tunnel address: %r", host_id, address)
                    continue
                known[host_id] = address
            self.known = known
            self.fresh = True
        except Exception as exc:  # the store is away: what was known still routes
            log.warning("reading the fleet's host addresses failed: %r", exc)
        finally:
            self._reading = None


class TunnelUpstream:
    """The guest's port through the tunnel of the host that runs the VM (a fleet's proxy).

    ``host_addresses`` loads every host's ``ADDR:PORT`` by id, e.g. from the store's host rows::

        async def host_addresses() -> dict[str, str]:
            return {h.host_id: h.address for h in await registry.list_hosts()}

    It is called on a miss, after a NOT_HERE and after a host that did not answer, at most
    once per ``refresh_interval`` (``HostAddresses``). A target whose host is not known is
    ``NotHere`` (its route may be stale too); the host's answers as ``dial_via_host`` raises
    them."""

    def __init__(
        self,
        key: bytes,
        host_addresses: HostLoader,
        *,
        timeout: float = CONNECT_TIMEOUT,  # connect, preamble and answer, in all
        refresh_interval: float = REFRESH_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.key = check_key(key)
        self.hosts = HostAddresses(host_addresses, interval=refresh_interval, clock=clock)
        self.timeout = timeout

    async def connect(self, target: Target) -> Streams:
        address = await self._address(target)
        try:
            return await dial_via_host(address, self.key, target.microvm_id, target.port,
                                       timeout=self.timeout)  # fmt: skip
        except BaseException as exc:
            self._failed(exc)
            raise

    async def link(self, target: Target, factory: Callable[[], P]) -> P:
        address = await self._address(target)
        try:
            return await _link_via_host(address, self.key, target, factory, self.timeout)
        except BaseException as exc:
            self._failed(exc)
            raise

    async def _address(self, target: Target) -> str:
        host_id = target.host_id
        async with asyncio.timeout(self.timeout):
            address = None if host_id is None else await self.hosts.address(host_id)
        if address is None:
            raise NotHere(f"{target.microvm_id} is placed on host {host_id}, which is not known")
        return address

    def _failed(self, exc: BaseException) -> None:
        """A NOT_HERE, or a host that did not answer (it may have a new address): read the
        hosts' addresses again. The host's other answers say nothing about its address."""
        if isinstance(exc, NotHere) or (
            isinstance(exc, OSError) and not isinstance(exc, GuestUnreachable | TunnelRefused)
        ):
            self.hosts.stale()


class _Opening(asyncio.Protocol):
    """A tunnel's opening on protocol callbacks: send the preamble, read the host's answer
    line (at most ``MAX_ANSWER`` bytes), then stop reading until the transport is handed on."""

    transport: asyncio.Transport

    def __init__(self, preamble: bytes) -> None:
        self.preamble = preamble
        self.buffer = b""
        self.answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self.transport.write(self.preamble)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.answered.done():
            return
        end = self.buffer.find(b"\n", 0, MAX_ANSWER)
        if end < 0 and len(self.buffer) < MAX_ANSWER:
            return
        end = end + 1 if end >= 0 else MAX_ANSWER
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        self.transport.pause_reading()
        self.answered.set_result(line)

    def eof_received(self) -> bool:
        self.eof = True
        if not self.answered.done():
            self.answered.set_exception(TunnelError("the host closed the tunnel before answering"))
            return False
        return True  # the app's protocol hears of it when it takes over

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if not self.answered.done():
            self.answered.set_exception(TunnelError("the host closed the tunnel before answering"))


async def _link_via_host(
    address: str,
    key: bytes,
    target: Target,
    factory: Callable[[], P],
    timeout: float,  # noqa: ASYNC109  # the one deadline of connect, preamble and answer
) -> P:
    """``dial_via_host`` for protocols: the connection, after the host's ``OK``, served by
    ``factory()`` with whatever bytes came behind the answer."""
    vm, port = target.microvm_id, target.port
    preamble = new_preamble(key, vm, port)
    host, host_port = split_address(address)
    loop = asyncio.get_running_loop()
    opening: _Opening | None = None
    try:
        async with asyncio.timeout(timeout):
            _, opening = await loop.create_connection(lambda: _Opening(preamble), host, host_port)
            line = await opening.answered
        answer = parse_answer(line)
        if answer is not Answer.OK:
            raise _refused(answer, line, address, vm, port)
        if opening.lost:
            raise ConnectionResetError(f"{address} closed the tunnel to {vm} after OK")
    except BaseException:
        if opening is not None:
            opening.transport.abort()
        raise
    transport = opening.transport
    app = factory()
    transport.set_protocol(app)
    app.connection_made(transport)
    if opening.buffer:
        app.data_received(opening.buffer)
    if opening.eof and not app.eof_received():
        transport.close()
    if not transport.is_closing():
        transport.resume_reading()
    return app


def _refused(answer: Answer | None, line: bytes, address: str, vm: str, port: int) -> Exception:
    """What ``dial_via_host`` raises for the same answer."""
    if answer is Answer.NOT_HERE:
        return NotHere(f"{vm} does not run on {address}")
    if answer is Answer.UNREACHABLE:
        return GuestUnreachable(f"{vm} port {port} does not answer on {address}")
    if answer is Answer.REFUSED:
        return TunnelRefused(f"{address} refused the tunnel (fleet key or clock?)")
    return TunnelError(f"{address} answered {line[:MAX_ANSWER]!r}")
