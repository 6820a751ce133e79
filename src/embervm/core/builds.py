"""``BuildRunner``: image builds in the background, at most ``concurrent_builds`` at once.

An API call stores the version and its build PENDING and hands the job here; the runner moves
both IN_PROGRESS, drives core's ``ImageBuilder`` seam and ends the build, the version and the
image in one store change: SUCCESSFUL with the snapshot, or FAILED with the builder's reason
(``BuildFailure``; anything else is an internal error, logged). The tasks belong to the
``Supervisor`` (its ``spawn``), which stops them with everything else.

In a fleet (docs/FLEET.md) an API process runs no build (``runs_builds=False``): the version
and build wait PENDING and any host may take one (``adopt``, when it has a free build slot),
writing its id and epoch on the build as it moves it IN_PROGRESS. The builds of a host that
was lost are failed by the API processes' reaper (``fail_builds_of``); a host that restarts
fails the ones it was running before (``fail_interrupted``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection, Coroutine
from typing import Any

from embervm.contracts import BuildJob, BuiltImage
from embervm.core.clock import Clock, to_datetime
from embervm.core.seams import ImageBuilder
from embervm.errors import BuildFailure
from embervm.store import (
    BuildChange,
    BuildFilter,
    BuildRecord,
    HostFence,
    ImageChange,
    Page,
    Repository,
    VersionChange,
    VersionRecord,
)

log = logging.getLogger("embervm.core")

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[None]"]


class BuildRunner:
    def __init__(
        self,
        *,
        repository: Repository,
        builder: ImageBuilder,
        clock: Clock,
        concurrent_builds: int,
        spawn: Spawn,
        runs_builds: bool = True,
        fence: HostFence | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        self.repo = repository
        self.builder = builder
        self.clock = clock
        self._spawn = spawn
        self._concurrent = max(1, concurrent_builds)
        self._slots = asyncio.Semaphore(self._concurrent)
        self.runs_builds = runs_builds
        self.fence = fence
        self._wake = wake
        self._mine: set[str] = set()  # build ids waiting for or holding a slot here

    def start(self, job: BuildJob, *, building: str, done: str, failed: str) -> None:
        """Run ``job`` in the background; the image goes ``building`` → ``done``|``failed``
        (an API process of a fleet: a host takes it)."""
        if not self.runs_builds:
            if self._wake is not None:
                self._wake()
            return
        self._start(job, building, done, failed)

    def _start(self, job: BuildJob, building: str, done: str, failed: str) -> None:
        self._mine.add(job.build_id)
        task = self._spawn(self._build(job, building, done, failed), f"build {job.image_name}")
        task.add_done_callback(lambda _: self._mine.discard(job.build_id))

    async def _build(self, job: BuildJob, building: str, done: str, failed: str) -> None:
        number = int(job.version)
        claim: dict[str, object] = {"state": "IN_PROGRESS"}
        if self.fence is not None:
            claim |= {"host_id": self.fence.host_id, "host_epoch": self.fence.epoch}
        async with self._slots:
            started = await self.repo.apply(
                BuildChange(job.build_id, claim, ("PENDING",)),
                VersionChange(
                    job.account_id,
                    job.image_name,
                    number,
                    {"state": "IN_PROGRESS", "updated_at": to_datetime(self.clock.now())},
                    ("PENDING",),
                ),
            )
            if not started:
                return
            built: BuiltImage | None = None
            try:
                built = await self.builder.build(job)
                reason = ""
            except BuildFailure as exc:
                reason = exc.reason
            except Exception as exc:
                log.exception("build of %s/%s crashed", job.image_name, job.version)
                reason = f"internal error during the build ({type(exc).__name__})"
            await self._finish_build(job, built, reason, building, done, failed)

    async def _finish_build(
        self,
        job: BuildJob,
        built: BuiltImage | None,
        reason: str,
        building: str,
        done: str,
        failed: str,
    ) -> None:
        number = int(job.version)
        now = to_datetime(self.clock.now())
        if built is not None:
            await self.repo.apply(
                BuildChange(
                    job.build_id,
                    {
                        "state": "SUCCESSFUL",
                        "snapshot_build": {
                            "memorySnapshotSizeInBytes": built.memory_snapshot_bytes,
                            "diskSnapshotSizeInBytes": built.disk_snapshot_bytes,
                            "codeInstallSizeInBytes": built.code_install_bytes,
                        },
                    },
                    ("IN_PROGRESS",),
                ),
                VersionChange(
                    job.account_id,
                    job.image_name,
                    number,
                    {
                        "state": "SUCCESSFUL",
                        "status": "ACTIVE",
                        "snapshot_dir": str(built.snapshot_dir),
                        "memory_mib": built.memory_mib,
                        "updated_at": now,
                    },
                    ("IN_PROGRESS",),
                ),
                ImageChange(
                    job.account_id,
                    job.image_name,
                    {"state": done, "state_reason": None, "updated_at": now},
                    (building,),
                ),
            )
            return
        await self.fail(
            job.account_id,
            job.image_name,
            number,
            job.build_id,
            reason,
            building=building,
            failed=failed,
        )

    async def fail(
        self,
        account_id: str,
        image_name: str,
        number: int,
        build_id: str,
        reason: str,
        *,
        building: str,
        failed: str,
    ) -> None:
        now = to_datetime(self.clock.now())
        await self.repo.apply(
            BuildChange(
                build_id, {"state": "FAILED", "state_reason": reason}, ("PENDING", "IN_PROGRESS")
            ),
            VersionChange(
                account_id,
                image_name,
                number,
                {
                    "state": "FAILED",
                    "status": "INACTIVE",
                    "state_reason": reason,
                    "updated_at": now,
                },
                ("PENDING", "IN_PROGRESS"),
            ),
            ImageChange(
                account_id,
                image_name,
                {
                    "state": failed,
                    "state_reason": reason,
                    "latest_failed_version": str(number),
                    "updated_at": now,
                },
                (building,),
            ),
        )

    async def discard(self, image_name: str, version: str | None) -> None:
        """Remove a deleted version's (or, with None, every version's) files. Best effort."""
        await self.builder.discard(image_name, version)

    async def fail_interrupted(self) -> None:
        """After a restart: builds that were running here are failed (their build VM is
        gone). One machine: every unfinished build; a fleet host: those it ran at an older
        epoch; an API process of a fleet: none (hosts run them)."""
        if not self.runs_builds:
            return
        if self.fence is not None:
            fence = self.fence
            await self._fail_where(
                lambda build: build.host_id == fence.host_id and build.host_epoch != fence.epoch,
                "the host restarted during the build",
            )
            return
        await self._fail_where(lambda build: True, "the server restarted during the build")

    async def fail_builds_of(self, host_ids: Collection[str]) -> None:
        """The reaper: builds that lost hosts were running fail (their build VM is gone)."""
        lost = set(host_ids)
        if lost:
            await self._fail_where(
                lambda build: build.host_id in lost, "the host running the build was lost"
            )

    async def adopt(self) -> int:
        """A fleet host: take PENDING builds while build slots are free here. Returns how
        many it started."""
        started = 0
        for version, build, image_state in await self._waiting():
            if len(self._mine) >= self._concurrent:
                break
            if build.build_id in self._mine:
                continue
            image = await self.repo.get_image(version.account_id, version.image_name)
            if image is None:
                continue
            building = image_state
            updating = building == "UPDATING"
            self._start(
                BuildJob(
                    account_id=image.account_id,
                    image_name=image.name,
                    image_arn=image.arn,
                    version=version.version,
                    build_id=build.build_id,
                    request=dict(version.config),
                    memory_mib=version.memory_mib,
                ),
                building,
                "UPDATED" if updating else "CREATED",
                "UPDATE_FAILED" if updating else "CREATE_FAILED",
            )
            started += 1
        return started

    async def _waiting(self) -> list[tuple[VersionRecord, BuildRecord, str]]:
        found = []
        for version in await self.repo.versions_in_states(("PENDING",)):
            image = await self.repo.get_image(version.account_id, version.image_name)
            if image is None or image.state not in ("CREATING", "UPDATING"):
                continue
            for build in await self._builds_of(version):
                if build.state == "PENDING":
                    found.append((version, build, image.state))
        return found

    async def _builds_of(self, version: VersionRecord) -> list[BuildRecord]:
        return (
            await self.repo.list_builds(
                version.account_id,
                version.image_name,
                version.number,
                Page(limit=50),
                BuildFilter(),
            )
            or []
        )

    async def _fail_where(self, which: Callable[[BuildRecord], bool], reason: str) -> None:
        for version in await self.repo.versions_in_states(("PENDING", "IN_PROGRESS")):
            image = await self.repo.get_image(version.account_id, version.image_name)
            building = image.state if image is not None else "CREATING"
            failed = "CREATE_FAILED" if building == "CREATING" else "UPDATE_FAILED"
            for build in await self._builds_of(version):
                if build.state not in ("PENDING", "IN_PROGRESS") or not which(build):
                    continue
                await self.fail(
                    version.account_id,
                    version.image_name,
                    version.number,
                    build.build_id,
                    reason,
                    building=building,
                    failed=failed,
                )
