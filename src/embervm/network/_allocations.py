"""Which VM holds which block of the pool, persisted so that it survives a restart.

One small JSON file per VM under ``<state_dir>/vms/<short id>.json``, written atomically (temp
file, fsync, rename, fsync of the directory): after a crash every file is either the old or the
new version. The allocation is written *before* any kernel object is created, so whatever a
crash leaves behind is found again by ``reclaim_leftovers``.

Concurrency: within the process an ``asyncio.Lock`` serialises allocations; across processes an
exclusive ``flock`` on ``<state_dir>/lock``, held for the store's lifetime, keeps a second
manager off the same state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from embervm.errors import NetworkSetupError
from embervm.fileio import atomic_write

from ._addressing import Pool
from ._names import short_id

FORMAT_VERSION = 1


@dataclass(frozen=True)
class Allocation:
    """One VM's claim on a block, as stored."""

    vm_id: str
    short: str
    block: int
    egress: bool


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` as JSON (``fileio.atomic_write``)."""
    atomic_write(path, json.dumps(data, sort_keys=True))


class AllocationStore:
    """Blocks of one pool, handed out to VM ids, kept in ``state_dir``."""

    def __init__(self, state_dir: Path, pool: Pool) -> None:
        self._dir = state_dir / "vms"
        self._lock_path = state_dir / "lock"
        self._pool = pool
        self._lock = asyncio.Lock()
        self._by_vm: dict[str, Allocation] = {}
        self._lock_file: IO[str] | None = None

    def open(self) -> None:
        """Take the state directory's lock and load every allocation (idempotent)."""
        if self._lock_file is not None:
            return
        self._dir.mkdir(parents=True, exist_ok=True)
        fh = open(self._lock_path, "a", encoding="utf-8")  # noqa: SIM115 - held until close()
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            fh.close()
            raise NetworkSetupError(
                f"network state directory {self._dir.parent} is in use by another process"
            ) from exc
        try:
            self._by_vm = {a.vm_id: a for a in self._load()}
        except BaseException:
            fh.close()
            raise
        self._lock_file = fh

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def _load(self) -> list[Allocation]:
        found: list[Allocation] = []
        for path in sorted(self._dir.glob("*.json")):
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                alloc = Allocation(
                    vm_id=str(raw["vm_id"]),
                    short=str(raw["short"]),
                    block=int(raw["block"]),
                    egress=bool(raw["egress"]),
                )
                pool = str(raw["pool"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise NetworkSetupError(f"unreadable network allocation {path}: {exc}") from exc
            if pool != str(self._pool):
                raise NetworkSetupError(
                    f"VM {alloc.vm_id} holds an address of pool {pool}, not {self._pool}: "
                    "destroy the VMs (or restore the old pool setting) before changing it"
                )
            found.append(alloc)
        return found

    def get(self, vm_id: str) -> Allocation | None:
        return self._by_vm.get(vm_id)

    def all(self) -> list[Allocation]:
        return sorted(self._by_vm.values(), key=lambda a: a.block)

    async def allocate(self, vm_id: str, *, egress: bool) -> Allocation:
        """The VM's allocation: its existing block if it has one, else the lowest free block."""
        self.open()
        async with self._lock:
            short = short_id(vm_id)
            existing = self._by_vm.get(vm_id)
            if existing is not None:
                block = existing.block
            else:
                clash = next((a for a in self._by_vm.values() if a.short == short), None)
                if clash is not None:
                    raise NetworkSetupError(
                        f"VM ids {vm_id!r} and {clash.vm_id!r} hash to the same names ({short})"
                    )
                block = self._lowest_free()
            alloc = Allocation(vm_id=vm_id, short=short, block=block, egress=egress)
            if alloc != existing:
                record = {"version": FORMAT_VERSION, "pool": str(self._pool), **asdict(alloc)}
                write_json_atomic(self._path(short), record)
                self._by_vm[vm_id] = alloc
            return alloc

    async def release(self, vm_id: str) -> None:
        """Forget the VM's block (idempotent)."""
        self.open()
        async with self._lock:
            alloc = self._by_vm.pop(vm_id, None)
            short = alloc.short if alloc else short_id(vm_id)
            with contextlib.suppress(FileNotFoundError):
                self._path(short).unlink()

    def _lowest_free(self) -> int:
        used = {a.block for a in self._by_vm.values()}
        for index in range(1, self._pool.size + 1):
            if index not in used:
                return index
        raise NetworkSetupError(f"network pool {self._pool} is exhausted ({self._pool.size} VMs)")

    def _path(self, short: str) -> Path:
        return self._dir / f"{short}.json"
