"""Who may reach what: the VM from the host name, the port, the token, the ingress connectors.

Every refusal is a ``Refusal(status, message)`` with a fixed, short message: a client learns
that it was refused, never why a token failed (that goes to the debug log).
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Protocol

from embervm import wire
from embervm.contracts import MICROVM_ID_RE
from embervm.core.lifecycle import ResolvedVm
from embervm.core.tokens import TokenRejected
from embervm.errors import (
    ConflictError,
    EmbervmError,
    InsufficientCapacityError,
    NotFoundError,
)
from embervm.proxy.limits import SESSION_IDLE_TIMEOUT, TOKEN_CHECK_INTERVAL
from embervm.proxy.streams import SessionLease

log = logging.getLogger("embervm.proxy")

DEFAULT_PORT = wire.APP_PORT
SHELL_PORT = wire.SHELL_PORT
AUTH_HEADER = wire.lower_bytes(wire.AUTH_HEADER)
PORT_HEADER = wire.lower_bytes(wire.PORT_HEADER)
FORCE_H2_HEADER = wire.lower_bytes(wire.FORCE_H2_HEADER)
PROXY_HEADER_PREFIX = wire.lower_bytes(wire.PROXY_HEADER_PREFIX)
SUBPROTOCOL_PREFIX = "lambda-microvms"
PORT_SUBPROTOCOL = "lambda-microvms.port."
AUTH_SUBPROTOCOL = "lambda-microvms.authentication."


class VmRoutes(Protocol):
    """What the proxy needs of core (``embervm.core.Lifecycle``)."""

    async def resolve(self, microvm_id: str) -> ResolvedVm: ...

    def resolved(self, microvm_id: str) -> ResolvedVm | None:
        """What ``resolve`` would answer without waiting, or None (not fresh: ask it)."""
        ...

    async def ensure_running(self, microvm_id: str) -> ResolvedVm: ...

    def record_activity(self, microvm_id: str) -> None: ...

    def forget(self, microvm_id: str) -> None:
        """Drop the cached view of the VM (its host said it does not run it)."""
        ...


class Claims(Protocol):
    """What the proxy reads of a verified token (``core.tokens.TokenClaims``)."""

    @property
    def expires_at(self) -> float: ...


class TokenVerifier(Protocol):
    """The proxy's side of ``core.tokens.TokenAuthority``."""

    def verify(self, token: str, *, microvm_id: str, port: int, kind: str) -> Claims: ...

    def current(self, claims: Any) -> bool:
        """The token ``verify`` returned ``claims`` for is still good (not expired, its key
        not revoked)."""
        ...


