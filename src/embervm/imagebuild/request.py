"""CreateMicrovmImage / UpdateMicrovmImage parameters → ``BuildSpec``.

Core calls this with the request's members (model names) plus what only it knows: where the
snapshot goes, scratch space, and how to fetch ``codeArtifact.uri`` (``embervm.blobs.
fetch_code_artifact`` with the configured S3 endpoint; build does not import blobs).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from embervm.imagebuild.ready import HookSettings
from embervm.imagebuild.spec import ArtifactFetcher, BuildSpec

DEFAULT_APP_MEMORY_MIB = 1024
INTERNET_EGRESS = "INTERNET_EGRESS"


def build_egress(connectors: list[str] | None) -> bool:
    """Internet egress during the build: on by default (the model's default connector is
    INTERNET_EGRESS), on when that connector is named, off for an empty list or a VPC
    connector (no VPCs here)."""
    if connectors is None:
        return True
    return any(c.rsplit(":", 1)[-1] == INTERNET_EGRESS for c in connectors)


def spec_from_request(
    request: Mapping[str, Any],
    *,
    fetch: ArtifactFetcher,
    snapshot_dir: Path,
    work_dir: Path,
    **overrides: Any,
) -> BuildSpec:
    """The build of one image version; ``overrides`` set BuildSpec fields (timeouts...)."""
    resources = request.get("resources") or [{}]
    memory = int(resources[0].get("minimumMemoryInMiB") or DEFAULT_APP_MEMORY_MIB)
    return BuildSpec(
        base_image_arn=str(request["baseImageArn"]),
        code_artifact=fetch,
        snapshot_dir=snapshot_dir,
        work_dir=work_dir,
        environment=dict(request.get("environmentVariables") or {}),
        hooks=HookSettings.from_model(request.get("hooks")),
        egress=build_egress(request.get("egressNetworkConnectors")),
        app_memory_mib=memory,
        **overrides,
    )
