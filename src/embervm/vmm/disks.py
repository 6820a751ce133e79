"""VM disks: qcow2 copy-on-write overlays over a read-only base; an image is never copied."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Literal

from embervm.errors import VmmError

DiskFormat = Literal["raw", "qcow2"]


def create_overlay(backing: Path, dest: Path, backing_format: DiskFormat) -> Path:
    """Create ``dest``, a qcow2 whose backing file is ``backing`` (absolute path; read-only).

    Takes milliseconds whatever the backing size. ``dest`` must not exist.
    """
    if dest.exists():
        raise VmmError(f"disk overlay {dest} already exists")
    if not backing.is_file():
        raise VmmError(f"backing disk {backing} does not exist")
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", backing_format,
            "-b", str(backing.resolve()), str(dest)]  # fmt: skip
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=60)
    except subprocess.CalledProcessError as exc:
        raise VmmError(f"qemu-img create {dest} failed: {exc.stderr.strip()}") from exc
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmmError(f"qemu-img create {dest} failed: {exc}") from exc
    return dest