class Refusal(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


FORBIDDEN = Refusal(403, "Forbidden")
NOT_RUNNING = "MicroVM is not running"  # a 502's message


class Target(NamedTuple):  # a tuple: made for every request, compared with the kept one
    microvm_id: str
    address: str  # the guest's address on its host (one machine: where to connect)
    port: int
    limit: int  # app connections the VM's size allows at once (``connection_limit``)
    host_id: str | None = None  # the host that runs it (a fleet: whose tunnel to dial)


@dataclass(frozen=True)
class Ask:
    """What one request asks for, read from its head (before any check)."""

    microvm_id: str
    port: int
    token: str | None
    kind: str  # "http" | "shell"


def connection_limit(memory_mib: int) -> int:
    """Concurrent connections a VM of this size accepts (512 MiB → 32 ... 8 GiB → 512)."""
    return max(32, memory_mib // 16)


def subprotocols(value: bytes | None) -> list[str]:
    if not value:
        return []
    return [p.strip() for p in value.decode("latin-1").split(",") if p.strip()]


def strip_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Headers for the app: no ``x-aws-proxy-*``, no ``lambda-microvms*`` subprotocols."""
    kept: list[tuple[bytes, bytes]] = []
    for name, value in headers:
        if name.startswith(PROXY_HEADER_PREFIX):
            continue
        if name == b"sec-websocket-protocol":
            offered = [p for p in subprotocols(value) if not p.startswith(SUBPROTOCOL_PREFIX)]
            if not offered:
                continue
            value = ", ".join(offered).encode()
        kept.append((name, value))
    return kept


class Slot:
    """One client connection counted by ``ConnectionLimits``; ``release`` when it ends (again
    is harmless: a connection can end on more than one path)."""

    __slots__ = ("address", "limits")

    def __init__(self, limits: ConnectionLimits | None, address: str) -> None:
        self.limits = limits
        self.address = address

    def release(self) -> None:
        limits, self.limits = self.limits, None
        if limits is not None:
            limits.release(self.address)


class ConnectionLimits:
    """Client connections held at once, in all and per source address, so that no one client
    can take the file descriptors every VM's QMP, agent, disk and database work needs (A8). A
    connection over either cap is closed as soon as it is accepted, before a TLS handshake
    or a read. IPv6 sources count per /64 (one host's usual allocation)."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total = total
        self.per_address = per_address
        self.held = 0
        self._by_address: dict[str, int] = {}

    def take(self, peer: str) -> Slot | None:
        """A slot for a connection from ``peer`` (an IP address), or None: over a cap."""
        address = source_of(peer)
        held = self._by_address.get(address, 0)
        if self.held >= self.total or held >= self.per_address:
            return None
        self.held += 1
        self._by_address[address] = held + 1
        return Slot(self, address)

    def release(self, address: str) -> None:
        self.held -= 1
        left = self._by_address[address] - 1
        if left:
            self._by_address[address] = left
        else:
            del self._by_address[address]


def source_of(peer: str) -> str:
    """What a per-address cap counts: the IPv4 address, or the IPv6 /64."""
    if ":" not in peer:
        return peer
    try:
        ip = ipaddress.IPv6Address(peer.split("%", 1)[0])
    except ValueError:
        return peer
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class Admission:
    def __init__(
        self,
        domain: str,
        routes: VmRoutes,
        tokens: TokenVerifier,
        *,
        session_idle_timeout: float = SESSION_IDLE_TIMEOUT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.suffix = "." + domain.lower().strip(".")
        self.routes = routes
        self.tokens = tokens
        self.session_idle_timeout = session_idle_timeout
        self.token_check_interval = TOKEN_CHECK_INTERVAL
        self.clock = clock
        self._open: dict[str, int] = {}

    def vm_of_host(self, host: bytes | str | None) -> str:
        if isinstance(host, bytes):
            host = host.decode("latin-1")
        name = (host or "").strip().lower()
        if name.startswith("["):
            raise Refusal(404, "Unknown endpoint")
        name = name.rsplit(":", 1)[0] if ":" in name else name
        if not name.endswith(self.suffix):
            raise Refusal(404, "Unknown endpoint")
        vm_id = name[: -len(self.suffix)]
        if not MICROVM_ID_RE.match(vm_id):
            raise Refusal(404, "Unknown endpoint")
        return vm_id

    def ask(
        self,
        host: bytes | str | None,
        headers: dict[bytes, bytes],
        path: bytes,
        *,
        websocket: bool,
    ) -> Ask:
        vm_id = self.vm_of_host(host)
        token = headers.get(AUTH_HEADER)
        port_text = headers.get(PORT_HEADER)
        offered = subprotocols(headers.get(b"sec-websocket-protocol")) if websocket else []
        for proto in offered:
            if proto.startswith(AUTH_SUBPROTOCOL) and token is None:
                token = proto[len(AUTH_SUBPROTOCOL) :].encode()
            elif proto.startswith(PORT_SUBPROTOCOL) and port_text is None:
                port_text = proto[len(PORT_SUBPROTOCOL) :].encode()
        port = DEFAULT_PORT
        if port_text is not None:
            if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
                raise Refusal(400, "Bad X-aws-proxy-port")
            port = int(port_text)
        shell = websocket and port == SHELL_PORT and path.split(b"?", 1)[0] == b"/shell"
        return Ask(vm_id, port, token.decode("latin-1") if token else None,
                   "shell" if shell else "http")  # fmt: skip

    def admit_now(self, ask: Ask) -> Target | None:
        """``admit`` without waiting: the target when the token is good and core knows the VM
        is running (None: ``admit`` must be awaited). Refusals are raised the same way."""
        self._check_token(ask)
        vm = self.routes.resolved(ask.microvm_id)
        if vm is None or vm.address is None:
            return None
        if not vm.allows(ask.kind):
            raise FORBIDDEN
        return self._target(ask.port, vm)

    async def admit(self, ask: Ask) -> Target:
        """Check the token and the VM (resuming it if it is suspended with auto-resume)."""
        target, _ = await self._admit(ask)
        return target

    async def admit_session(self, ask: Ask) -> tuple[Target, SessionLease]:
        """``admit``, and the lease of a session that may become a splice (an upgrade,
        ``/shell``): it ends when the token that opened it expires or is revoked, or idles."""
        target, claims = await self._admit(ask)
        still_current = partial(self.tokens.current, claims)
        lease = SessionLease(claims.expires_at, still_current,
                             idle_timeout=self.session_idle_timeout, clock=self.clock,
                             check_interval=self.token_check_interval)  # fmt: skip
        return target, lease

    async def _admit(self, ask: Ask) -> tuple[Target, Claims]:
        claims = self._check_token(ask)
        vm = await self._running(ask.microvm_id, ask.kind)
        return self._target(ask.port, vm), claims

    async def reresolve(self, target: Target) -> Target:
        """``target`` again, read from the store rather than the cache (resumed if it was
        suspended with auto-resume): the VM's host said it does not run it. Refusals as
        ``admit``'s; the token and the ingress were checked when ``target`` was admitted."""
        self.routes.forget(target.microvm_id)
        vm = await self._running(target.microvm_id, None)
        return self._target(target.port, vm)

    async def _running(self, microvm_id: str, kind: str | None) -> ResolvedVm:
        """The VM, running (``kind``: first check that it takes that traffic)."""
        try:
            if kind is None:
                return await self.routes.ensure_running(microvm_id)
            vm = await self.routes.resolve(microvm_id)
            if not vm.allows(kind):
                raise FORBIDDEN
            if vm.address is None:
                vm = await self.routes.ensure_running(microvm_id)
            return vm
        except NotFoundError:
            raise Refusal(404, "MicroVM not found") from None
        except ConflictError:
            raise Refusal(502, "MicroVM is suspended and auto-resume is off") from None
        except InsufficientCapacityError:
            raise Refusal(503, "No capacity to resume the MicroVM") from None
        except EmbervmError as exc:
            log.warning("MicroVM %s could not be started for a request: %s", microvm_id, exc)
            raise Refusal(502, "MicroVM could not be resumed") from None

    def _check_token(self, ask: Ask) -> Claims:
        if not ask.token:
            raise FORBIDDEN
        kind = "shell" if ask.kind == "shell" else "endpoint"
        try:
            return self.tokens.verify(ask.token, microvm_id=ask.microvm_id, port=ask.port,
                                      kind=kind)  # fmt: skip
        except TokenRejected as exc:
            log.debug("token refused for %s: %s", ask.microvm_id, exc)
            raise FORBIDDEN from None

    def _target(self, port: int, vm: ResolvedVm) -> Target:
        if vm.address is None:
            raise Refusal(502, NOT_RUNNING)
        self.routes.record_activity(vm.microvm_id)
        return Target(vm.microvm_id, vm.address, port, connection_limit(vm.memory_mib),
                      vm.host_id)  # fmt: skip

    def reserve(self, target: Target) -> None:
        """Count one more connection to the VM's app, before it is opened: ``Refusal`` 429
        when the VM's size allows no more. A request on a connection already held needs none.
        Every reservation ends with ``closed`` (also when the connection could not be made)."""
        held = self._open.get(target.microvm_id, 0)
        if held >= target.limit:
            raise Refusal(429, "Too many connections to this MicroVM")
        self._open[target.microvm_id] = held + 1

    def closed(self, microvm_id: str) -> None:
        left = self._open.get(microvm_id, 0) - 1
        if left > 0:
            self._open[microvm_id] = left
        else:
            self._open.pop(microvm_id, None)
