"""A damaged snapshot is refused before QEMU is started with it (audit B6).

Every file of a snapshot is damaged in turn (one byte flipped, or cut short); the check names
the file and what is wrong, and ``QemuVmm.restore`` raises before it spawns QEMU, leaving the
snapshot as it was. The real-VM version of this is ``tests/integration/chaos``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from embervm.errors import SnapshotError
from embervm.vmm import QemuVmm, VmConfig
from embervm.vmm import snapshot as snap

LONG_AGO_NS = 1_700_000_000 * 10**9  # files older than any write a test makes
QEMU_VERSION = "7.2.22"


def write_snapshot(dest: Path, kind: snap.SnapshotKind) -> snap.SnapshotManifest:
    """A small snapshot of ``kind`` with the files that kind has, committed like a real one."""
    tmp = snap.temp_dir_for(dest)
    contents = {snap.DEVICE_STATE: os.urandom(64 << 10), snap.DISK: os.urandom(48 << 10)}
    contents[snap.MEMORY if kind == "shared-memory" else snap.BASE_MEMORY] = os.urandom(1 << 20)
    files = {}
    for name, data in contents.items():
        (tmp / name).write_bytes(data)
        os.utime(tmp / name, ns=(LONG_AGO_NS, LONG_AGO_NS))
        digest = snap.sha256_file(tmp / name) if name == snap.DEVICE_STATE else None
        files[name] = snap.FileEntry(len(data), digest)
    manifest = snap.SnapshotManifest(
        kind=kind, vm_id="vm1", memory_mib=256, vcpus=1, accel="tcg",
        qemu_version=QEMU_VERSION, kernel_release="6.1.0", kernel="/k", initrd="/i",
        cmdline="console=ttyS0", files=files,
    )  # fmt: skip
    return snap.commit_snapshot_dir(tmp, dest, manifest)


def flip_byte(path: Path) -> None:
    with path.open("r+b") as f:
        f.seek(path.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 1)


DAMAGE = {"flipped": flip_byte, "truncated": truncate}
# (kind, file, damage) -> what the refusal must say
CASES = [
    ("delta", snap.DEVICE_STATE, "flipped", "device.state is corrupt (sha256 mismatch"),
    ("delta", snap.DEVICE_STATE, "truncated", "device.state is 65535 bytes, manifest says 65536"),
    ("delta", snap.BASE_MEMORY, "flipped", "base.memory was modified after the snapshot"),
    ("delta", snap.BASE_MEMORY, "truncated", "base.memory is 1048575 bytes"),
    ("delta", snap.DISK, "flipped", "disk.qcow2 was modified after the snapshot"),
    ("delta", snap.DISK, "truncated", "disk.qcow2 is 49151 bytes"),
    ("delta", snap.MANIFEST, "flipped", "manifest"),
    ("delta", snap.MANIFEST, "truncated", "manifest"),
    ("shared-memory", snap.MEMORY, "flipped", "memory was modified after the snapshot"),
    ("shared-memory", snap.MEMORY, "truncated", "memory is 1048575 bytes"),
]
IDS = [f"{kind}-{name}-{damage}" for kind, name, damage, _ in CASES]


@pytest.mark.parametrize(("kind", "name", "damage", "reason"), CASES, ids=IDS)
def test_a_damaged_file_is_refused_naming_the_file_and_the_problem(
    tmp_path: Path, kind: snap.SnapshotKind, name: str, damage: str, reason: str
) -> None:
    write_snapshot(tmp_path / "s", kind)
    snap.load_manifest(tmp_path / "s")  # intact: loads
    DAMAGE[damage](tmp_path / "s" / name)
    with pytest.raises(SnapshotError, match=r"^snapshot ") as refused:
        snap.load_manifest(tmp_path / "s")
    assert reason in str(refused.value)


def test_big_files_are_stamped_with_their_mtime_and_small_ones_hashed(tmp_path: Path) -> None:
    manifest = write_snapshot(tmp_path / "s", "delta")
    assert manifest == snap.load_manifest(tmp_path / "s")  # what commit returns is on disk
    stamps = {n: (e.sha256 is not None, e.mtime_ns) for n, e in manifest.files.items()}
    assert stamps == {
        snap.DEVICE_STATE: (True, None),
        snap.BASE_MEMORY: (False, LONG_AGO_NS),
        snap.DISK: (False, LONG_AGO_NS),
    }


def test_a_copy_that_keeps_times_loads_and_one_that_does_not_is_refused(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "s", "delta")
    shutil.copytree(tmp_path / "s", tmp_path / "kept")  # copy2: times kept (cp -a, rsync -a)
    snap.load_manifest(tmp_path / "kept")
    shutil.copytree(tmp_path / "s", tmp_path / "plain", copy_function=shutil.copyfile)
    with pytest.raises(SnapshotError, match="modified after the snapshot"):
        snap.load_manifest(tmp_path / "plain")


def test_a_manifest_without_stamps_still_loads(tmp_path: Path) -> None:
    """Snapshots suspended by the previous release (sizes only) can still be resumed."""
    manifest = write_snapshot(tmp_path / "s", "delta")
    files = {n: snap.FileEntry(e.size, e.sha256) for n, e in manifest.files.items()}
    old = snap.SnapshotManifest(**{**manifest.__dict__, "files": files})
    (tmp_path / "s" / snap.MANIFEST).write_bytes(old.to_json())
    os.utime(tmp_path / "s" / snap.DISK)  # touched: no stamp to compare with
    assert snap.load_manifest(tmp_path / "s") == old


class NoQemu(QemuVmm):
    """A ``QemuVmm`` that records, instead of doing, every attempt to start QEMU."""

    def __init__(self) -> None:
        super().__init__()
        self._version = QEMU_VERSION
        self.starts = 0

    async def _start(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        self.starts += 1
        raise AssertionError("QEMU must not be started with a damaged snapshot")


def vm_config(workdir: Path) -> VmConfig:
    workdir.mkdir()
    return VmConfig.for_workdir(
        "vm1", workdir, memory_mib=256, vcpus=1, kernel=Path("/k"), initrd=Path("/i"),
        cmdline="console=ttyS0",
    )  # fmt: skip


@pytest.mark.parametrize(("kind", "name", "damage", "reason"), CASES, ids=IDS)
async def test_restore_refuses_a_damaged_snapshot_before_starting_qemu(
    tmp_path: Path, kind: snap.SnapshotKind, name: str, damage: str, reason: str
) -> None:
    write_snapshot(tmp_path / "s", kind)
    DAMAGE[damage](tmp_path / "s" / name)
    before = sorted((p.name, p.stat().st_size) for p in (tmp_path / "s").iterdir())
    vmm = NoQemu()
    cfg = vm_config(tmp_path / "vm")
    with pytest.raises(SnapshotError) as refused:
        await vmm.restore(cfg, tmp_path / "s", consume=True)
    assert reason in str(refused.value)
    assert vmm.starts == 0
    assert list(cfg.workdir.iterdir()) == []  # no disk or RAM file taken over
    assert sorted((p.name, p.stat().st_size) for p in (tmp_path / "s").iterdir()) == before
