"""The fleet's hosts in ``SqlRepository``: registration, leases, LOST marking, drain, fencing.

PostgreSQL is the fleet's only coordinator: there is no consensus of our own, leases and
fencing are rows and compare-and-set (``HostRegistry`` in ``hosts.py`` is the interface).

**The database's clock judges leases.** ``register`` and ``heartbeat`` set
``lease_expires_at = now() + lease`` and ``mark_lost_expired`` compares it with ``now()``, all
inside PostgreSQL: the hosts' and API processes' clocks never meet, so a skewed host clock can
neither keep a dead host alive nor get a live one declared lost (a test gives a reaper's
session a ``now()`` two hours ahead: it marks a host that every other clock gives ten minutes).
``now()`` is the transaction's start; the transactions here are a few statements long. On
SQLite the database's clock is the operating system's (``strftime('now')``, millisecond
precision, written in the format SQLAlchemy writes datetimes in, so the text compares in time
order). SQLite serves one machine only: a fleet runs on PostgreSQL; on SQLite the hosts table
exists so that one code path serves both.

**Epochs fence a host's writes.** Every registration — a host's first start, a restart, its
return after being declared LOST — bumps ``epoch`` in one ``INSERT … ON CONFLICT DO UPDATE``.
A heartbeat extends the lease only while the row has the caller's epoch and is not LOST (one
``UPDATE … WHERE … RETURNING``); None tells the host it was declared lost or superseded and
must stop its VMs. Writes a host makes to a MicroVM carry ``HostFence(host_id, epoch)``:
the VM row must name that host and epoch (``microvms.host_epoch``, set at placement) and
``fenced()`` — ``EXISTS (SELECT 1 FROM hosts WHERE host_id=:h AND epoch=:e AND
state<>'LOST')`` — must hold. The row's own epoch is what makes this safe under PostgreSQL's
READ COMMITTED: a subquery sees the statement's snapshot, but a conflicting update of the
target row is re-checked against the row's newest version, and marking a host LOST clears
``host_epoch`` on every live VM of that host in the same transaction. So a fenced write either
lands before the LOST marking (and the reaper then sees its result) or changes nothing.
``host_vm_exited`` is the first such write; ``SqlMicrovms.transition(fence=...)`` takes any.

**LOST.** ``mark_lost_expired`` marks every non-LOST host whose lease is past LOST with one
``UPDATE … WHERE state <> 'LOST' AND lease_expires_at < now() RETURNING``, after locking those
rows in host-id order (``SELECT … ORDER BY host_id FOR UPDATE``: reapers that mark several hosts
at once take the locks in one order and cannot deadlock). Two reapers racing (any number of API
processes run it) cannot both mark a host: the second one waits for the first one's row lock,
then re-checks the row's newest version and skips it (SQLite serializes its writers anyway).
A host whose lease passed but that nobody has marked yet may still renew it: nothing has acted
on the expiry. In the same transaction the host's VMs are settled:

- PENDING, RUNNING, SUSPENDING and TERMINATING → TERMINATED, ``stateReason``
  ``HostLost:the_host_<host_id>_stopped_answering`` (``hosts.lost_reason``), ``terminated_at``
  from the database clock, ``address``, ``running_since`` and ``host_epoch`` cleared. Their
  usage is left as it was: when the VM stopped is not known (somewhere after the last
  heartbeat), so the last running period is not metered rather than guessed. A resume that was
  in flight (PENDING) is terminated too: the store cannot tell whether the guest ran (and
  served requests) on the lost host after its restore, so its snapshot is no longer its state.
- SUSPENDED VMs stay SUSPENDED: their snapshot is in the object store. ``host_id`` is kept as
  their last host (a placement preference, and the column is NOT NULL), ``host_epoch`` and
  ``address`` are cleared: no host holds them, a resume places them anew.

Placement (``store.placement``) locks the chosen host's row (``SELECT … FOR SHARE``) in the
transaction that writes the VM with ``host_epoch``, so it cannot interleave with the marking.

Wake-ups: an API process that wrote work for a host sends ``NOTIFY embervm_work, '<host>'``
(``wake_host``; ``'*'`` for work any host may take, a build); the host holds a ``LISTEN``
connection (``listening_for_work``) and looks for work when it hears its id or ``'*'``. A
notification is only a wake-up: a host also looks on a short poll, so everything works when
every notification is lost (a restart of PostgreSQL, a dropped listening connection), only
later. On SQLite (one process) both are no-ops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection

from embervm.errors import InternalError
from embervm.store.hosts import LOST_REASON_AROUND, HostRegistry, check_address, check_host_id
from embervm.store.records import HostFence, HostRecord
from embervm.store.schema import hosts, microvms
from embervm.store.sql_transactions import SqlTransactions

log = logging.getLogger("embervm.store.hosts")

WORK_CHANNEL = "embervm_work"
"""The ``NOTIFY`` channel of wake-ups; the payload is the host id that has work."""
ANY_HOST = "*"
"""The payload of work any host may take (a build)."""
LISTEN_CHECK_SECONDS = 2.0

LIVE_ON_HOST = ("PENDING", "RUNNING", "SUSPENDING", "TERMINATING")
"""VM states that need the host: a lost host's VMs in them are TERMINATED."""
SQLITE_NOW_FORMAT = "%Y-%m-%d %H:%M:%f"  # + "000": SQLAlchemy's text form, microseconds


