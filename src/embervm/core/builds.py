"""``BuildRunner``: image builds in the background, at most ``concurrent_builds`` at once.

An API call stores the version and its build PENDING and hands the job here; the runner moves
both IN_PROGRESS, drives core's ``ImageBuilder`` seam and ends the build, the version and the
image in one store change: SUCCESSFUL with the snapshot, or FAILED with the builder's reason
(``BuildFailure``; anything else is an internal error, logged). The tasks belong to the
``Supervisor`` (its ``spawn``), which stops them with everything else.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from embervm.contracts import BuildJob, BuiltImage
from embervm.core.clock import Clock, to_datetime
from embervm.core.seams import ImageBuilder
from embervm.errors import BuildFailure
from embervm.store import BuildChange, BuildFilter, ImageChange, Page, Repository, VersionChange

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
    ) -> None:
        self.repo = repository
        self.builder = builder
        self.clock = clock
        self._spawn = spawn
        self._slots = asyncio.Semaphore(max(1, concurrent_builds))

    def start(self, job: BuildJob, *, building: str, done: str, failed: str) -> None:
        """Run ``job`` in the background; the image goes ``building`` → ``done``|``failed``."""
        self._spawn(self._build(job, building, done, failed), f"build {job.image_name}")

    async def _build(self, job: BuildJob, building: str, done: str, failed: str) -> None:
        number = int(job.version)
        async with self._slots:
            started = await self.repo.apply(
                BuildChange(job.build_id, {"state": "IN_PROGRESS"}, ("PENDING",)),
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
        """After a restart: builds that were running are failed (their build VM is gone)."""
        for version in await self.repo.versions_in_states(("PENDING", "IN_PROGRESS")):
            image = await self.repo.get_image(version.account_id, version.image_name)
            builds = await self.repo.list_builds(
                version.account_id,
                version.image_name,
                version.number,
                Page(limit=50),
                BuildFilter(),
            )
            building = image.state if image is not None else "CREATING"
            failed = "CREATE_FAILED" if building == "CREATING" else "UPDATE_FAILED"
            for build in builds or []:
                await self.fail(
                    version.account_id,
                    version.image_name,
                    version.number,
                    build.build_id,
                    "the server restarted during the build",
                    building=building,
                    failed=failed,
                )
