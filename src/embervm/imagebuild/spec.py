"""What one build is given (``BuildSpec``) and what it gives back (``BuildResult``): plain data,
apart from ``ImageBuild`` (``builder.py``), which acts on it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from embervm.imagebuild.cache import LayerRef
from embervm.imagebuild.machine import AppLaunch
from embervm.imagebuild.plan import ImageConfig
from embervm.imagebuild.ready import HookSettings
from embervm.imagebuild.unzip import ZipLimits

ArtifactFetcher = Callable[[Path], Awaitable[Path]]
"""Given a destination path, put the code artifact zip there (e.g. ``fetch_code_artifact``)."""


@dataclass(frozen=True)
class BuildSpec:
    """Everything one build needs (from CreateMicrovmImage / UpdateMicrovmImage)."""

    base_image_arn: str
    code_artifact: Path | ArtifactFetcher
    snapshot_dir: Path  # images/<name>/<version>/snapshot; must not exist yet
    work_dir: Path  # temp space is created (and removed) inside it
    environment: Mapping[str, str] = field(default_factory=dict)
    hooks: HookSettings = field(default_factory=HookSettings)
    egress: bool = False
    build_memory_mib: int = 2048  # the build VM (pip, compilers)
    app_memory_mib: int = 1024  # the snapshot's memory size: what RunMicrovm restores
    build_args: Mapping[str, str] = field(default_factory=dict)
    step_timeout: float = 900.0
    build_timeout: float = 1800.0
    grace: float = 30.0  # extra time a VM gets to answer before it is considered hung
    boot_timeout: float = 180.0  # a VM boot or restore (TCG boots take seconds, not minutes)
    zip_limits: ZipLimits = field(default_factory=ZipLimits)


@dataclass(frozen=True)
class BuildResult:
    snapshot_dir: Path
    layer: LayerRef
    config: ImageConfig
    app: AppLaunch
    memory_snapshot_bytes: int
    disk_snapshot_bytes: int
    code_install_bytes: int
    steps_total: int
    steps_cached: int
    warnings: tuple[str, ...] = ()

    def snapshot_build(self) -> dict[str, int]:
        """The model's ``SnapshotBuild`` shape (GetMicrovmImageBuild)."""
        return {
            "memorySnapshotSizeInBytes": self.memory_snapshot_bytes,
            "diskSnapshotSizeInBytes": self.disk_snapshot_bytes,
            "codeInstallSizeInBytes": self.code_install_bytes,
        }
