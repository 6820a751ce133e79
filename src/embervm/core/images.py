"""Image operations: images, versions, builds, managed base images, tags, build logs.

An image is a name with numbered, immutable versions. Create/UpdateMicrovmImage add a version
(PENDING) with one build and start it in the background; the image is CREATING/UPDATING until
the build ends (CREATED/UPDATED, or CREATE_FAILED/UPDATE_FAILED with ``latestFailedImageVersion``).
A SUCCESSFUL version is ACTIVE; ``latestActiveImageVersion`` is the newest ACTIVE one, which
RunMicrovm uses unless a version is named. Deletes are refused while a VM uses the image.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from embervm.contracts import BuildJob
from embervm.core import render
from embervm.core.caller import Caller
from embervm.core.context import CoreContext, claim_for
from embervm.core.ids import (
    EGRESS_CONNECTORS,
    IMAGE_ARN_RE,
    MANAGED_ACCOUNT,
    ImageRef,
    image_arn,
    new_build_id,
    normalize_connectors,
    parse_image_identifier,
)
from embervm.core.paging import page_size
from embervm.errors import ConflictError, NotFoundError, QuotaExceededError, ValidationError
from embervm.store import (
    BuildFilter,
    BuildRecord,
    ImageRecord,
    Page,
    VersionChange,
    VersionRecord,
)

MANAGED_IMAGES = {"debian12": ("1",)}
MANAGED_CREATED_AT = datetime(2025, 9, 9, tzinfo=UTC)
ARTIFACT_SCHEMES = ("file://", "s3://", "https://")
UPDATABLE_STATES = ("CREATED", "UPDATED", "CREATE_FAILED", "UPDATE_FAILED")


def _empty_lines() -> AsyncIterator[str]:
    async def gen() -> AsyncIterator[str]:
        lines: tuple[str, ...] = ()
        for line in lines:
            yield line

    return gen()


class ImageService:
    def __init__(self, ctx: CoreContext) -> None:
        self.ctx = ctx

    # -- lookups -----------------------------------------------------------------------------

    def _own_ref(self, identifier: str, caller: Caller) -> ImageRef:
        ref = parse_image_identifier(identifier, caller.account_id)
        if ref.managed:
            raise ValidationError(
                f"'{identifier}' is a managed base image: build an image FROM it instead"
            )
        return ref

    async def _image(self, identifier: str, caller: Caller) -> ImageRecord:
        ref = self._own_ref(identifier, caller)
        image = None
        if ref.account_id == caller.account_id:
            image = await self.ctx.repo.get_image(ref.account_id, ref.name)
        if image is None or image.state == "DELETED":
            raise NotFoundError(
                f"MicroVM image {identifier} not found",
                resourceId=identifier,
                resourceType="MicrovmImage",
            )
        return image

    async def _version(self, image: ImageRecord, version: str) -> VersionRecord:
        record = None
        if version.isdigit() and len(version) < 10:
            record = await self.ctx.repo.get_version(image.account_id, image.name, int(version))
        if record is None or record.state == "DELETED":
            raise NotFoundError(
                f"Version {version} of MicroVM image {image.name} not found",
                resourceId=f"{image.arn}:{version}",
                resourceType="MicrovmImageVersion",
            )
        return record

    # -- configuration rules (cross-field; shapes were checked by the API) -------------------

    def _config(self, params: dict[str, Any], caller: Caller) -> tuple[dict[str, Any], int]:
        base = str(params["baseImageArn"])
        match = IMAGE_ARN_RE.match(base)
        if not match or match["account"] != MANAGED_ACCOUNT or match["name"] not in MANAGED_IMAGES:
            raise ValidationError(
                f"baseImageArn '{base}' is not a managed base image; use "
                f"{image_arn(caller.region, MANAGED_ACCOUNT, 'debian12')}"
            )
        base_version = params.get("baseImageVersion")
        if base_version is not None and base_version not in MANAGED_IMAGES[match["name"]]:
            raise ValidationError(f"baseImageVersion '{base_version}' does not exist")
        uri = (params.get("codeArtifact") or {}).get("uri")
        if not uri:
            raise ValidationError("codeArtifact.uri is required")
        if not str(uri).startswith(ARTIFACT_SCHEMES):
            raise ValidationError("codeArtifact.uri must be a file://, s3:// or https:// URI")
        for cpu in params.get("cpuConfigurations") or []:
            if cpu.get("architecture") != "X86_64":
                raise ValidationError("Only the X86_64 architecture is supported here")
        resources = params.get("resources") or []
        memory = self.ctx.limits.default_memory_mib
        if resources:
            memory = int(resources[0]["minimumMemoryInMiB"])
            low, high = self.ctx.limits.min_memory_mib, self.ctx.limits.max_memory_mib
            if not low <= memory <= high:
                raise ValidationError(
                    f"resources.minimumMemoryInMiB must be between {low} and {high}"
                )
        config = {k: params[k] for k in render.VERSION_CONFIG_MEMBERS if params.get(k) is not None}
        if "egressNetworkConnectors" in config:
            config["egressNetworkConnectors"] = normalize_connectors(
                config["egressNetworkConnectors"],
                region=caller.region,
                allowed=EGRESS_CONNECTORS,
                field="egressNetworkConnectors",
            )
        return config, memory

    def _job(self, image: ImageRecord, version: VersionRecord, build_id: str) -> BuildJob:
        return BuildJob(
            account_id=image.account_id,
            image_name=image.name,
            image_arn=image.arn,
            version=version.version,
            build_id=build_id,
            request=dict(version.config),
            memory_mib=version.memory_mib,
        )

    def _new_build(self, account_id: str, name: str, number: int, now: datetime) -> BuildRecord:
        return BuildRecord(
            build_id=new_build_id(),
            account_id=account_id,
            image_name=name,
            version_number=number,
            state="PENDING",
            architecture="X86_64",
            chipset="INTEL",
            chipset_generation=self.ctx.chipset_generation,
            created_at=now,
        )

    # -- create / update ---------------------------------------------------------------------

    async def create(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        name = str(params["name"])
        config, memory = self._config(params, caller)
        now = self.ctx.now()
        arn = image_arn(caller.region, caller.account_id, name)
        image = ImageRecord(caller.account_id, name, arn, "CREATING", now, now, next_version=2)
        version = VersionRecord(
            caller.account_id, name, 1, "PENDING", "INACTIVE", config, memory, now, now
        )
        build = self._new_build(caller.account_id, name, 1, now)
        tags = dict(params.get("tags") or {})
        claim = claim_for(
            params,
            account_id=caller.account_id,
            scope="CreateMicrovmImage",
            resource_id=f"{name}/1",
        )
        outcome = await self.ctx.repo.create_image(
            image, version, build, tags, max_images=self.ctx.limits.max_images, claim=claim
        )
        if outcome.status == "created":
            self.ctx.supervisor.builds.start(
                self._job(image, version, build.build_id),
                building="CREATING",
                done="CREATED",
                failed="CREATE_FAILED",
            )
            return render.image_with_version(image, version, tags)
        if outcome.status == "replayed" and outcome.resource_id:
            return await self._replay(caller, outcome.resource_id)
        if outcome.status == "token_reused":
            raise ConflictError("clientToken was already used with a different request")
        if outcome.status == "quota_images":
            raise QuotaExceededError(
                f"At most {self.ctx.limits.max_images} MicroVM images per account",
                resourceType="MicrovmImage",
            )
        raise ConflictError(
            f"MicroVM image {name} already exists", resourceId=arn, resourceType="MicrovmImage"
        )

    async def _replay(self, caller: Caller, resource_id: str) -> dict[str, Any]:
        name, _, number = resource_id.partition("/")
        image = await self.ctx.repo.get_image(caller.account_id, name)
        version = await self.ctx.repo.get_version(caller.account_id, name, int(number))
        if image is None or version is None:
            raise ConflictError("clientToken belongs to an image that was deleted since")
        tags = await self.ctx.repo.get_tags(caller.account_id, name)
        return render.image_with_version(image, version, tags)

    async def update(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        image = await self._image(str(params["imageIdentifier"]), caller)
        config, memory = self._config(params, caller)
        now = self.ctx.now()
        number = image.next_version
        version = VersionRecord(
            image.account_id, image.name, number, "PENDING", "INACTIVE", config, memory, now, now
        )
        build = self._new_build(image.account_id, image.name, number, now)
        claim = claim_for(
            params,
            account_id=caller.account_id,
            scope="UpdateMicrovmImage",
            resource_id=f"{image.name}/{number}",
        )
        outcome = await self.ctx.repo.add_version(
            version,
            build,
            image_values={"state": "UPDATING", "state_reason": None, "updated_at": now},
            expect_image_states=UPDATABLE_STATES,
            claim=claim,
        )
        if outcome.status == "replayed" and outcome.resource_id:
            return await self._replay(caller, outcome.resource_id)
        if outcome.status == "token_reused":
            raise ConflictError("clientToken was already used with a different request")
        if outcome.status == "missing":
            raise NotFoundError(f"MicroVM image {image.name} not found")
        if outcome.status != "created":
            raise ConflictError(
                f"MicroVM image {image.name} is busy (a build or delete is in progress)",
                resourceId=image.arn,
                resourceType="MicrovmImage",
            )
        updated = await self.ctx.repo.get_image(image.account_id, image.name) or image
        self.ctx.supervisor.builds.start(
            self._job(updated, version, build.build_id),
            building="UPDATING",
            done="UPDATED",
            failed="UPDATE_FAILED",
        )
        return render.image_with_version(updated, version)

    # -- reads -------------------------------------------------------------------------------

    async def get(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        image = await self._image(str(params["imageIdentifier"]), caller)
        tags = await self.ctx.repo.get_tags(image.account_id, image.name)
        return render.image(image, tags)

    async def list(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        name_filter = params.get("nameFilter")
        scope = f"ListMicrovmImages|{caller.account_id}|{name_filter or ''}"
        after = self.ctx.pages.decode(params.get("nextToken"), scope)
        limit = page_size(params.get("maxResults"))
        rows = await self.ctx.repo.list_images(
            caller.account_id, Page(limit + 1, after), name_filter=name_filter
        )
        out: dict[str, Any] = {"items": [render.image_summary(r) for r in rows[:limit]]}
        if len(rows) > limit and rows[limit - 1].seq is not None:
            out["nextToken"] = self.ctx.pages.encode(scope, int(rows[limit - 1].seq or 0))
        return out

    async def get_version(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        image = await self._image(str(params["imageIdentifier"]), caller)
        version = await self._version(image, str(params["imageVersion"]))
        tags = await self.ctx.repo.get_tags(image.account_id, image.name)
        return render.version(version, image.arn, tags)

    async def list_versions(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        image = await self._image(str(params["imageIdentifier"]), caller)
        scope = f"ListMicrovmImageVersions|{caller.account_id}|{image.name}"
        after = self.ctx.pages.decode(params.get("nextToken"), scope)
        limit = page_size(params.get("maxResults"))
        rows = await self.ctx.repo.list_versions(
            image.account_id, image.name, Page(limit + 1, after)
        )
        out: dict[str, Any] = {"items": [render.version(r, image.arn) for r in rows[:limit]]}
        if len(rows) > limit:
            out["nextToken"] = self.ctx.pages.encode(scope, rows[limit - 1].number)
        return out

    async def update_version(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        image = await self._image(str(params["imageIdentifier"]), caller)
        version = await self._version(image, str(params["imageVersion"]))
        status = str(params["status"])
        allowed = ("SUCCESSFUL",) if status == "ACTIVE" else ("SUCCESSFUL", "FAILED")
        ok = await self.ctx.repo.apply(
            VersionChange(
                image.account_id,
                image.name,
                version.number,
                {"status": status, "updated_at": self.ctx.now()},
                allowed,
            )
        )
        if not ok:
            raise ConflictError(
                f"Version {version.version} is {version.state}; only a SUCCESSFUL version "
                "can be made ACTIVE",
                resourceId=f"{image.arn}:{version.version}",
                resourceType="MicrovmImageVersion",
            )
        return await self.get_version(params, caller)

    async def get_build(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        image = await self._image(str(params["imageIdentifier"]), caller)
        version = await self._version(image, str(params["imageVersion"]))
        build = await self.ctx.repo.get_build(str(params["buildId"]))
        if (
            build is None
            or build.account_id != image.account_id
            or build.image_name != image.name
            or build.version_number != version.number
        ):
            raise NotFoundError(
                f"Build {params['buildId']} not found", resourceType="MicrovmImageBuild"
            )
        return render.build(build, image.arn)

    async def list_builds(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        image = await self._image(str(params["imageIdentifier"]), caller)
        version = await self._version(image, str(params["imageVersion"]))
        filters = BuildFilter(
            params.get("architecture"), params.get("chipset"), params.get("chipsetGeneration")
        )
        scope = (
            f"ListMicrovmImageBuilds|{caller.account_id}|{image.name}|{version.number}|"
            f"{filters.architecture}|{filters.chipset}|{filters.chipset_generation}"
        )
        after = self.ctx.pages.decode(params.get("nextToken"), scope)
        limit = page_size(params.get("maxResults"))
        rows = await self.ctx.repo.list_builds(
            image.account_id, image.name, version.number, Page(limit + 1, after), filters
        )
        out: dict[str, Any] = {"items": [render.build_summary(r, image.arn) for r in rows[:limit]]}
        if len(rows) > limit:
            out["nextToken"] = self.ctx.pages.encode(scope, int(rows[limit - 1].seq or 0))
        return out

    # -- deletes -----------------------------------------------------------------------------

    async def delete(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        identifier = str(params["imageIdentifier"])
        ref = self._own_ref(identifier, caller)
        status = "missing"
        if ref.account_id == caller.account_id:
            status = await self.ctx.repo.delete_image(ref.account_id, ref.name)
        self._refuse(status, identifier)
        if status == "deleted":
            self.ctx.supervisor.spawn(self._discard(ref.name, None), f"discard {ref.name}")
        return {"imageIdentifier": identifier, "state": "DELETED"}

    async def delete_version(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        identifier = str(params["imageIdentifier"])
        version = str(params["imageVersion"])
        ref = self._own_ref(identifier, caller)
        status = "missing"
        if ref.account_id == caller.account_id and version.isdigit() and len(version) < 10:
            status = await self.ctx.repo.delete_image(
                ref.account_id, ref.name, version=int(version)
            )
        self._refuse(status, f"{identifier} version {version}")
        if status == "deleted":
            self.ctx.supervisor.spawn(
                self._discard(ref.name, version), f"discard {ref.name}/{version}"
            )
        return {"imageIdentifier": identifier, "imageVersion": version, "state": "DELETED"}

    def _refuse(self, status: str, what: str) -> None:
        if status == "missing":
            raise NotFoundError(f"MicroVM image {what} not found", resourceId=what)
        if status == "in_use":
            raise ConflictError(
                f"MicroVM image {what} is used by MicroVMs that are not terminated",
                resourceId=what,
                resourceType="MicrovmImage",
            )
        if status == "busy":
            raise ConflictError(
                f"MicroVM image {what} is being built; delete it once the build ends",
                resourceId=what,
                resourceType="MicrovmImage",
            )

    async def _discard(self, name: str, version: str | None) -> None:
        with contextlib.suppress(Exception):
            await self.ctx.supervisor.builds.discard(name, version)

    # -- managed images ----------------------------------------------------------------------

    async def list_managed(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        scope = f"ListManagedMicrovmImages|{caller.region}"
        after = self.ctx.pages.decode(params.get("nextToken"), scope) or 0
        limit = page_size(params.get("maxResults"))
        names = sorted(MANAGED_IMAGES)
        window = names[after : after + limit]
        out: dict[str, Any] = {
            "items": [
                {
                    "imageArn": image_arn(caller.region, MANAGED_ACCOUNT, name),
                    "createdAt": MANAGED_CREATED_AT,
                    "updatedAt": MANAGED_CREATED_AT,
                }
                for name in window
            ]
        }
        if after + limit < len(names):
            out["nextToken"] = self.ctx.pages.encode(scope, after + limit)
        return out

    async def list_managed_versions(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        identifier = str(params["imageIdentifier"])
        match = IMAGE_ARN_RE.match(identifier)
        name = match["name"] if match and match["account"] == MANAGED_ACCOUNT else identifier
        if name not in MANAGED_IMAGES:
            raise NotFoundError(
                f"Managed MicroVM image {identifier} not found", resourceId=identifier
            )
        scope = f"ListManagedMicrovmImageVersions|{name}"
        after = self.ctx.pages.decode(params.get("nextToken"), scope) or 0
        limit = page_size(params.get("maxResults"))
        versions = MANAGED_IMAGES[name]
        arn = image_arn(caller.region, MANAGED_ACCOUNT, name)
        out: dict[str, Any] = {
            "items": [
                {
                    "imageArn": arn,
                    "imageVersion": v,
                    "status": "AVAILABLE",
                    "supportedCpuConfigurations": [{"architecture": "X86_64"}],
                    "createdAt": MANAGED_CREATED_AT,
                    "updatedAt": MANAGED_CREATED_AT,
                }
                for v in versions[after : after + limit]
            ]
        }
        if after + limit < len(versions):
            out["nextToken"] = self.ctx.pages.encode(scope, after + limit)
        return out

    # -- tags --------------------------------------------------------------------------------

    def _tag_target(self, resource: str, caller: Caller) -> str:
        match = IMAGE_ARN_RE.match(resource)
        if not match or match["account"] != caller.account_id:
            raise NotFoundError(f"Resource {resource} not found", resourceId=resource)
        return match["name"]

    async def list_tags(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        name = self._tag_target(str(params["Resource"]), caller)
        image = await self.ctx.repo.get_image(caller.account_id, name)
        if image is None or image.state == "DELETED":
            raise NotFoundError(f"Resource {params['Resource']} not found")
        return {"Tags": await self.ctx.repo.get_tags(caller.account_id, name)}

    async def tag(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        name = self._tag_target(str(params["Resource"]), caller)
        if not await self.ctx.repo.tag(caller.account_id, name, dict(params["Tags"])):
            raise NotFoundError(f"Resource {params['Resource']} not found")
        return {}

    async def untag(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        name = self._tag_target(str(params["Resource"]), caller)
        if not await self.ctx.repo.untag(caller.account_id, name, list(params["TagKeys"])):
            raise NotFoundError(f"Resource {params['Resource']} not found")
        return {}

    # -- logs --------------------------------------------------------------------------------

    async def build_log_lines(
        self, identifier: str, version: str, follow: bool, caller: Caller
    ) -> AsyncIterator[str]:
        image = await self._image(identifier, caller)
        record = await self._version(image, version)
        if self.ctx.build_logs is None:
            return _empty_lines()
        return self.ctx.build_logs.lines(image.name, record.version, follow=follow)
