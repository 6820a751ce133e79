"""What the runtime must provide to the build pipeline (the seam between imagebuild/ and host/).

The build never touches QEMU, disks or networks itself: it asks a ``MachineProvider`` for a
build VM booted from a layer, runs steps in it, freezes layers, then asks for an app VM booted
from the final layer, checks readiness and snapshots it. Fakes implement these for unit tests
(``tests/unit/imagebuild``); the host layer implements them on real microVMs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from embervm.imagebuild.cache import LayerRef

OutputSink = Callable[[str, bytes], None]
"""Receives ``(stream, chunk)`` with stream "stdout" or "stderr"; chunks may split lines."""


@dataclass(frozen=True)
class ExecOutcome:
    exit_code: int
    timed_out: bool = False


@dataclass(frozen=True)
class TreeEntry:
    """A file or folder to create in the build VM. Missing parent folders are created (root,
    0755). Exactly one of ``source`` (a host file to copy) or ``data`` is set for files."""

    path: str
    is_dir: bool
    mode: int
    uid: int = 0
    gid: int = 0
    source: Path | None = None
    data: bytes | None = None


@dataclass(frozen=True)
class AppLaunch:
    """The image's app: CMD/ENTRYPOINT argv, environment (image ENV + environmentVariables)."""

    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str = "/"
    user: str | None = None


@dataclass(frozen=True)
class SnapshotSizes:
    memory_bytes: int
    disk_bytes: int


class BuildMachine(Protocol):
    """A build VM whose disk is an overlay on a layer; ``commit_layer`` freezes it."""

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        user: str | None,
        timeout: float,  # noqa: ASYNC109  # the guest kills the process after this
        on_output: OutputSink,
    ) -> ExecOutcome: ...

    async def put_file(
        self, path: str, data: bytes, *, mode: int, uid: int = 0, gid: int = 0
    ) -> None: ...

    async def put_tree(self, entries: Sequence[TreeEntry]) -> None: ...

    async def commit_layer(self) -> LayerRef:
        """Flush the guest's disk and freeze it as a layer; later writes go to a new overlay
        on top of it (the machine keeps running)."""
        ...

    async def shutdown(self) -> None:
        """Stop the VM (kill if it does not stop promptly) and free its files. Idempotent."""
        ...


class AppMachine(BuildMachine, Protocol):
    """A VM booted (or restored) from an image layer, running the app. Before the app starts
    it can still take build steps (an app-only rebuild's last ``COPY`` runs there)."""

    async def start_app(self, launch: AppLaunch, *, on_output: OutputSink) -> None: ...

    async def call_hook(self, port: int, hook: str, *, timeout: float) -> int | None:  # noqa: ASYNC109
        """POST ``/aws/lambda-microvms/runtime/v1/<hook>`` to the guest's ``port``; the HTTP
        status, or None when nothing answered within ``timeout``. (The agent's HTTP relay or a
        host→guest network path; ``embervm.imagebuild.ready.http_hook`` does the latter.)"""
        ...

    async def probe_port(self, port: int, *, timeout: float) -> bool:  # noqa: ASYNC109
        """Whether the guest's TCP ``port`` accepts connections."""
        ...

    async def wait_idle(self, *, timeout: float) -> bool:  # noqa: ASYNC109
        """Wait until the guest's CPUs are nearly idle (the app finished starting); False if
        it is still busy after ``timeout``."""
        ...

    async def app_exit_code(self) -> int | None:
        """None while the app runs; its exit code once it has exited."""
        ...

    async def snapshot(self, dest_dir: Path) -> SnapshotSizes:
        """Quiesce, then write memory + device state + frozen disk to ``dest_dir`` atomically."""
        ...

    async def shutdown(self) -> None: ...


class MachineProvider(Protocol):
    async def base_layer(self, image: str) -> LayerRef:
        """The layer of a managed base image (``debian12``)."""
        ...

    async def has_layer(self, layer: LayerRef) -> bool:
        """False when a cached layer was garbage-collected (the step then runs again)."""
        ...

    async def start_build_machine(
        self, layer: LayerRef, *, egress: bool, memory_mib: int
    ) -> BuildMachine: ...

    async def start_app_machine(
        self, layer: LayerRef, *, egress: bool, memory_mib: int
    ) -> AppMachine: ...

    async def restore_app_machine(self, snapshot_dir: Path, *, egress: bool) -> AppMachine: ...
