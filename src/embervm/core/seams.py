"""The seams core drives real work through (``typing.Protocol``s); the values they carry are
``embervm.contracts``.

- ``HostBackend``: runs VMs (``embervm.host.backend.LocalHostBackend`` over ``LocalHost``).
- ``ImageBuilder``: builds an image version into a snapshot (``PipelineImageBuilder`` in
  ``embervm.host.imagebuilder`` adapts ``embervm.imagebuild`` and ``embervm.blobs``).
- ``BuildLogSource`` / ``AppLogSource``: lines of build logs and app logs, for the API's log
  extension endpoints (core checks the resource exists, then delegates).
- ``TokenIssuer``: endpoint and shell tokens (``core.tokens.TokenAuthority``, the proxy's).

Every method may raise ``embervm.errors.RuntimeFailure`` subclasses (or ``BuildFailure`` for a
build); core turns those into states with a ``stateReason``, never into 500s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

from embervm.contracts import BuildJob, BuiltImage, PortGrant, SuspendOutcome, TokenKind, VmSpec


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


class ImageBuilder(Protocol):
    async def build(self, job: BuildJob) -> BuiltImage:
        """Build the version's snapshot; raise ``BuildFailure(reason)`` when it fails."""
        ...

    async def discard(self, image_name: str, version: str | None) -> None:
        """Remove a deleted version's (or, with None, every version's) files. Best effort."""
        ...


class BuildLogSource(Protocol):
    def lines(self, image_name: str, version: str, *, follow: bool) -> AsyncIterator[str]:
        """JSON log records of one version's build (``embervm.imagebuild.log`` format); with
        ``follow``, until the build ends."""
        ...


class AppLogSource(Protocol):
    def lines(self, microvm_id: str, *, follow: bool) -> AsyncIterator[str]:
        """The VM's app output, one line each; with ``follow``, until the VM stops."""
        ...


class TokenIssuer(Protocol):
    def issue(
        self, microvm_id: str, *, kind: TokenKind, ports: PortGrant, expires_in_minutes: int
    ) -> str: ...
