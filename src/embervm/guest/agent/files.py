"""File put/get for the host: chunked, size-bounded, and atomic on the guest side.

A put writes ``.<name>.embervm-<id>`` next to the target and renames it into place after the
last chunk, so a reader never sees half a file and an aborted transfer leaves no target file.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

MAX_FILE = 256 * 1024 * 1024


class FileError(Exception):
    """A put/get failed; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def check_path(path: str) -> str:
    if not path.startswith("/") or "\0" in path or len(path) > 4096:
        raise FileError("bad_request", "path must be absolute")
    if path.endswith("/"):
        raise FileError("bad_request", "path names a directory")
    return os.path.normpath(path)


@dataclass
class Upload:
    """An in-progress put: the temporary file and how far it got."""

    path: str
    tmp: str
    fd: int
    offset: int = 0

    @classmethod
    def begin(cls, path: str, sid: int) -> Upload:
        path = check_path(path)
        parent, name = os.path.split(path)
        try:
            os.makedirs(parent, mode=0o755, exist_ok=True)
            tmp = os.path.join(parent, f".{name}.embervm-{sid}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise FileError("io_error", f"cannot create {path}: {exc.strerror}") from exc
        return cls(path, tmp, fd)

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.offset:
            raise FileError("bad_request", f"chunk at {offset}, expected {self.offset}")
        if self.offset + len(data) > MAX_FILE:
            raise FileError("too_large", f"file exceeds {MAX_FILE} bytes")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            raise FileError("io_error", f"write {self.path}: {exc.strerror}") from exc
        self.offset += len(data)

    def commit(self, mode: int, uid: int, gid: int) -> int:
        try:
            os.fchown(self.fd, uid, gid)
            os.fchmod(self.fd, mode)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.path)
        except OSError as exc:
            self.abort()
            raise FileError("io_error", f"finish {self.path}: {exc.strerror}") from exc
        return self.offset

    def abort(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1
        with contextlib.suppress(OSError):
            os.unlink(self.tmp)


def read_chunks(path: str, max_bytes: int, chunk: int) -> tuple[int, Iterator[bytes]]:
    """(size, chunks) of a regular file no larger than ``max_bytes``."""
    path = check_path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise FileError("not_found", f"{path} does not exist") from exc
    except OSError as exc:
        raise FileError("io_error", f"open {path}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise FileError("bad_request", f"{path} is not a regular file")
        if st.st_size > max_bytes:
            raise FileError("too_large", f"{path} has {st.st_size} bytes, limit {max_bytes}")
    except BaseException:
        os.close(fd)
        raise

    def gen() -> Iterator[bytes]:
        try:
            left = max_bytes + 1
            while left > 0:
                data = os.read(fd, min(chunk, left))
                if not data:
                    return
                left -= len(data)
                if left <= 0:
                    raise FileError("too_large", f"{path} grew past {max_bytes} bytes")
                yield data
        finally:
            os.close(fd)

    return st.st_size, gen()
