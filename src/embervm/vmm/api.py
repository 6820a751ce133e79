"""The seams between the VMM and everything above it (``host/``): two Protocols.

Nothing above ``vmm/`` may know which VMM runs (QEMU today, Firecracker on KVM hosts later).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from embervm.vmm.config import VmConfig, VmStats
from embervm.vmm.process import VmExit
from embervm.vmm.snapshot import SnapshotManifest


class VmProcess(Protocol):
    """One running VMM process and the VM inside it."""

    pid: int

    @property
    def returncode(self) -> int | None: ...

    async def status(self) -> str:
        """QEMU's run state: ``running``, ``paused``, ``finish-migrate``, ..."""
        ...

    async def pause(self) -> None: ...

    async def cont(self) -> None: ...

    async def snapshot(self, dest_dir: Path, *, resume: bool = False) -> SnapshotManifest: ...

    async def stop(self, timeout: float = 5.0) -> int: ...  # noqa: ASYNC109

    async def kill(self) -> None: ...

    async def stats(self) -> VmStats: ...

    async def wait(self) -> int: ...

    async def wait_exit(self) -> VmExit: ...

    async def detach(self) -> None: ...

    async def cancel_migration(self) -> None:
        """Cancel a snapshot a previous server run left in flight (after ``attach``)."""
        ...

    async def switch_disk_overlay(self, new: Path) -> None:
        """Move the VM's disk onto ``new``, an overlay over the current disk (which freezes)."""
        ...


class Vmm(Protocol):
    """Starts VMM processes: cold boot, restore from a snapshot, re-attach after a restart."""

    async def boot(self, cfg: VmConfig) -> VmProcess: ...

    async def restore(
        self, cfg: VmConfig, snapshot_dir: Path, *, consume: bool = False
    ) -> VmProcess: ...

    async def attach(self, cfg: VmConfig, pid: int) -> VmProcess: ...
