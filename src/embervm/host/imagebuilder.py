"""``PipelineImageBuilder`` (core's ``ImageBuilder``) and ``BuildLogFiles`` (its
``BuildLogSource``): builds run by ``embervm.imagebuild.ImageBuild`` on this host's build microVMs.

Files of one version live in ``DATA_DIR/images/<account>/<image>/<version>/``: ``snapshot/``
(what RunMicrovm restores), ``build.log`` (JSON records, followed live by the API) and
``work/`` (temp space, removed after the build). Step layers are shared by every image in
``DATA_DIR/layers`` and found by content hash in ``DATA_DIR/build-cache``.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

from embervm.blobs import SYSTEM_DENIED, FilePolicy, S3Config, fetch_code_artifact
from embervm.config import Settings
from embervm.contracts import BuildJob, BuiltImage
from embervm.errors import BuildFailure
from embervm.imagebuild import (
    ImageBuild,
    LocalBuildLog,
    LocalLayerCache,
    MachineProvider,
    NullBuildLog,
    open_build_log,
    spec_from_request,
)

BUILD_LOG = "build.log"
FOLLOW_IDLE_TIMEOUT = 3600.0  # a log whose writer died (server killed) ends after this


def artifact_file_policy(settings: Settings) -> FilePolicy:
    """``file://`` artifacts come from the data dir's uploads folder (where the CLI puts them)
    and the ``--artifact-root`` folders only: the server runs as root, so any other path would
    let an API caller read, or probe for, the host's files. Never from the rest of the data
    dir (token keys, credentials, TLS keys, other accounts' images), /proc, /sys or /dev, even
    under an artifact root."""
    return FilePolicy(
        roots=(settings.uploads_dir, *(settings.artifact_roots or ())),
        denied=(*SYSTEM_DENIED, settings.data_dir),
        carve_outs=(settings.uploads_dir,),
    )


def artifact_s3_config(settings: Settings) -> S3Config:
    """``s3://`` artifacts: the configured endpoint (AWS if none) in the server's region;
    credentials from boto3's chain (``AWS_ACCESS_KEY_ID``…, ``AWS_PROFILE``, instance roles).

    Buckets: ``--artifact-s3-bucket`` when given; else every bucket of a configured endpoint
    (the operator's own store, credentials made for it) and none on AWS, where the chain is
    the host's identity and would read any bucket it can for any API caller."""
    buckets = settings.artifact_s3_buckets
    if buckets is None and settings.s3_endpoint_url is None:
        buckets = ()
    return S3Config(
        endpoint_url=settings.s3_endpoint_url,
        region=settings.region,
        ca_file=settings.s3_ca_file,
        buckets=frozenset(buckets) if buckets is not None else None,
    )


class PipelineImageBuilder:
    def __init__(self, settings: Settings, machines: MachineProvider) -> None:
        self.settings = settings
        self.machines = machines
        self.cache = LocalLayerCache(settings.build_cache_dir)

    def version_dir(self, account_id: str, image_name: str, version: str) -> Path:
        return self.settings.images_dir / account_id / image_name / version

    async def build(self, job: BuildJob) -> BuiltImage:
        root = self.version_dir(job.account_id, job.image_name, job.version)
        # A directory left by an earlier image of the same name (deleted, then created
        # again) or by a build cut short by a restart: versions are new, so it is stale.
        await asyncio.to_thread(shutil.rmtree, root, True)
        await asyncio.to_thread((root / "work").mkdir, parents=True)
        uri = str(job.request.get("codeArtifact", {}).get("uri", ""))

        async def fetch(dest: Path) -> Path:
            return await fetch_code_artifact(
                uri,
                dest,
                s3_config=artifact_s3_config(self.settings),
                file_policy=artifact_file_policy(self.settings),
                private_networks=self.settings.artifact_private_networks,
            )

        spec = spec_from_request(
            job.request, fetch=fetch, snapshot_dir=root / "snapshot", work_dir=root / "work"
        )
        log = await asyncio.to_thread(open_build_log, job.request.get("logging"), root / BUILD_LOG)
        outcome = "FAILED"
        try:
            result = await ImageBuild(spec, provider=self.machines, cache=self.cache, log=log).run()
            outcome = "SUCCESSFUL"
        finally:
            if isinstance(log, NullBuildLog):  # logging disabled: only the end, for followers
                await asyncio.to_thread(_end_only_log, root / BUILD_LOG, outcome)
            await asyncio.to_thread(shutil.rmtree, root / "work", True)
        if not result.snapshot_dir.is_dir():
            raise BuildFailure("the build ended without a snapshot")
        return BuiltImage(
            snapshot_dir=result.snapshot_dir,
            memory_mib=spec.app_memory_mib,
            memory_snapshot_bytes=result.memory_snapshot_bytes,
            disk_snapshot_bytes=result.disk_snapshot_bytes,
            code_install_bytes=result.code_install_bytes,
        )

    async def discard(self, image_name: str, version: str | None) -> None:
        base = self.settings.images_dir / self.settings.account_id / image_name
        target = base / version if version is not None else base
        await asyncio.to_thread(shutil.rmtree, target, True)


class BuildLogFiles:
    """Build logs as ``PipelineImageBuilder`` writes them (one JSON record per line)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def lines(self, image_name: str, version: str, *, follow: bool) -> AsyncIterator[str]:
        path = self.settings.images_dir / self.settings.account_id / image_name / version
        path = path / BUILD_LOG
        if not follow:
            text = await asyncio.to_thread(_read_text, path)
            # Only whole lines: a build still running may be half-way through a record.
            for line in text.split("\n")[:-1]:
                if line.strip():
                    yield line
            return
        async for record in LocalBuildLog.follow(path, idle_timeout=FOLLOW_IDLE_TIMEOUT):
            yield record.to_json()


def _end_only_log(path: Path, outcome: str) -> None:
    """A build log holding just its end record (the build asked for no logs)."""
    LocalBuildLog(path).close(outcome)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
