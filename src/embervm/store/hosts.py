"""``HostRegistry``: what the fleet's roles need from the store about hosts, and nothing about
SQL. ``sql_hosts.SqlHosts`` implements it (and explains the design: the database's clock judges
leases, epochs fence a host's writes, what LOST does to a host's VMs).

A host registers (a new epoch), heartbeats with that epoch to keep its lease, and stops
everything it runs when a heartbeat answers None. Any API process may run
``mark_lost_expired``; each expired host is marked LOST once however many run it at once.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any, Protocol

from embervm.errors import ConfigError
from embervm.store.records import HostRecord

HOST_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
HOST_ID_MAX = 64


def check_host_id(host_id: str) -> str:
    """``host_id`` if it is a valid host name (``[a-z0-9][a-z0-9-]*``, at most 64 characters),
    else ``ConfigError`` (it comes from ``--host-id``)."""
    if HOST_ID_PATTERN.fullmatch(host_id) is None:
        raise ConfigError(
            f"host id {host_id!r}: use 1 to {HOST_ID_MAX} lowercase letters, digits and '-', "
            "starting with a letter or digit"
        )
    return host_id


def check_address(address: str) -> str:
    """``address`` if it is ``HOST:PORT`` (an IPv6 host in brackets), else ``ConfigError``."""
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]") and len(host) > 2
    valid_host = bracketed or (host != "" and ":" not in host and "[" not in host)
    if (
        not sep
        or not valid_host
        or not port.isascii()
        or not port.isdigit()
        or not 0 < int(port) < 65536
        or len(address) > 256
        or any(c.isspace() for c in address)
    ):
        raise ConfigError(f"host address {address!r}: use ADDR:PORT, e.g. 10.0.0.5:8790")
    return address


LOST_REASON_AROUND = ("HostLost:the_host_", "_stopped_answering")
"""What comes before and after the host id in ``lost_reason``."""


def lost_reason(host_id: str) -> str:
    """The ``stateReason`` of a VM terminated because its host was lost (no whitespace, as
    docs/API.md requires; host ids have none)."""
    before, after = LOST_REASON_AROUND
    return f"{before}{host_id}{after}"


class HostRegistry(Protocol):
    async def register(
        self,
        host_id: str,
        address: str,
        pid: int,
        memory_total_mib: int,
        capabilities: Mapping[str, Any],
        lease_seconds: float,
    ) -> HostRecord:
        """Insert or update the host's row with a new epoch (1, then the old one + 1) and a
        lease of ``lease_seconds`` from now (the database's clock). The state becomes ACTIVE,
        except that a DRAINING host stays DRAINING. ``memory_reserved_mib`` is 0 for a new row
        and kept for a known one (the next heartbeat reports it)."""
        ...

    async def heartbeat(
        self, host_id: str, epoch: int, lease_seconds: float, memory_reserved_mib: int
    ) -> HostRecord | None:
        """Extend the lease to ``lease_seconds`` from now, only if the row still has ``epoch``
        and is not LOST. None: the host was declared lost or registered again since; it must
        stop its VMs and write nothing more."""
        ...

    async def mark_lost_expired(self) -> list[HostRecord]:
        """Mark LOST every host whose lease has passed (database clock) and, in the same
        transaction, terminate its live VMs and unbind its suspended ones. Returns the hosts
        this call marked (none that another caller marked first)."""
        ...

    async def drain(self, host_id: str) -> HostRecord | None:
        """ACTIVE → DRAINING (no new placements). A DRAINING or LOST host is left as it is.
        Returns the row after, None if there is no such host."""
        ...

    async def list_hosts(self) -> list[HostRecord]:
        """Every host, by id."""
        ...

    async def get_host(self, host_id: str) -> HostRecord | None: ...

    async def rebind(
        self, host_id: str, epoch: int, held: Collection[str]
    ) -> tuple[list[str], list[str]] | None:
        """After the host registered at ``epoch`` (a restart, or a membership lost and found):
        its live VMs of older epochs that it ``held`` again, and PENDING ones (their task
        starts afresh), move to ``epoch``; the others are TERMINATED with the lost-host reason
        (the host does not run them). Returns (rebound ids, terminated ids), or None when the
        host is not at ``epoch`` any more (fenced)."""
        ...

    async def wake_host(self, host_id: str) -> None:
        """Tell ``host_id`` it has work (``NOTIFY``); best effort, never raises."""
        ...

    def listening_for_work(
        self, host_id: str, wake: Callable[[], None]
    ) -> contextlib.AbstractAsyncContextManager[None]:
        """While open, ``wake()`` is called when ``host_id`` is told it has work (and once
        after every (re)connection of the listening session)."""
        ...

    async def host_vm_exited(self, host_id: str, epoch: int, microvm_id: str, reason: str) -> bool:
        """The host saw the VMM of a RUNNING VM die: the VM becomes TERMINATED with
        ``VmExited:<reason>``, only if it is placed on this host with this epoch and the host is
        not LOST. False: nothing was changed. Metering the running period is the caller's."""
        ...
