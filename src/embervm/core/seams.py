"""The seams core drives real work through (``typing.Protocol``s) and the values they carry.

- ``HostBackend``: runs VMs (``embervm.host.LocalHost`` behind a thin adapter in the server).
- ``ImageBuilder``: builds an image version into a snapshot (``PipelineImageBuilder`` in
  ``core.pipeline`` adapts ``embervm.build``).
- ``BuildLogSource`` / ``AppLogSource``: lines of build logs and app logs, for the API's log
  extension endpoints (core checks the resource exists, then delegates).
- ``TokenIssuer``: endpoint and shell tokens (``core.tokens.TokenAuthority``, the proxy's).

Every method may raise ``embervm.errors.RuntimeFailure`` subclasses (or ``BuildFailure`` for a
build); core turns those into states with a ``stateReason``, never into 500s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

SHELL_PORT = 8022


@dataclass(frozen=True)
class VmSpec:
    """One VM to launch from an image version's snapshot (RunMicrovm)."""

    microvm_id: str
    snapshot_dir: Path
    memory_mib: int
    vcpus: int  # whole vCPUs for the VMM: max(1, memory / 2 GiB)
    cpu_fraction: float  # the share of a CPU the VM is entitled to: memory / 2 GiB (¼ at 512)
    egress: bool  # INTERNET_EGRESS
    ingress: tuple[str, ...]  # connector names: ALL_INGRESS, HTTP_INGRESS, SHELL_INGRESS...
    hooks: Mapping[str, Any] | None  # the image version's model ``Hooks`` (port, microvmHooks)
    run_hook_payload: str | None  # body of the /run hook
    image_arn: str = ""
    image_version: str = ""
    environment: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class SuspendOutcome:
    """``completed`` False: the suspend was cancelled and the VM still runs."""

    completed: bool
    snapshot_bytes: int = 0


class HostBackend(Protocol):
    async def launch(self, vm: VmSpec) -> None:
        """Restore the snapshot into a new VM, run the /run hook; return when it serves."""
        ...

    async def suspend(self, microvm_id: str, *, cancel: asyncio.Event) -> SuspendOutcome:
        """Snapshot the VM to disk and stop its VMM. When ``cancel`` is set before the
        snapshot is final, stop, keep the VM running and return ``completed=False``."""
        ...

    async def resume(self, microvm_id: str) -> None:
        """Restore the VM from its suspend snapshot (and call its /resume hook)."""
        ...

    async def terminate(self, microvm_id: str) -> None:
        """Stop the VM and release everything it holds. Idempotent."""
        ...

    def address(self, microvm_id: str) -> str | None:
        """Where the proxy connects to reach the guest's ports (None: not running here)."""
        ...

    def is_running(self, microvm_id: str) -> bool: ...

    def is_suspended(self, microvm_id: str) -> bool:
        """The host holds the VM's suspend snapshot and no VMM for it (it can be resumed)."""
        ...


@dataclass(frozen=True)
class BuildJob:
    """One image version to build. ``request`` holds the version's configuration by model
    member names (baseImageArn, codeArtifact, hooks, environmentVariables, resources,
    egressNetworkConnectors, logging...), ready for ``embervm.build.spec_from_request``."""

    account_id: str
    image_name: str
    image_arn: str
    version: str
    build_id: str
    request: Mapping[str, Any]
    memory_mib: int


@dataclass(frozen=True)
class BuiltImage:
    snapshot_dir: Path
    memory_mib: int
    memory_snapshot_bytes: int = 0
    disk_snapshot_bytes: int = 0
    code_install_bytes: int = 0


class ImageBuilder(Protocol):
    async def build(self, job: BuildJob) -> BuiltImage:
        """Build the version's snapshot; raise ``BuildFailure(reason)`` when it fails."""
        ...

    async def discard(self, image_name: str, version: str | None) -> None:
        """Remove a deleted version's (or, with None, every version's) files. Best effort."""
        ...


class BuildLogSource(Protocol):
    def lines(self, image_name: str, version: str, *, follow: bool) -> AsyncIterator[str]:
        """JSON log records of one version's build (``embervm.build.log`` format); with
        ``follow``, until the build ends."""
        ...


class AppLogSource(Protocol):
    def lines(self, microvm_id: str, *, follow: bool) -> AsyncIterator[str]:
        """The VM's app output, one line each; with ``follow``, until the VM stops."""
        ...


@dataclass(frozen=True)
class PortGrant:
    """Ports a token opens: every port, or inclusive ranges (single ports are 1-wide)."""

    all_ports: bool = False
    ranges: tuple[tuple[int, int], ...] = ()

    def allows(self, port: int) -> bool:
        return self.all_ports or any(lo <= port <= hi for lo, hi in self.ranges)

    @classmethod
    def from_model(cls, specs: Sequence[Mapping[str, Any]]) -> PortGrant:
        """From the model's ``allowedPorts`` (shape rules already checked by the API)."""
        ranges: list[tuple[int, int]] = []
        for spec in specs:
            if "allPorts" in spec:
                return cls(all_ports=True)
            if "port" in spec:
                ranges.append((int(spec["port"]), int(spec["port"])))
            elif "range" in spec:
                ranges.append((int(spec["range"]["startPort"]), int(spec["range"]["endPort"])))
        return cls(ranges=tuple(ranges))


TokenKind = Literal["endpoint", "shell"]


class TokenIssuer(Protocol):
    def issue(
        self, microvm_id: str, *, kind: TokenKind, ports: PortGrant, expires_in_minutes: int
    ) -> str: ...
