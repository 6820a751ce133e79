"""The snapshot directory: its layout, its manifest, and how it is written atomically.

Layout of a snapshot directory (``images/<name>/<version>/snapshot/`` or ``vms/<id>/suspend/``)::

    manifest.json   this module's manifest (below); written last, inside the temp dir
    device.state    QEMU migration stream. kind "shared-memory": device state only (x-ignore-shared,
                    tens of KiB); kind "stream": device state AND guest RAM (zero pages skipped);
                    kind "delta": device state AND the guest pages that differ from base.memory
    memory          kind "shared-memory" only: the guest RAM file, frozen (sparse)
    base.memory     kind "delta" only: the RAM file the guest's memory is a private mapping of
                    (a hard link to its image's ``memory``: never written)
    disk.qcow2      the VM's disk at snapshot time, frozen (qcow2 whose backing file is absolute)

Manifest (JSON object, ``format`` = ``FORMAT_VERSION``)::

    format, kind, vm_id, created_at (unix s), memory_mib, vcpus, accel, cpu_model, machine,
    qemu_version, kernel_release, kernel, initrd, cmdline,
    files: {name: {"size": int, "sha256": str | null, "mtime_ns": int | null}}
        device.state (small): size and sha256; memory, base.memory and disk.qcow2 (GiBs):
        size and modification time (hashing them would cost more than the restore)
    manifest_sha256: sha256 of the canonical JSON (sorted keys, no spaces) of every other field

Reading (``load_manifest``) checks all of it before anything is handed to QEMU: the manifest's
self-checksum, every file's size and modification time, and every recorded sha256.

Writing: everything goes into ``<dest>.tmp-<random>/``; each file and the dir are fsynced; then
the old ``dest`` (if any) is renamed aside, the temp dir renamed to ``dest``, the parent fsynced,
and the old one removed. A crash leaves the old or the new snapshot (``recover_snapshot_dir``
puts an aside copy back if the new one never arrived), never neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, get_args

from embervm.errors import SnapshotError

FORMAT_VERSION = 2  # 2 added kind "delta": a reader of format 1 would load it as a stream
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
DEVICE_STATE = "device.state"
MEMORY = "memory"
BASE_MEMORY = "base.memory"
DISK = "disk.qcow2"

SnapshotKind = Literal["shared-memory", "stream", "delta"]
KINDS = get_args(SnapshotKind)


@dataclass(frozen=True)
class FileEntry:
    """One file of a snapshot. A small file has a ``sha256``; a big one (RAM file, disk) its
    ``mtime_ns`` instead, stamped at commit (``commit_snapshot_dir``): a file written to after
    the snapshot was taken (or replaced by a copy that did not keep its time) is refused at
    restore without reading GiBs. Manifests written before the stamp existed have neither for
    big files: those are checked by size only."""

    size: int
    sha256: str | None = None
    mtime_ns: int | None = None


@dataclass(frozen=True)
class SnapshotManifest:
    """What a snapshot holds and what it needs to be restored (see the module doc)."""

    kind: SnapshotKind
    vm_id: str
    memory_mib: int
    vcpus: int
    accel: str
    qemu_version: str
    kernel_release: str
    kernel: str
    initrd: str
    cmdline: str
    files: dict[str, FileEntry]
    created_at: float = field(default_factory=time.time)
    cpu_model: str = "max"
    machine: str = "microvm"
    format: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        body = asdict(self)
        body["manifest_sha256"] = _digest(body)
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes, *, where: Path) -> SnapshotManifest:
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                raise TypeError("not an object")
            claimed = body.pop("manifest_sha256")
        except (ValueError, TypeError, KeyError) as exc:
            raise SnapshotError(f"snapshot manifest {where} is unreadable: {exc}") from exc
        if body.get("format") not in READABLE_FORMATS:
            raise SnapshotError(
                f"snapshot {where} has format {body.get('format')!r}, this Embervm reads "
                f"formats {', '.join(map(str, READABLE_FORMATS))}; rebuild the image or snapshot"
            )
        if body.get("kind") not in KINDS:
            raise SnapshotError(f"snapshot {where} has an unknown kind {body.get('kind')!r}")
        if claimed != _digest(body):
            raise SnapshotError(f"snapshot manifest {where} is corrupt (checksum mismatch)")
        try:
            files = {k: FileEntry(**v) for k, v in body.pop("files").items()}
            return cls(files=files, **body)
        except (TypeError, AttributeError) as exc:
            raise SnapshotError(f"snapshot manifest {where} has bad fields: {exc}") from exc

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def _digest(body: dict[str, Any]) -> str:
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canon).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_dir_for(dest: Path) -> Path:
    """A fresh sibling temp dir of ``dest`` (same filesystem, so the final rename is atomic)."""
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise SnapshotError(f"cannot create snapshot temp dir {tmp}: {exc}") from exc
    return tmp


def commit_snapshot_dir(tmp: Path, dest: Path, manifest: SnapshotManifest) -> SnapshotManifest:
    """Stamp every file's modification time into the manifest, write it into ``tmp``, fsync
    everything, and rename ``tmp`` to ``dest``. Returns the manifest as written."""
    aside = dest.parent / f".{dest.name}.old"
    try:
        manifest = _stamped(tmp, manifest)
        (tmp / MANIFEST).write_bytes(manifest.to_json())
        for child in tmp.iterdir():
            fsync_path(child)
        fsync_path(tmp)
        if dest.exists():
            if aside.exists():
                shutil.rmtree(aside)
            dest.rename(aside)
        tmp.rename(dest)
        fsync_path(dest.parent)
    except OSError as exc:
        if not dest.exists() and aside.exists():
            aside.rename(dest)
        raise SnapshotError(f"cannot write snapshot {dest}: {exc}") from exc
    shutil.rmtree(aside, ignore_errors=True)
    return manifest


def _stamped(tmp: Path, manifest: SnapshotManifest) -> SnapshotManifest:
    """The manifest with the mtime of each file it has no sha256 for. The files are final
    (the VM is stopped, its disk and RAM file no longer written), and neither fsync, a hard
    link nor the rename of the directory changes an mtime."""
    files = {
        name: entry if entry.sha256 else replace(entry, mtime_ns=(tmp / name).stat().st_mtime_ns)
        for name, entry in manifest.files.items()
    }
    return replace(manifest, files=files)


def discard_temp_dir(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def recover_snapshot_dir(dest: Path) -> None:
    """After a crash: put back an old snapshot renamed aside, drop stale temp dirs."""
    aside = dest.parent / f".{dest.name}.old"
    if aside.exists() and not dest.exists():
        aside.rename(dest)
    for stale in dest.parent.glob(f".{dest.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def load_manifest(
    snapshot_dir: Path, *, verify_files: bool = True, verify_hashes: bool = True
) -> SnapshotManifest:
    """Read and check a snapshot: manifest checksum, files present with the recorded sizes and
    modification times, every recorded sha256 (``verify_hashes=False`` skips that read of the
    device state, for callers that only look; a restore verifies it before QEMU starts).
    Raises ``SnapshotError`` naming the file and what is wrong with it."""
    path = snapshot_dir / MANIFEST
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise SnapshotError(f"no snapshot at {snapshot_dir} (missing {MANIFEST})") from exc
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from exc
    manifest = SnapshotManifest.from_json(data, where=path)
    if not verify_files:
        return manifest
    for name, entry in manifest.files.items():
        fpath = snapshot_dir / name
        try:
            st = fpath.stat()
        except OSError as exc:
            raise SnapshotError(f"snapshot {snapshot_dir} is missing {name}") from exc
        if st.st_size != entry.size:
            raise SnapshotError(
                f"snapshot {snapshot_dir}: {name} is {st.st_size} bytes, manifest says "
                f"{entry.size} (truncated or replaced)"
            )
        if entry.sha256 is None and entry.mtime_ns not in (None, st.st_mtime_ns):
            raise SnapshotError(
                f"snapshot {snapshot_dir}: {name} was modified after the snapshot was taken "
                f"(mtime {st.st_mtime_ns} ns, manifest says {entry.mtime_ns} ns)"
            )
    if verify_hashes:
        verify_file_hashes(snapshot_dir, manifest)
    return manifest


def verify_file_hashes(snapshot_dir: Path, manifest: SnapshotManifest) -> None:
    """Check every file the manifest has a sha256 for (the device state): one read, before
    QEMU sees the file (1-2 MiB for a delta; a full ``stream`` is ~140 MiB, ~0.2 s)."""
    for name, entry in manifest.files.items():
        if entry.sha256 is None:
            continue
        try:
            digest = sha256_file(snapshot_dir / name)
        except OSError as exc:
            raise SnapshotError(f"snapshot {snapshot_dir}: cannot read {name}: {exc}") from exc
        if digest != entry.sha256:
            raise SnapshotError(
                f"snapshot {snapshot_dir}: {name} is corrupt (sha256 mismatch: its content is "
                "not what was written)"
            )


def check_compatible(
    manifest: SnapshotManifest,
    *,
    memory_mib: int,
    vcpus: int,
    accel: str,
    qemu_version: str,
    where: Path,
) -> None:
    """Refuse a snapshot this VMM cannot load (sizes, accelerator, QEMU version)."""
    problems = []
    if manifest.memory_mib != memory_mib:
        problems.append(f"memory {manifest.memory_mib} MiB != {memory_mib} MiB")
    if manifest.vcpus != vcpus:
        problems.append(f"vcpus {manifest.vcpus} != {vcpus}")
    if manifest.accel != accel:
        problems.append(f"taken with {manifest.accel}, restoring with {accel}")
    if _major_minor(manifest.qemu_version) != _major_minor(qemu_version):
        problems.append(f"QEMU {manifest.qemu_version} != {qemu_version}")
    if problems:
        raise SnapshotError(f"snapshot {where} is incompatible: " + "; ".join(problems))


def _major_minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def remove_quietly(*paths: Path) -> None:
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def warm_memory_file(snapshot_dir: Path, chunk: int = 1 << 20) -> int:
    """Read a ``shared-memory`` snapshot's RAM file once so all of it sits in the page cache.

    Why: a clone maps that file copy-on-write; its first suspend streams its RAM and must read
    every guest page, and a page the guest never touched is a hole in the file, which the
    kernel fills with a fresh zeroed page-cache page on first read (about 2.6 s per GiB on the
    development machines, so ~5 s for a 2 GiB image). Warming once (at image publish and at
    server start, off every request's path, in the server's own cgroup) makes those reads
    cheap for every clone: ~0.5 s suspends for an idle 2 GiB guest. The cost is page cache the
    size of the guest (clean, reclaimable: under pressure the kernel drops it and the first
    suspend is slow again). Returns the bytes read.
    """
    path = snapshot_dir / MEMORY
    buf = bytearray(chunk)
    total = 0
    try:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc}") from exc
    return total
