"""Image builds: code artifact → safe unzip → Dockerfile plan → cached steps in a build
microVM → ready check → snapshot (docs/BUILDS.md).

Layering inside the package: ``plan`` (data) ← ``dockerfile`` / ``dockerignore`` / ``_words``
(parsing) ← ``context`` (files for COPY) ← ``cache`` (keys, layer map) ← ``machine`` (the seam
the runtime implements) ← ``log`` / ``ready`` ← ``spec`` (a build's input and result, data) ←
``builder`` (orchestration) ← ``request``.
Its fakes live with the tests (``tests/framework/fake_imagebuild.py``). It imports no runtime
module: the host layer implements ``MachineProvider``; core wires a fetcher from ``embervm.blobs``.
"""

from embervm.imagebuild.builder import ImageBuild
from embervm.imagebuild.cache import LayerCache, LayerRef, LocalLayerCache
from embervm.imagebuild.context import BuildContext
from embervm.imagebuild.dockerfile import managed_image_name, parse_dockerfile
from embervm.imagebuild.dockerignore import DockerIgnore
from embervm.imagebuild.log import (
    BuildLog,
    LocalBuildLog,
    LogRecord,
    MemoryBuildLog,
    NullBuildLog,
    open_build_log,
)
from embervm.imagebuild.machine import (
    AppLaunch,
    AppMachine,
    BuildMachine,
    ExecOutcome,
    MachineProvider,
    OutputSink,
    SnapshotSizes,
    TreeEntry,
)
from embervm.imagebuild.plan import BuildPlan, ImageConfig
from embervm.imagebuild.ready import HOOK_PATH, HookSettings, http_hook, tcp_probe
from embervm.imagebuild.request import build_egress, spec_from_request
from embervm.imagebuild.spec import ArtifactFetcher, BuildResult, BuildSpec
from embervm.imagebuild.unzip import ZipLimits, safe_extract

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
