"""VM disks: qcow2 copy-on-write overlays over a read-only base; an image is never copied."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Literal

from embervm.errors import VmmError

DiskFormat = Literal["raw", "qcow2"]


def create_overlay(backing: Path, dest: Path, backing_format: DiskFormat) -> Path:
    """Create ``dest``, a qcow2 whose backing file is ``backing`` (absolute path; read-only).

    Takes milliseconds whatever the backing size. ``dest`` must not exist; it is made 0600
    before ``qemu-img`` writes into it (a guest's disk is nobody else's to read, whatever the
    umask), and removed again if ``qemu-img`` fails.
    """
    if not backing.is_file():
        raise VmmError(f"backing disk {backing} does not exist")
    try:
        os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600))
    except FileExistsError as exc:
        raise VmmError(f"disk overlay {dest} already exists") from exc
    except OSError as exc:
        raise VmmError(f"cannot create disk overlay {dest}: {exc}") from exc
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format,
            "-b", str(backing.resolve()), str(dest)]  # fmt: skip
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        dest.unlink(missing_ok=True)
        detail = exc.stderr.strip() if isinstance(exc, subprocess.CalledProcessError) else exc
        raise VmmError(f"qemu-img create {dest} failed: {detail}") from exc
    return dest


def disk_descriptors(disk: Path) -> tuple[int, int]:
    """A read-write and a read-only descriptor of ``disk``, for QEMU's fd sets: the block
    layer opens ``/dev/fdset/N`` read-write, and read-only when the disk becomes a backing
    file, without ever naming a path (the caller closes both once QEMU holds them)."""
    rw = os.open(disk, os.O_RDWR | os.O_CLOEXEC)
    try:
        return rw, os.open(disk, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        os.close(rw)
        raise
