"""``SqlRepository``: the ``Repository`` on SQLAlchemy Core (async), SQLite or PostgreSQL.

Every write runs in one transaction (``_write``): on SQLite it holds the in-process writer
lock and begins IMMEDIATE; on PostgreSQL, writers that count (admission, image creation,
deletes) first take the ``admission`` row lock, and state changes are conditional UPDATEs
(``WHERE state IN (...)``), so two racing transitions cannot both win. Database errors are
translated to ``InternalError`` here, at the boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Collection, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from embervm.contracts import MicrovmState
from embervm.errors import InternalError
from embervm.store.admission_query import read_admission, refusal
from embervm.store.engine import WRITE_OPTION
from embervm.store.records import (
    ACTIVE_MICROVM_STATES,
    MEMORY_HOLDING_STATES,
    AdmissionLimits,
    BuildRecord,
    DeleteStatus,
    IdempotencyClaim,
    ImageRecord,
    InsertOutcome,
    MicrovmRecord,
    UsageRecord,
    VersionRecord,
)
from embervm.store.repository import (
    BuildFilter,
    Change,
    ImageChange,
    Page,
    RunnableVersion,
    Transition,
    VersionChange,
)
from embervm.store.rowcache import RowCache
from embervm.store.schema import (
    ADMISSION_LOCK,
    idempotency,
    image_builds,
    image_tags,
    image_versions,
    images,
    locks,
    microvms,
    usage,
)

DEFAULT_TIMEOUT = 30.0
BUILDING_IMAGE_STATES = ("CREATING", "UPDATING")
BUILDING_VERSION_STATES = ("PENDING", "IN_PROGRESS")


class _Rollback(Exception):
    """Raised inside a write to undo it; carries the outcome to return."""

    def __init__(self, outcome: Any) -> None:
        super().__init__("rollback")
        self.outcome = outcome


def _no_seq(record: Any) -> dict[str, Any]:
    values = asdict(record)
    values.pop("seq", None)
    return values


class SqlRepository:
    """See module doc. ``close()`` disposes of the engine."""

    def __init__(self, engine: AsyncEngine, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.engine = engine
        self._timeout = timeout
        sqlite = engine.dialect.name == "sqlite"
        self._writer = asyncio.Lock() if sqlite else None
        # Only on SQLite is this process the database's only writer (see rowcache).
        self._images: RowCache[tuple[str, str], ImageRecord] | None = None
        self._versions: RowCache[tuple[str, str, int], VersionRecord] | None = None
        if sqlite:
            self._images, self._versions = RowCache(), RowCache()

    async def close(self) -> None:
        await self.engine.dispose()

    # -- transactions ------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _write(self, *, images_unchanged: bool = False) -> AsyncIterator[AsyncConnection]:
        """One write transaction; unless ``images_unchanged``, it drops the cached image and
        version rows once it has ended (committed or not)."""
        try:
            async with asyncio.timeout(self._timeout):
                async with contextlib.AsyncExitStack() as stack:
                    if self._writer is not None:
                        await stack.enter_async_context(self._writer)
                    conn = await stack.enter_async_context(self.engine.connect())
                    conn = await conn.execution_options(**{WRITE_OPTION: True})
                    await stack.enter_async_context(conn.begin())
                    yield conn
        except TimeoutError as exc:
            raise InternalError("the database did not answer in time") from exc
        except _Rollback:
            raise
        except SQLAlchemyError as exc:
            raise InternalError("the database failed") from exc
        finally:
            if not images_unchanged and self._images is not None and self._versions is not None:
                self._images.invalidate()
                self._versions.invalidate()

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[AsyncConnection]:
        try:
            async with asyncio.timeout(self._timeout), self.engine.connect() as conn:
                yield conn
        except TimeoutError as exc:
            raise InternalError("the database did not answer in time") from exc
        except SQLAlchemyError as exc:
            raise InternalError("the database failed") from exc

    async def _lock_admission(self, conn: AsyncConnection) -> None:
        if self._writer is not None:  # SQLite: BEGIN IMMEDIATE and the writer lock serialize
            return
        await conn.execute(
            sa.select(locks.c.name).where(locks.c.name == ADMISSION_LOCK).with_for_update()
        )

    async def _check_claim(
        self, conn: AsyncConnection, claim: IdempotencyClaim | None
    ) -> InsertOutcome | None:
        if claim is None:
            return None
        row = (
            await conn.execute(
                sa.select(idempotency.c.request_hash, idempotency.c.resource_id).where(
                    idempotency.c.account_id == claim.account_id,
                    idempotency.c.scope == claim.scope,
                    idempotency.c.client_token == claim.client_token,
                )
            )
        ).first()
        if row is None:
            return None
        if row.request_hash == claim.request_hash:
            return InsertOutcome("replayed", row.resource_id)
        return InsertOutcome("token_reused", row.resource_id)

    async def _insert_claim(
        self, conn: AsyncConnection, claim: IdempotencyClaim | None, created_at: Any
    ) -> None:
        if claim is not None:
            await conn.execute(idempotency.insert().values(**asdict(claim), created_at=created_at))

    # -- images ------------------------------------------------------------------------------

    async def create_image(
        self,
        image: ImageRecord,
        version: VersionRecord,
        build: BuildRecord,
        tags: Mapping[str, str],
        *,
        max_images: int | None,
        claim: IdempotencyClaim | None,
    ) -> InsertOutcome:
        async with self._write() as conn:
            await self._lock_admission(conn)
            if (seen := await self._check_claim(conn, claim)) is not None:
                return seen
            existing = await self._image_row(conn, image.account_id, image.name)
            if existing is not None and existing.state != "DELETED":
                return InsertOutcome("exists", image.name)
            if existing is not None:
                await self._purge_image(conn, image.account_id, image.name)
            if max_images is not None:
                count = await conn.scalar(
                    sa.select(sa.func.count())
                    .select_from(images)
                    .where(images.c.account_id == image.account_id, images.c.state != "DELETED")
                )
                if int(count or 0) >= max_images:
                    return InsertOutcome("quota_images")
            await conn.execute(images.insert().values(**_no_seq(image)))
            await conn.execute(image_versions.insert().values(**asdict(version)))
            await conn.execute(image_builds.insert().values(**_no_seq(build)))
            if tags:
                await conn.execute(
                    image_tags.insert(),
                    [
                        {
                            "account_id": image.account_id,
                            "image_name": image.name,
                            "key": k,
                            "value": v,
                        }
                        for k, v in tags.items()
                    ],
                )
            await self._insert_claim(conn, claim, image.created_at)
            return InsertOutcome("created", f"{image.name}/{version.number}")

    async def _purge_image(self, conn: AsyncConnection, account_id: str, name: str) -> None:
        for table, column in (
            (images, images.c.name),
            (image_versions, image_versions.c.image_name),
            (image_builds, image_builds.c.image_name),
            (image_tags, image_tags.c.image_name),
        ):
            await conn.execute(
                table.delete().where(table.c.account_id == account_id, column == name)
            )

    async def add_version(
        self,
        version: VersionRecord,
        build: BuildRecord,
        *,
        image_values: Mapping[str, Any],
        expect_image_states: Collection[str],
        claim: IdempotencyClaim | None,
    ) -> InsertOutcome:
        async with self._write() as conn:
            await self._lock_admission(conn)
            if (seen := await self._check_claim(conn, claim)) is not None:
                return seen
            image = await self._image_row(conn, version.account_id, version.image_name)
            if image is None or image.state == "DELETED":
                return InsertOutcome("missing")
            if image.state not in expect_image_states or image.next_version != version.number:
                return InsertOutcome("conflict")
            await conn.execute(
                images.update()
                .where(
                    images.c.account_id == version.account_id, images.c.name == version.image_name
                )
                .values(**image_values, next_version=version.number + 1)
            )
            await conn.execute(image_versions.insert().values(**asdict(version)))
            await conn.execute(image_builds.insert().values(**_no_seq(build)))
            await self._insert_claim(conn, claim, version.created_at)
            return InsertOutcome("created", f"{version.image_name}/{version.number}")

    async def _image_row(
        self, conn: AsyncConnection, account_id: str, name: str
    ) -> ImageRecord | None:
        row = (
            await conn.execute(
                sa.select(images).where(images.c.account_id == account_id, images.c.name == name)
            )
        ).first()
        return ImageRecord(**row._mapping) if row is not None else None

    async def get_image(self, account_id: str, name: str) -> ImageRecord | None:
        if self._images is None:
            async with self._read() as conn:
                return await self._image_row(conn, account_id, name)
        key, generation = (account_id, name), self._images.generation
        if (cached := self._images.get(key)) is not None:
            return cached
        async with self._read() as conn:
            image = await self._image_row(conn, account_id, name)
        self._images.put(key, image, generation)
        return image

    async def list_images(
        self, account_id: str, page: Page, *, name_filter: str | None = None
    ) -> list[ImageRecord]:
        query = sa.select(images).where(
            images.c.account_id == account_id, images.c.state != "DELETED"
        )
        if name_filter:
            query = query.where(images.c.name.contains(name_filter, autoescape=True))
        if page.after is not None:
            query = query.where(images.c.seq > page.after)
        query = query.order_by(images.c.seq).limit(page.limit)
        async with self._read() as conn:
            return [ImageRecord(**r._mapping) for r in await conn.execute(query)]

    async def get_version(
        self, account_id: str, image_name: str, number: int
    ) -> VersionRecord | None:
        key = (account_id, image_name, number)
        if self._versions is None:
            return await self._version_row(key)
        generation = self._versions.generation
        if (cached := self._versions.get(key)) is not None:
            return cached
        version = await self._version_row(key)
        self._versions.put(key, version, generation)
        return version

    async def _version_row(self, key: tuple[str, str, int]) -> VersionRecord | None:
        account_id, image_name, number = key
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(image_versions).where(
                        image_versions.c.account_id == account_id,
                        image_versions.c.image_name == image_name,
                        image_versions.c.number == number,
                    )
                )
            ).first()
        return VersionRecord(**row._mapping) if row is not None else None

    async def list_versions(
        self, account_id: str, image_name: str, page: Page
    ) -> list[VersionRecord]:
        v = image_versions.c
        query = sa.select(image_versions).where(
            v.account_id == account_id, v.image_name == image_name, v.state != "DELETED"
        )
        if page.after is not None:
            query = query.where(v.number > page.after)
        query = query.order_by(v.number).limit(page.limit)
        async with self._read() as conn:
            return [VersionRecord(**r._mapping) for r in await conn.execute(query)]

    async def versions_in_states(self, states: Collection[str]) -> list[VersionRecord]:
        query = sa.select(image_versions).where(image_versions.c.state.in_(list(states)))
        async with self._read() as conn:
            return [VersionRecord(**r._mapping) for r in await conn.execute(query)]

    async def get_build(self, build_id: str) -> BuildRecord | None:
        async with self._read() as conn:
            row = (
                await conn.execute(
                    sa.select(image_builds).where(image_builds.c.build_id == build_id)
                )
            ).first()
        return BuildRecord(**row._mapping) if row is not None else None

    async def list_builds(
        self, account_id: str, image_name: str, number: int, page: Page, filters: BuildFilter
    ) -> list[BuildRecord]:
        b = image_builds.c
        query = sa.select(image_builds).where(
            b.account_id == account_id, b.image_name == image_name, b.version_number == number
        )
        if filters.architecture:
            query = query.where(b.architecture == filters.architecture)
        if filters.chipset:
            query = query.where(b.chipset == filters.chipset)
        if filters.chipset_generation:
            query = query.where(b.chipset_generation == filters.chipset_generation)
        if page.after is not None:
            query = query.where(b.seq > page.after)
        query = query.order_by(b.seq).limit(page.limit)
        async with self._read() as conn:
            return [BuildRecord(**r._mapping) for r in await conn.execute(query)]

    async def apply(self, *changes: Change) -> bool:
        try:
            async with self._write() as conn:
                touched: set[tuple[str, str]] = set()
                for change in changes:
                    if not await self._apply_one(conn, change):
                        raise _Rollback(False)
                    if isinstance(change, VersionChange):
                        touched.add((change.account_id, change.image_name))
                for account_id, name in touched:
                    await self._refresh_latest_active(conn, account_id, name)
                return True
        except _Rollback as rollback:
            return bool(rollback.outcome)

    async def _apply_one(self, conn: AsyncConnection, change: Change) -> bool:
        if isinstance(change, ImageChange):
            table = images
            where = [images.c.account_id == change.account_id, images.c.name == change.name]
        elif isinstance(change, VersionChange):
            table = image_versions
            v = image_versions.c
            where = [
                v.account_id == change.account_id,
                v.image_name == change.image_name,
                v.number == change.number,
            ]
        else:
            table = image_builds
            where = [image_builds.c.build_id == change.build_id]
        if change.expect_states is not None:
            where.append(table.c.state.in_(list(change.expect_states)))
        result = await conn.execute(table.update().where(*where).values(**change.values))
        return bool(result.rowcount)

    async def _refresh_latest_active(
        self, conn: AsyncConnection, account_id: str, name: str
    ) -> None:
        """``latestActiveImageVersion``: the newest SUCCESSFUL version whose status is ACTIVE."""
        v = image_versions.c
        newest = await conn.scalar(
            sa.select(sa.func.max(v.number)).where(
                v.account_id == account_id,
                v.image_name == name,
                v.state == "SUCCESSFUL",
                v.status == "ACTIVE",
            )
        )
        await conn.execute(
            images.update()
            .where(images.c.account_id == account_id, images.c.name == name)
            .values(latest_active_version=str(newest) if newest is not None else None)
        )

    async def delete_image(
        self, account_id: str, name: str, *, version: int | None = None
    ) -> DeleteStatus:
        async with self._write() as conn:
            await self._lock_admission(conn)
            image = await self._image_row(conn, account_id, name)
            if image is None:
                return "missing"
            m = microvms.c
            in_use = (
                sa.select(sa.func.count())
                .select_from(microvms)
                .where(
                    m.account_id == account_id,
                    m.image_name == name,
                    m.state.in_(ACTIVE_MICROVM_STATES),
                )
            )
            if version is None:
                if image.state == "DELETED":
                    return "already_deleted"
                if image.state in BUILDING_IMAGE_STATES:
                    return "busy"
                if int(await conn.scalar(in_use) or 0):
                    return "in_use"
                await self._mark_image_deleted(conn, account_id, name)
                return "deleted"
            return await self._delete_version(conn, image, version, in_use)

    async def _mark_image_deleted(self, conn: AsyncConnection, account_id: str, name: str) -> None:
        await conn.execute(
            images.update()
            .where(images.c.account_id == account_id, images.c.name == name)
            .values(state="DELETED", latest_active_version=None)
        )
        await conn.execute(
            image_versions.update()
            .where(image_versions.c.account_id == account_id, image_versions.c.image_name == name)
            .values(state="DELETED", status="INACTIVE")
        )
        await conn.execute(
            image_tags.delete().where(
                image_tags.c.account_id == account_id, image_tags.c.image_name == name
            )
        )

    async def _delete_version(
        self, conn: AsyncConnection, image: ImageRecord, number: int, in_use: Any
    ) -> DeleteStatus:
        v = image_versions.c
        where = (
            v.account_id == image.account_id,
            v.image_name == image.name,
            v.number == number,
        )
        state = await conn.scalar(sa.select(v.state).where(*where))
        if state is None:
            return "missing"
        if state == "DELETED":
            return "already_deleted"
        if state in BUILDING_VERSION_STATES:
            return "busy"
        if int(await conn.scalar(in_use.where(microvms.c.image_version == str(number))) or 0):
            return "in_use"
        await conn.execute(
            image_versions.update().where(*where).values(state="DELETED", status="INACTIVE")
        )
        await self._refresh_latest_active(conn, image.account_id, image.name)
        return "deleted"

    async def get_tags(self, account_id: str, image_name: str) -> dict[str, str]:
        async with self._read() as conn:
            rows = await conn.execute(
                sa.select(image_tags.c.key, image_tags.c.value).where(
                    image_tags.c.account_id == account_id, image_tags.c.image_name == image_name
                )
            )
            return {r.key: r.value for r in rows}

    async def _live_image(self, conn: AsyncConnection, account_id: str, name: str) -> bool:
        image = await self._image_row(conn, account_id, name)
        return image is not None and image.state != "DELETED"

    async def tag(self, account_id: str, image_name: str, tags: Mapping[str, str]) -> bool:
        async with self._write() as conn:
            if not await self._live_image(conn, account_id, image_name):
                return False
            t = image_tags.c
            if tags:
                await conn.execute(
                    image_tags.delete().where(
                        t.account_id == account_id,
                        t.image_name == image_name,
                        t.key.in_(list(tags)),
                    )
                )
                await conn.execute(
                    image_tags.insert(),
                    [
                        {"account_id": account_id, "image_name": image_name, "key": k, "value": v}
                        for k, v in tags.items()
                    ],
                )
            return True

    async def untag(self, account_id: str, image_name: str, keys: Sequence[str]) -> bool:
        async with self._write() as conn:
            if not await self._live_image(conn, account_id, image_name):
                return False
            t = image_tags.c
            if keys:
                await conn.execute(
                    image_tags.delete().where(
                        t.account_id == account_id,
                        t.image_name == image_name,
                        t.key.in_(list(keys)),
                    )
                )
            return True

    # -- microvms ----------------------------------------------------------------------------

    async def admit_microvm(
        self,
        vm: MicrovmRecord,
        *,
        limits: AdmissionLimits,
        runnable: RunnableVersion,
        claim: IdempotencyClaim | None,
    ) -> InsertOutcome:
        async with self._write(images_unchanged=True) as conn:
            await self._lock_admission(conn)
            snapshot = await read_admission(conn, vm, limits=limits, runnable=runnable, claim=claim)
            refused = refusal(snapshot, vm, limits=limits, runnable=runnable, claim=claim)
            if refused is not None:
                return refused
            await conn.execute(microvms.insert().values(**_no_seq(vm)))
            await conn.execute(
                usage.insert().values(
                    microvm_id=vm.microvm_id,
                    vcpu_seconds=0.0,
                    gib_seconds=0.0,
                    snapshot_bytes_written=0,
                    snapshot_bytes_read=0,
                )
            )
            await self._insert_claim(conn, claim, vm.started_at)
            return InsertOutcome("created", vm.microvm_id)

    async def _host_memory(self, conn: AsyncConnection, host_id: str, *, exclude: str) -> int:
        m = microvms.c
        held = await conn.scalar(
            sa.select(sa.func.coalesce(sa.func.sum(m.memory_mib), 0)).where(
                m.host_id == host_id,
                m.state.in_(MEMORY_HOLDING_STATES),
                m.microvm_id != exclude,
            )
        )
        return int(held or 0)

    async def _vm_row(self, conn: AsyncConnection, microvm_id: str) -> MicrovmRecord | None:
        row = (
            await conn.execute(sa.select(microvms).where(microvms.c.microvm_id == microvm_id))
        ).first()
        return MicrovmRecord(**row._mapping) if row is not None else None

    async def get_microvm(self, microvm_id: str) -> MicrovmRecord | None:
        async with self._read() as conn:
            return await self._vm_row(conn, microvm_id)

    async def list_microvms(
        self,
        account_id: str,
        page: Page,
        *,
        image_name: str | None = None,
        image_version: str | None = None,
    ) -> list[MicrovmRecord]:
        m = microvms.c
        query = sa.select(microvms).where(m.account_id == account_id)
        if image_name is not None:
            query = query.where(m.image_name == image_name)
        if image_version is not None:
            query = query.where(m.image_version == image_version)
        if page.after is not None:
            query = query.where(m.seq > page.after)
        query = query.order_by(m.seq).limit(page.limit)
        async with self._read() as conn:
            return [MicrovmRecord(**r._mapping) for r in await conn.execute(query)]

    async def microvms_in_states(self, states: Collection[MicrovmState]) -> list[MicrovmRecord]:
        query = (
            sa.select(microvms).where(microvms.c.state.in_(list(states))).order_by(microvms.c.seq)
        )
        async with self._read() as conn:
            return [MicrovmRecord(**r._mapping) for r in await conn.execute(query)]

    async def transition(
        self,
        microvm_id: str,
        *,
        expect: Collection[str],
        values: Mapping[str, Any],
        capacity: AdmissionLimits | None = None,
    ) -> Transition:
        async with self._write(images_unchanged=True) as conn:
            if capacity is not None:
                await self._lock_admission(conn)
                current = await self._vm_row(conn, microvm_id)
                if current is None:
                    return Transition("missing")
                if current.state not in expect:
                    return Transition("conflict", current)
                budget = capacity.host_memory_budget_mib
                if budget is not None:
                    held = await self._host_memory(conn, capacity.host_id, exclude=microvm_id)
                    if held + current.memory_mib > budget:
                        return Transition("capacity", current)
            m = microvms.c
            row = (
                await conn.execute(
                    microvms.update()
                    .where(m.microvm_id == microvm_id, m.state.in_(list(expect)))
                    .values(**values)
                    .returning(*microvms.c)
                )
            ).first()
            if row is not None:
                return Transition("ok", MicrovmRecord(**row._mapping))
            found = await self._vm_row(conn, microvm_id)
            return Transition("missing" if found is None else "conflict", found)

    async def update_microvm(self, microvm_id: str, values: Mapping[str, Any]) -> None:
        async with self._write(images_unchanged=True) as conn:
            await conn.execute(
                microvms.update().where(microvms.c.microvm_id == microvm_id).values(**values)
            )

    async def add_usage(
        self,
        microvm_id: str,
        *,
        vcpu_seconds: float = 0.0,
        gib_seconds: float = 0.0,
        snapshot_bytes_written: int = 0,
        snapshot_bytes_read: int = 0,
    ) -> None:
        u = usage.c
        async with self._write(images_unchanged=True) as conn:
            await conn.execute(
                usage.update()
                .where(u.microvm_id == microvm_id)
                .values(
                    vcpu_seconds=u.vcpu_seconds + vcpu_seconds,
                    gib_seconds=u.gib_seconds + gib_seconds,
                    snapshot_bytes_written=u.snapshot_bytes_written + snapshot_bytes_written,
                    snapshot_bytes_read=u.snapshot_bytes_read + snapshot_bytes_read,
                )
            )

    async def get_usage(self, microvm_id: str) -> UsageRecord:
        async with self._read() as conn:
            row = (
                await conn.execute(sa.select(usage).where(usage.c.microvm_id == microvm_id))
            ).first()
        return UsageRecord(**row._mapping) if row is not None else UsageRecord(microvm_id)
