"""Records → output members by model name (timestamps as aware UTC datetimes)."""

from __future__ import annotations

from typing import Any

from embervm.store import BuildRecord, ImageRecord, MicrovmRecord, VersionRecord

VERSION_CONFIG_MEMBERS = (
    "baseImageArn",
    "baseImageVersion",
    "buildRoleArn",
    "description",
    "codeArtifact",
    "logging",
    "egressNetworkConnectors",
    "cpuConfigurations",
    "resources",
    "additionalOsCapabilities",
    "hooks",
    "environmentVariables",
)
"""The Create/UpdateMicrovmImage members a version keeps (and echoes back)."""


def _drop_none(values: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def image_summary(image: ImageRecord) -> dict[str, Any]:
    return _drop_none(
        {
            "imageArn": image.arn,
            "name": image.name,
            "state": image.state,
            "latestActiveImageVersion": image.latest_active_version,
            "latestFailedImageVersion": image.latest_failed_version,
            "createdAt": image.created_at,
        }
    )


def image(image: ImageRecord, tags: dict[str, str] | None = None) -> dict[str, Any]:
    out = image_summary(image)
    out["updatedAt"] = image.updated_at
    if tags:
        out["tags"] = dict(tags)
    return out


def version_config(version: VersionRecord) -> dict[str, Any]:
    return {k: version.config[k] for k in VERSION_CONFIG_MEMBERS if k in version.config}


def image_with_version(
    image_record: ImageRecord, version: VersionRecord, tags: dict[str, str] | None = None
) -> dict[str, Any]:
    """Create/UpdateMicrovmImage: the image, the new version's configuration and number."""
    out = {**version_config(version), **image(image_record, tags)}
    out["imageVersion"] = version.version
    return out


def version(version: VersionRecord, arn: str, tags: dict[str, str] | None = None) -> dict[str, Any]:
    out = {
        **version_config(version),
        "imageArn": arn,
        "imageVersion": version.version,
        "state": version.state,
        "status": version.status,
        "createdAt": version.created_at,
        "updatedAt": version.updated_at,
        "stateReason": version.state_reason,
    }
    if tags:
        out["tags"] = dict(tags)
    return _drop_none(out)


def build(build: BuildRecord, arn: str) -> dict[str, Any]:
    return _drop_none(
        {
            "imageArn": arn,
            "imageVersion": str(build.version_number),
            "buildId": build.build_id,
            "buildState": build.state,
            "architecture": build.architecture,
            "chipset": build.chipset,
            "chipsetGeneration": build.chipset_generation,
            "stateReason": build.state_reason,
            "createdAt": build.created_at,
            "snapshotBuild": dict(build.snapshot_build) if build.snapshot_build else None,
        }
    )


def build_summary(record: BuildRecord, arn: str) -> dict[str, Any]:
    out = build(record, arn)
    out.pop("snapshotBuild", None)
    return out


def microvm(vm: MicrovmRecord) -> dict[str, Any]:
    return _drop_none(
        {
            "microvmId": vm.microvm_id,
            "state": vm.state,
            "endpoint": vm.endpoint,
            "imageArn": vm.image_arn,
            "imageVersion": vm.image_version,
            "executionRoleArn": vm.execution_role_arn,
            "idlePolicy": dict(vm.idle_policy) if vm.idle_policy else None,
            "maximumDurationInSeconds": vm.maximum_duration_seconds,
            "startedAt": vm.started_at,
            "terminatedAt": vm.terminated_at,
            "stateReason": vm.state_reason,
            "ingressNetworkConnectors": list(vm.ingress),
            "egressNetworkConnectors": list(vm.egress),
        }
    )


def microvm_item(vm: MicrovmRecord) -> dict[str, Any]:
    return {
        "microvmId": vm.microvm_id,
        "state": vm.state,
        "imageArn": vm.image_arn,
        "imageVersion": vm.image_version,
        "startedAt": vm.started_at,
    }
