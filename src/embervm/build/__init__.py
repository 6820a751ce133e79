"""Image builds: code artifact → safe unzip → Dockerfile plan → cached steps in a build
microVM → ready check → snapshot (docs/BUILDS.md).

Layering inside the package: ``plan`` (data) ← ``dockerfile`` / ``dockerignore`` / ``_words``
(parsing) ← ``context`` (files for COPY) ← ``cache`` (keys, layer map) ← ``machine`` (the seam
the runtime implements) ← ``log`` / ``ready`` ← ``spec`` (a build's input and result, data) ←
``builder`` (orchestration) ← ``request``.
``testing`` holds public fakes of the seam. build imports no runtime module: the host layer
implements ``MachineProvider``; core wires a fetcher from ``embervm.blobs``.
"""

from embervm.build.builder import ImageBuild
from embervm.build.cache import LayerCache, LayerRef, LocalLayerCache
from embervm.build.context import BuildContext
from embervm.build.dockerfile import managed_image_name, parse_dockerfile
from embervm.build.dockerignore import DockerIgnore
from embervm.build.log import (
    BuildLog,
    LocalBuildLog,
    LogRecord,
    MemoryBuildLog,
    NullBuildLog,
    open_build_log,
)
from embervm.build.machine import (
    AppLaunch,
    AppMachine,
    BuildMachine,
    ExecOutcome,
    MachineProvider,
    OutputSink,
    SnapshotSizes,
    TreeEntry,
)
from embervm.build.plan import BuildPlan, ImageConfig
from embervm.build.ready import HOOK_PATH, HookSettings, http_hook, tcp_probe
from embervm.build.request import build_egress, spec_from_request
from embervm.build.spec import ArtifactFetcher, BuildResult, BuildSpec
from embervm.build.unzip import ZipLimits, safe_extract

__all__ = [
    "HOOK_PATH",
    "AppLaunch",
    "AppMachine",
    "ArtifactFetcher",
    "BuildContext",
    "BuildLog",
    "BuildMachine",
    "BuildPlan",
    "BuildResult",
    "BuildSpec",
    "DockerIgnore",
    "ExecOutcome",
    "HookSettings",
    "ImageBuild",
    "ImageConfig",
    "LayerCache",
    "LayerRef",
    "LocalBuildLog",
    "LocalLayerCache",
    "LogRecord",
    "MachineProvider",
    "MemoryBuildLog",
    "NullBuildLog",
    "OutputSink",
    "SnapshotSizes",
    "TreeEntry",
    "ZipLimits",
    "build_egress",
    "http_hook",
    "managed_image_name",
    "open_build_log",
    "parse_dockerfile",
    "safe_extract",
    "spec_from_request",
    "tcp_probe",
]
