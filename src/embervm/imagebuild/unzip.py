"""Unpack a user's zip safely: nothing outside ``dest``, no links, no devices, no bombs.

Decisions (docs/BUILDS.md): symbolic links are refused entirely (a build context needs files,
and a link is the classic way out of the extraction root); hard links cannot be expressed in a
zip. Sizes are enforced on the bytes actually decompressed, never on the sizes the headers
claim. Extraction goes into a temporary folder beside ``dest`` that is renamed into place only
when every entry was written, and removed on any failure.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import struct
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from embervm.errors import BuildFailure

CHUNK = 256 * 1024
RATIO_FLOOR = 1024 * 1024  # entries smaller than this are never judged by their ratio


@dataclass(frozen=True)
class ZipLimits:
    """What a code artifact may unpack to (defaults fit the 8 GiB base disk)."""

    max_total_bytes: int = 2 * 1024**3
    max_files: int = 100_000
    max_ratio: float = 200.0
    # zipfile reads the whole central directory, then keeps ~400 B of Python per record:
    # 100,000 entries with 200-byte names and extras fit; a 512 MiB directory does not.
    max_directory_bytes: int = 32 * 1024**2


# The records zipfile reads to find the central directory (APPNOTE.TXT 4.3.12-4.3.16).
_EOCD = struct.Struct("<4s4H2LH")  # signature, disks, entries (disk, total), size, offset
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_DIRECTORY_RECORD = struct.Struct("<4s6H3L5H2L")
_MAX_COMMENT = 0xFFFF


def _end_of_directory(fh: BinaryIO) -> tuple[int, int, int]:
    """(entries, directory size, directory start) as ``zipfile`` will find them: the last
    end record (ZIP64's when its locator precedes it), with the directory just before it."""
    size = fh.seek(0, 2)
    tail_len = min(size, _EOCD.size + _MAX_COMMENT)
    fh.seek(size - tail_len)
    tail = fh.read(tail_len)
    if tail[-_EOCD.size :].startswith(b"PK\x05\x06") and tail.endswith(b"\0\0"):
        at = len(tail) - _EOCD.size
    else:
        at = tail.rfind(b"PK\x05\x06", 0, len(tail) - _EOCD.size + 1)
        if at < 0:
            raise zipfile.BadZipFile("no end of central directory record")
    _, _, _, _, entries, dir_size, _, _ = _EOCD.unpack_from(tail, at)
    location = size - tail_len + at
    zip64_at = location - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    if zip64_at >= 0:
        fh.seek(zip64_at)
        record = fh.read(_ZIP64_EOCD.size + _ZIP64_LOCATOR.size)
        locator = _ZIP64_LOCATOR.unpack_from(record, _ZIP64_EOCD.size)
        zip64 = _ZIP64_EOCD.unpack_from(record)
        if locator[0] == b"PK\x06\x07" and zip64[0] == b"PK\x06\x06":
            entries, dir_size = zip64[7], zip64[8]
            location = zip64_at
    return entries, dir_size, location - dir_size


def _check_directory(fh: BinaryIO, limits: ZipLimits) -> None:
    """Refuse an archive whose central directory is too big to parse, before ``zipfile``
    parses it: first by what the end record declares, then by counting the records (the
    count in the end record is only a claim; ``zipfile`` reads records up to the size)."""
    entries, dir_size, start = _end_of_directory(fh)
    too_many = f"code artifact has more than {limits.max_files} entries"
    if entries > limits.max_files:
        raise BuildFailure(f"{too_many} ({entries})")
    if dir_size > limits.max_directory_bytes:
        raise BuildFailure(
            f"code artifact's central directory is {dir_size} bytes; "
            f"the limit is {limits.max_directory_bytes}"
        )
    if start < 0:
        raise zipfile.BadZipFile("central directory before the start of the file")
    fh.seek(start)
    walked = records = 0
    while walked < dir_size:
        header = fh.read(_DIRECTORY_RECORD.size)
        if len(header) != _DIRECTORY_RECORD.size or not header.startswith(b"PK\x01\x02"):
            raise zipfile.BadZipFile("bad central directory record")
        fields = _DIRECTORY_RECORD.unpack(header)
        skip = fields[10] + fields[11] + fields[12]  # name, extra field and comment lengths
        fh.seek(skip, 1)
        walked += _DIRECTORY_RECORD.size + skip
        records += 1
        if records > limits.max_files:
            raise BuildFailure(too_many)


def _clean_name(raw: str) -> PurePosixPath | None:
    """The entry's relative path, or None for the root itself; refuses anything escaping."""
    if "\0" in raw:
        raise BuildFailure(f"zip entry {raw[:80]!r} has a NUL byte in its name")
    name = raw.replace("\\", "/")
    if name.startswith("/") or (len(name) >= 2 and name[1] == ":" and name[0].isalpha()):
        raise BuildFailure(f"zip entry {raw[:200]!r} has an absolute path; paths must be relative")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BuildFailure(f"zip entry {raw[:200]!r} contains '..'; paths must stay in the zip")
    return PurePosixPath(*parts) if parts else None


def _kind(info: zipfile.ZipInfo) -> str:
    """'dir', 'file', or a refusal for links, devices, FIFOs and sockets.

    The Unix file type lives in the high bits of ``external_attr``; zips made elsewhere (or by
    ``ZipFile.writestr``) carry none, which means a plain file (or a folder, by its name).
    """
    ftype = stat.S_IFMT(info.external_attr >> 16)
    if ftype == stat.S_IFLNK:
        raise BuildFailure(
            f"zip entry {info.filename[:200]!r} is a symbolic link; links are not supported "
            "in code artifacts (zip the file it points to instead)"
        )
    if ftype not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise BuildFailure(
            f"zip entry {info.filename[:200]!r} is a device, FIFO or socket; only files and "
            "folders are allowed"
        )
    return "dir" if info.is_dir() or ftype == stat.S_IFDIR else "file"


def _file_mode(info: zipfile.ZipInfo) -> int:
    """Permission bits only (no setuid/setgid/sticky); 0o644 when the zip has no Unix mode."""
    mode = (info.external_attr >> 16) & 0o777
    return mode | 0o600 if mode else 0o644


class _Budget:
    def __init__(self, limits: ZipLimits, archive_bytes: int) -> None:
        self.limits = limits
        self.archive_bytes = max(archive_bytes, 1)
        self.total = 0

    def add(self, info: zipfile.ZipInfo, entry_bytes: int, n: int) -> None:
        self.total += n
        lim = self.limits
        if self.total > lim.max_total_bytes:
            raise BuildFailure(
                f"code artifact unpacks to more than {lim.max_total_bytes} bytes "
                f"(limit reached at {info.filename[:200]!r})"
            )
        ratio_base = max(info.compress_size, 1)
        if entry_bytes > RATIO_FLOOR and entry_bytes / ratio_base > lim.max_ratio:
            raise BuildFailure(
                f"zip entry {info.filename[:200]!r} expands more than {lim.max_ratio:g}x "
                "its compressed size; refusing a possible zip bomb"
            )
        if self.total > RATIO_FLOOR and self.total / self.archive_bytes > lim.max_ratio:
            raise BuildFailure(
                f"code artifact expands more than {lim.max_ratio:g}x its size; "
                "refusing a possible zip bomb"
            )


def _write_entry(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path, budget: _Budget) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(target, flags, 0o600)
    written = 0
    with os.fdopen(fd, "wb") as out, zf.open(info) as src:
        while chunk := src.read(CHUNK):
            written += len(chunk)
            budget.add(info, written, len(chunk))
            out.write(chunk)
    os.chmod(target, _file_mode(info))


def _extract_all(zf: zipfile.ZipFile, root: Path, limits: ZipLimits, archive_bytes: int) -> None:
    infos = zf.infolist()
    budget = _Budget(limits, archive_bytes)
    seen: set[PurePosixPath] = set()
    for info in infos:
        rel = _clean_name(info.filename)
        kind = _kind(info)
        if rel is None:
            continue
        if rel in seen and kind == "file":
            raise BuildFailure(f"zip entry {info.filename[:200]!r} appears more than once")
        seen.add(rel)
        if info.flag_bits & 0x1:
            raise BuildFailure(f"zip entry {info.filename[:200]!r} is encrypted")
        target = root.joinpath(*rel.parts)
        try:
            if kind == "dir":
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_entry(zf, info, target, budget)
        except FileExistsError as exc:
            raise BuildFailure(f"zip entry {info.filename[:200]!r} clashes with another") from exc
        except NotADirectoryError as exc:
            raise BuildFailure(
                f"zip entry {info.filename[:200]!r} is inside something that is a file"
            ) from exc
        except NotImplementedError as exc:
            raise BuildFailure(
                f"zip entry {info.filename[:200]!r} uses an unsupported compression method"
            ) from exc
        except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
            raise BuildFailure(f"zip entry {info.filename[:200]!r} is corrupt: {exc}") from exc


def safe_extract(
    zip_path: Path,
    dest: Path,
    *,
    max_total_bytes: int = ZipLimits.max_total_bytes,
    max_files: int = ZipLimits.max_files,
    max_ratio: float = ZipLimits.max_ratio,
    max_directory_bytes: int = ZipLimits.max_directory_bytes,
) -> Path:
    """Extract ``zip_path`` into the new folder ``dest`` (which must not exist); return ``dest``.

    Raises BuildFailure with a user-facing reason; on failure nothing is left behind.
    """
    limits = ZipLimits(max_total_bytes, max_files, max_ratio, max_directory_bytes)
    if dest.exists():
        raise BuildFailure("internal error: the extraction target already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        try:
            with zip_path.open("rb") as fh:
                _check_directory(fh, limits)
                archive_bytes = fh.seek(0, 2)
                with zipfile.ZipFile(fh) as zf:
                    _extract_all(zf, tmp, limits, archive_bytes)
        except zipfile.BadZipFile as exc:
            raise BuildFailure("code artifact is not a valid zip file") from exc
        except OSError as exc:
            why = exc.strerror or "I/O error"  # never str(exc): it names host paths
            raise BuildFailure(f"could not unpack the code artifact: {why}") from exc
        os.chmod(tmp, 0o755)  # noqa: S103  # a build context is readable
        tmp.rename(dest)
    except BaseException:
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp)
        raise
    return dest
