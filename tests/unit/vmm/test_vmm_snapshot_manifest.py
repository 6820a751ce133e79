import dataclasses
import json
from pathlib import Path

import pytest

from embervm.errors import SnapshotError
from embervm.vmm import snapshot as snap


def manifest(files: dict[str, snap.FileEntry]) -> snap.SnapshotManifest:
    return snap.SnapshotManifest(
        kind="shared-memory", vm_id="vm1", memory_mib=256, vcpus=1, accel="tcg",
        qemu_version="7.2.22", kernel_release="6.1.0", kernel="/k", initrd="/i",
        cmdline="console=ttyS0", files=files,
    )  # fmt: skip


def write_snapshot(dest: Path, state: bytes = b"device-state") -> snap.SnapshotManifest:
    tmp = snap.temp_dir_for(dest)
    (tmp / snap.DEVICE_STATE).write_bytes(state)
    (tmp / snap.DISK).write_bytes(b"disk")
    m = manifest({
        snap.DEVICE_STATE: snap.FileEntry(len(state), snap.sha256_file(tmp / snap.DEVICE_STATE)),
        snap.DISK: snap.FileEntry(4),
    })  # fmt: skip
    return snap.commit_snapshot_dir(tmp, dest, m)


def test_written_snapshot_loads_back_identical(tmp_path: Path) -> None:
    m = write_snapshot(tmp_path / "s")
    assert snap.load_manifest(tmp_path / "s") == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temp dir left


def test_missing_snapshot_is_a_snapshot_error(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="no snapshot"):
        snap.load_manifest(tmp_path / "nothing")


def test_edited_manifest_fails_its_self_check(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "s")
    path = tmp_path / "s" / snap.MANIFEST
    body = json.loads(path.read_text())
    body["memory_mib"] = 512
    path.write_text(json.dumps(body))
    with pytest.raises(SnapshotError, match="checksum"):
        snap.load_manifest(tmp_path / "s")


def test_garbage_manifest_is_unreadable(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "s")
    (tmp_path / "s" / snap.MANIFEST).write_text("{not json")
    with pytest.raises(SnapshotError, match="unreadable"):
        snap.load_manifest(tmp_path / "s")


def test_other_format_version_is_refused(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "s")
    path = tmp_path / "s" / snap.MANIFEST
    body = json.loads(path.read_text())
    body["format"] = 99
    path.write_text(json.dumps(body))
    with pytest.raises(SnapshotError, match="format 99"):
        snap.load_manifest(tmp_path / "s")


def test_format_1_snapshots_of_the_previous_release_still_load(tmp_path: Path) -> None:
    m = write_snapshot(tmp_path / "s")
    old = dataclasses.replace(m, format=1)
    (tmp_path / "s" / snap.MANIFEST).write_bytes(old.to_json())
    assert snap.load_manifest(tmp_path / "s") == old
    assert m.format == snap.FORMAT_VERSION == 2


def test_a_kind_this_release_does_not_know_is_refused(tmp_path: Path) -> None:
    m = write_snapshot(tmp_path / "s")
    future = dataclasses.replace(m, kind="mapped-ram")  # type: ignore[arg-type]
    (tmp_path / "s" / snap.MANIFEST).write_bytes(future.to_json())
    with pytest.raises(SnapshotError, match="unknown kind 'mapped-ram'"):
        snap.load_manifest(tmp_path / "s")


def test_flipped_byte_in_device_state_is_detected(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "s", b"device-state")
    (tmp_path / "s" / snap.DEVICE_STATE).write_bytes(b"device-statE")
    with pytest.raises(SnapshotError, match="sha256"):
        snap.load_manifest(tmp_path / "s")


def test_truncated_or_missing_file_is_detected(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "s")
    (tmp_path / "s" / snap.DISK).write_bytes(b"d")
    with pytest.raises(SnapshotError, match="manifest says"):
        snap.load_manifest(tmp_path / "s")
    (tmp_path / "s" / snap.DISK).unlink()
    with pytest.raises(SnapshotError, match="missing"):
        snap.load_manifest(tmp_path / "s")


def test_new_snapshot_replaces_old_one(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "s", b"old")
    write_snapshot(tmp_path / "s", b"new!")
    assert (tmp_path / "s" / snap.DEVICE_STATE).read_bytes() == b"new!"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_failed_commit_keeps_the_old_snapshot_and_drops_the_temp(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "s", b"old")
    tmp = snap.temp_dir_for(tmp_path / "s")
    (tmp / snap.DEVICE_STATE).write_bytes(b"new")
    tmp_dir_as_file = tmp / snap.MANIFEST
    tmp_dir_as_file.mkdir()  # writing the manifest fails: an I/O error mid-commit
    with pytest.raises(SnapshotError, match="cannot write snapshot"):
        snap.commit_snapshot_dir(tmp, tmp_path / "s", manifest({}))
    snap.discard_temp_dir(tmp)
    assert (tmp_path / "s" / snap.DEVICE_STATE).read_bytes() == b"old"
    snap.load_manifest(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_recovery_restores_an_old_snapshot_renamed_aside_by_a_crash(tmp_path: Path) -> None:
    write_snapshot(tmp_path / "s", b"old")
    (tmp_path / "s").rename(tmp_path / ".s.old")  # crash between the two renames
    (tmp_path / ".s.tmp-dead").mkdir()
    snap.recover_snapshot_dir(tmp_path / "s")
    assert snap.load_manifest(tmp_path / "s").vm_id == "vm1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_incompatible_snapshot_names_every_mismatch(tmp_path: Path) -> None:
    m = manifest({})
    with pytest.raises(SnapshotError) as info:
        snap.check_compatible(
            m, memory_mib=512, vcpus=2, accel="kvm", qemu_version="8.2.0", where=tmp_path
        )
    for word in ("memory", "vcpus", "kvm", "QEMU"):
        assert word in str(info.value)
    snap.check_compatible(
        m, memory_mib=256, vcpus=1, accel="tcg", qemu_version="7.2.1", where=tmp_path
    )
