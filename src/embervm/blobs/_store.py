"""The BlobStore seam and its local-directory implementation.

Blobs are code artifacts, snapshots and layers shared between roles; a store maps a key to
bytes. Writes are atomic (temporary name, fsync, rename) so a reader never sees half a blob.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from embervm.blobs._keys import check_key
from embervm.errors import NotFoundError, RuntimeFailure

CHUNK = 1024 * 1024


@runtime_checkable
class BlobStore(Protocol):
    """Key → bytes. Keys are checked by ``check_key``; a missing key raises NotFoundError."""

    async def put(self, key: str, data: bytes) -> None: ...

    async def put_file(self, key: str, source: Path) -> None: ...

    def get_stream(self, key: str, *, chunk_size: int = CHUNK) -> AsyncIterator[bytes]: ...

    async def get_to_file(self, key: str, dest: Path, *, max_bytes: int) -> int: ...

    async def exists(self, key: str) -> bool: ...

    async def delete(self, key: str) -> None: ...


def _close_opened(opening: asyncio.Future[Any]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


async def stream_to_file(
    chunks: AsyncIterator[bytes], dest: Path, *, max_bytes: int, what: str
) -> int:
    """Write ``chunks`` to ``dest`` atomically; more than ``max_bytes`` → RuntimeFailure.

    The limit is checked on the bytes actually received, never on a declared length.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    total = 0
    try:
        with os.fdopen(fd, "wb") as fh:
            async for chunk in chunks:
                total += len(chunk)
                if total > max_bytes:
                    raise RuntimeFailure(f"{what} is larger than {max_bytes} bytes")
                await asyncio.to_thread(fh.write, chunk)
            fh.flush()
            await asyncio.to_thread(os.fsync, fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return total


def _atomic_copy(source: Path | None, data: bytes | None, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            if source is not None:
                with source.open("rb") as src:
                    shutil.copyfileobj(src, fh, CHUNK)
            else:
                fh.write(data or b"")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


class LocalBlobStore:
    """Blobs as files under ``root`` (the default single-host store)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path_of(self, key: str) -> Path:
        return self.root / check_key(key)

    async def put(self, key: str, data: bytes) -> None:
        try:
            await asyncio.to_thread(_atomic_copy, None, data, self.path_of(key))
        except OSError as exc:
            raise RuntimeFailure(f"could not store blob {key!r}: {exc.strerror}") from exc

    async def put_file(self, key: str, source: Path) -> None:
        try:
            await asyncio.to_thread(_atomic_copy, source, None, self.path_of(key))
        except OSError as exc:
            raise RuntimeFailure(f"could not store blob {key!r}: {exc.strerror}") from exc

    async def get_stream(self, key: str, *, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        path = self.path_of(key)
        opening = asyncio.ensure_future(asyncio.to_thread(path.open, "rb"))
        try:
            fh = await asyncio.shield(opening)
        except asyncio.CancelledError:
            opening.add_done_callback(_close_opened)  # the thread opens it anyway: close it
            raise
        except FileNotFoundError as exc:
            raise NotFoundError(f"blob {key!r} does not exist") from exc
        except OSError as exc:
            raise RuntimeFailure(f"could not read blob {key!r}: {exc.strerror}") from exc
        try:
            while chunk := await asyncio.to_thread(fh.read, chunk_size):
                yield chunk
        finally:
            fh.close()

    async def get_to_file(self, key: str, dest: Path, *, max_bytes: int) -> int:
        return await stream_to_file(self.get_stream(key), dest, max_bytes=max_bytes, what=key)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self.path_of(key).is_file)

    async def delete(self, key: str) -> None:
        path = self.path_of(key)
        with contextlib.suppress(FileNotFoundError):
            await asyncio.to_thread(path.unlink)
