"""A minimal writer for the ``newc`` cpio format the kernel unpacks as an initramfs.

Writing the archive ourselves (instead of running ``cpio`` over a staged tree) lets us add
device nodes, fixed owners and fixed mtimes without root, and makes the archive byte-for-byte
reproducible from its inputs.
"""

from __future__ import annotations

import stat
from dataclasses import dataclass

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Entry:
    """One archive member. ``data`` is the file body or, for a symlink, its target."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _pad4(n: int) -> bytes:
    return b"\0" * ((4 - n % 4) % 4)


def _header(ino: int, mode: int, size: int, rdev: tuple[int, int], namesize: int) -> bytes:
    fields = (ino, mode, 0, 0, 1, 0, size, 0, 0, rdev[0], rdev[1], namesize, 0)
    return _MAGIC + b"".join(f"{f:08x}".encode() for f in fields)


def build_newc(entries: list[Entry]) -> bytes:
    """Serialise ``entries`` (parents before children) plus the trailer into one archive."""
    out = bytearray()
    for ino, e in enumerate([*entries, Entry(_TRAILER, 0)], start=1):
        name = e.path.lstrip("/").encode() + b"\0"
        hdr = _header(ino if e.path != _TRAILER else 0, e.mode, len(e.data), e.rdev, len(name))
        out += hdr + name
        out += _pad4(len(hdr) + len(name))
        out += e.data + _pad4(len(e.data))
    return bytes(out)


def directory(path: str, perm: int = 0o755) -> Entry:
    return Entry(path, stat.S_IFDIR | perm)


def regular(path: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(path, stat.S_IFREG | perm, data)


def symlink(path: str, target: str) -> Entry:
    return Entry(path, stat.S_IFLNK | 0o777, target.encode())


def chardev(path: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(path, stat.S_IFCHR | perm, rdev=(major, minor))
