"""``SqlRepository``: the ``Repository`` on SQLAlchemy Core (async), SQLite or PostgreSQL.

Every write runs in one transaction (``_write``): on SQLite it holds the in-process writer
lock and begins IMMEDIATE; on PostgreSQL, writers that count (admission, image creation,
deletes) first take the ``admission`` row lock, and state changes are conditional UPDATEs
(``WHERE state IN (...)``), so two racing transitions cannot both win. Database errors are
translated to ``InternalError`` at the boundary (``sql_transactions``).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from embervm.store.records import (
    ACTIVE_MICROVM_STATES,
    BuildRecord,
    DeleteStatus,
    IdempotencyClaim,
    ImageRecord,
    InsertOutcome,
    VersionRecord,
)
from embervm.store.repository import (
    BuildFilter,
    Change,
    ImageChange,
    Page,
    VersionChange,
)
from embervm.store.schema import (
    image_builds,
    image_tags,
    image_versions,
    images,
    microvms,
)
from embervm.store.sql_hosts import SqlHosts
from embervm.store.sql_microvms import SqlMicrovms
from embervm.store.sql_secrets import SqlSecrets
from embervm.store.sql_transactions import Rollback, no_seq

BUILDING_IMAGE_STATES = ("CREATING", "UPDATING")
BUILDING_VERSION_STATES = ("PENDING", "IN_PROGRESS")


class SqlRepository(SqlMicrovms, SqlHosts, SqlSecrets):
    """See module doc. The transactions are ``sql_transactions``'s, the MicroVM rows
    ``sql_microvms``'s, the fleet's hosts ``sql_hosts``'s (``HostRegistry``), its shared
    secrets ``sql_secrets``'s (``SecretStore``); the image, version, build and tag rows are
    here."""

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
            await conn.execute(images.insert().values(**no_seq(image)))
            await conn.execute(image_versions.insert().values(**asdict(version)))
            await conn.execute(image_builds.insert().values(**no_seq(build)))
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
            await conn.execute(image_builds.insert().values(**no_seq(build)))
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
                        raise Rollback(False)
                    if isinstance(change, VersionChange):
                        touched.add((change.account_id, change.image_name))
                for account_id, name in touched:
                    await self._refresh_latest_active(conn, account_id, name)
                return True
        except Rollback as rollback:
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