def db_now(dialect: str, plus_seconds: float = 0.0) -> sa.ColumnElement[datetime]:
    """The database's clock, ``plus_seconds`` ahead, as an SQL expression."""
    if dialect == "sqlite":
        shift = sa.literal(f"{plus_seconds:+.6f} seconds")
        text = sa.func.strftime(sa.literal(SQLITE_NOW_FORMAT), sa.literal("now"), shift)
        return sa.type_coerce(text.concat("000"), hosts.c.lease_expires_at.type)
    now: sa.ColumnElement[datetime] = sa.func.now()
    if plus_seconds:
        now = now + sa.literal(timedelta(seconds=plus_seconds), sa.Interval())
    return sa.type_coerce(now, hosts.c.lease_expires_at.type)


def fenced(host_id: str, epoch: int) -> sa.ColumnElement[bool]:
    """True while the host is at ``epoch`` and not LOST: a guard for a host's writes."""
    h = hosts.c
    return sa.exists().where(h.host_id == host_id, h.epoch == epoch, h.state != "LOST")


def vm_fence(fence: HostFence) -> tuple[sa.ColumnElement[bool], ...]:
    """The guard of a host's write to a MicroVM row: placed on it with that epoch, and
    ``fenced``."""
    m = microvms.c
    return (
        m.host_id == fence.host_id,
        m.host_epoch == fence.epoch,
        fenced(fence.host_id, fence.epoch),
    )


def exited_reason(detail: str) -> str:
    """``VmExited`` or ``VmExited:<detail>`` with whitespace turned into underscores."""
    detail = "_".join(detail.split())
    return f"VmExited:{detail}"[:2048] if detail else "VmExited"


def _host(row: Any) -> HostRecord:
    return HostRecord(**row._mapping)


class SqlHosts(SqlTransactions):
    """``HostRegistry`` over the ``hosts`` table (module doc)."""

    @property
    def _dialect(self) -> str:
        return self.engine.dialect.name

    def _now(self, plus_seconds: float = 0.0) -> sa.ColumnElement[datetime]:
        return db_now(self._dialect, plus_seconds)

    async def register(
        self,
        host_id: str,
        address: str,
        pid: int,
        memory_total_mib: int,
        capabilities: Mapping[str, Any],
        lease_seconds: float,
    ) -> HostRecord:
        check_host_id(host_id)
        check_address(address)
        if lease_seconds <= 0 or pid <= 0 or memory_total_mib < 0:
            raise ValueError("lease_seconds and pid must be positive, memory_total_mib >= 0")
        h = hosts.c
        now = self._now()
        insert = (postgresql.insert if self._dialect == "postgresql" else sqlite.insert)(hosts)
        statement = (
            insert.values(
                host_id=host_id,
                epoch=1,
                state="ACTIVE",
                address=address,
                pid=pid,
                memory_total_mib=memory_total_mib,
                memory_reserved_mib=0,
                capabilities=dict(capabilities),
                registered_at=now,
                heartbeat_at=now,
                lease_expires_at=self._now(lease_seconds),
            )
            .on_conflict_do_update(
                index_elements=[h.host_id],
                set_={
                    "epoch": h.epoch + 1,
                    "state": sa.case((h.state == "DRAINING", "DRAINING"), else_="ACTIVE"),
                    "address": insert.excluded.address,
                    "pid": insert.excluded.pid,
                    "memory_total_mib": insert.excluded.memory_total_mib,
                    "capabilities": insert.excluded.capabilities,
                    "registered_at": insert.excluded.registered_at,
                    "heartbeat_at": insert.excluded.heartbeat_at,
                    "lease_expires_at": insert.excluded.lease_expires_at,
                },
            )
            .returning(*hosts.c)
        )
        async with self._write(images_unchanged=True) as conn:
            return _host((await conn.execute(statement)).one())

    async def heartbeat(
        self, host_id: str, epoch: int, lease_seconds: float, memory_reserved_mib: int
    ) -> HostRecord | None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        h = hosts.c
        statement = (
            hosts.update()
            .where(h.host_id == host_id, h.epoch == epoch, h.state != "LOST")
            .values(
                heartbeat_at=self._now(),
                lease_expires_at=self._now(lease_seconds),
                memory_reserved_mib=memory_reserved_mib,
            )
            .returning(*hosts.c)
        )
        async with self._write(images_unchanged=True) as conn:
            row = (await conn.execute(statement)).first()
        return _host(row) if row is not None else None

    async def mark_lost_expired(self) -> list[HostRecord]:
        h = hosts.c
        now = self._now()
        expired = (h.state != "LOST", h.lease_expires_at < now)
        async with self._write(images_unchanged=True) as conn:
            # Lock the candidates in one order first, so that reapers marking several hosts
            # at once cannot deadlock; the UPDATE's own condition is what marks each once.
            candidates = sa.select(h.host_id).where(*expired).order_by(h.host_id)
            ids = (await conn.scalars(candidates.with_for_update())).all()
            if not ids:
                return []
            rows = (
                await conn.execute(
                    hosts.update()
                    .where(h.host_id.in_(ids), *expired)
                    .values(state="LOST")
                    .returning(*hosts.c)
                )
            ).all()
            lost = sorted((_host(r) for r in rows), key=lambda r: r.host_id)
            if lost:
                await self._settle_vms(conn, [r.host_id for r in lost])
        return lost

    async def _settle_vms(self, conn: AsyncConnection, host_ids: list[str]) -> None:
        """The VMs of hosts just marked LOST (module doc)."""
        m = microvms.c
        now = self._now()
        await conn.execute(
            microvms.update()
            .where(m.host_id.in_(host_ids), m.state.in_(LIVE_ON_HOST))
            .values(**_lost_values(now))
        )
        await conn.execute(
            microvms.update()
            .where(m.host_id.in_(host_ids), m.state == "SUSPENDED")
            .values(updated_at=now, address=None, host_epoch=None)
        )

    async def drain(self, host_id: str) -> HostRecord | None:
        h = hosts.c
        async with self._write(images_unchanged=True) as conn:
            row = (
                await conn.execute(
                    hosts.update()
                    .where(h.host_id == host_id, h.state == "ACTIVE")
                    .values(state="DRAINING")
                    .returning(*hosts.c)
                )
            ).first()
            if row is None:
                row = (await conn.execute(sa.select(hosts).where(h.host_id == host_id))).first()
        return _host(row) if row is not None else None

    async def list_hosts(self) -> list[HostRecord]:
        async with self._read() as conn:
            rows = await conn.execute(sa.select(hosts).order_by(hosts.c.host_id))
            return [_host(r) for r in rows]

    async def get_host(self, host_id: str) -> HostRecord | None:
        async with self._read() as conn:
            row = (await conn.execute(sa.select(hosts).where(hosts.c.host_id == host_id))).first()
        return _host(row) if row is not None else None

    async def host_vm_exited(self, host_id: str, epoch: int, microvm_id: str, reason: str) -> bool:
        m = microvms.c
        now = self._now()
        statement = (
            microvms.update()
            .where(
                m.microvm_id == microvm_id,
                m.state == "RUNNING",
                *vm_fence(HostFence(host_id, epoch)),
            )
            .values(
                state="TERMINATED",
                state_reason=exited_reason(reason),
                terminated_at=now,
                updated_at=now,
                running_since=None,
                address=None,
            )
            .returning(m.microvm_id)
        )
        async with self._write(images_unchanged=True) as conn:
            return (await conn.execute(statement)).first() is not None

    async def rebind(
        self, host_id: str, epoch: int, held: Collection[str]
    ) -> tuple[list[str], list[str]] | None:
        m = microvms.c
        now = self._now()
        stale = (
            m.host_id == host_id,
            m.state.in_(LIVE_ON_HOST),
            sa.or_(m.host_epoch.is_(None), m.host_epoch != epoch),
        )
        kept = sa.or_(m.microvm_id.in_(list(held)), m.state == "PENDING")
        async with self._write(images_unchanged=True) as conn:
            if not await conn.scalar(sa.select(fenced(host_id, epoch))):
                return None
            rebound = await conn.scalars(
                microvms.update()
                .where(*stale, kept)
                .values(host_epoch=epoch, updated_at=now)
                .returning(m.microvm_id)
            )
            rebound_ids = sorted(rebound.all())
            ended = await conn.scalars(
                microvms.update()
                .where(*stale, sa.not_(kept))
                .values(**_lost_values(now))
                .returning(m.microvm_id)
            )
            return rebound_ids, sorted(ended.all())

    # -- wake-ups ----------------------------------------------------------------------------

    async def wake_host(self, host_id: str) -> None:
        if self._dialect != "postgresql":
            return  # one process: nothing to wake
        with contextlib.suppress(InternalError):  # a wake-up lost is only a poll later
            async with self._read() as conn:
                await conn.execute(sa.select(sa.func.pg_notify(WORK_CHANNEL, host_id)))
                await conn.commit()

    @contextlib.asynccontextmanager
    async def listening_for_work(
        self, host_id: str, wake: Callable[[], None]
    ) -> AsyncIterator[None]:
        if self._dialect != "postgresql":
            yield
            return
        task = asyncio.create_task(self._listen(host_id, wake), name=f"listen {host_id}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _listen(self, host_id: str, wake: Callable[[], None]) -> None:
        """Hold a connection with ``LISTEN``; open it again when it closes or stops answering
        (a ``SELECT 1`` every few seconds: a partition sends no FIN)."""

        def heard(_conn: object, _pid: int, _channel: str, payload: str) -> None:
            if payload in (host_id, ANY_HOST):
                wake()

        while True:
            try:
                async with self.engine.connect() as conn:
                    try:
                        await self._hold_listener(conn, heard, wake)
                    finally:  # never back to the pool with a LISTEN on it
                        with contextlib.suppress(Exception):
                            await conn.invalidate()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("listening for work: %s (retrying)", exc)
            await asyncio.sleep(LISTEN_CHECK_SECONDS)

    @staticmethod
    async def _hold_listener(
        conn: AsyncConnection, heard: Callable[..., None], wake: Callable[[], None]
    ) -> None:
        raw: Any = (await conn.get_raw_connection()).driver_connection
        closed = asyncio.Event()
        raw.add_termination_listener(lambda _raw: closed.set())
        await raw.add_listener(WORK_CHANNEL, heard)
        wake()  # whatever was sent while nobody listened: look once
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTEN_CHECK_SECONDS):
                    await closed.wait()
            if closed.is_set():
                return
            async with asyncio.timeout(LISTEN_CHECK_SECONDS):
                await raw.fetchval("SELECT 1")


def _lost_values(now: sa.ColumnElement[datetime]) -> dict[str, Any]:
    """A live VM its host no longer runs: TERMINATED, the host's name in the reason."""
    return {
        "state": "TERMINATED",
        "state_reason": lost_reason_sql(microvms.c.host_id),
        "terminated_at": now,
        "updated_at": now,
        "running_since": None,
        "address": None,
        "host_epoch": None,
    }


def lost_reason_sql(host_id: sa.ColumnElement[str]) -> sa.ColumnElement[str]:
    """``hosts.lost_reason`` computed in SQL from the row's ``host_id``."""
    before, after = LOST_REASON_AROUND
    return sa.literal(before) + host_id + sa.literal(after)


def _implements_the_protocol(registry: SqlHosts) -> HostRegistry:
    """Never called: mypy checks here that ``SqlHosts`` is a ``HostRegistry``."""
    return registry
