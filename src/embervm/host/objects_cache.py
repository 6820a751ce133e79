"""``ObjectCache``: this host's copies of objects, by content hash (``host/objects.py``).

``<root>/sha256/<first two hex digits>/<sha256>``: every entry was hashed on its way in and
matched its name and length; a download that does not is deleted, never renamed into place.
Downloads go to a temporary name beside the entry (``.<sha256>.<random>.tmp``), are fsynced
and renamed, so two processes fetching the same object at once each rename a complete,
verified copy over the other's. Within one process, concurrent requests for the same object
wait for one download. A hit touches the entry's mtime (for a future pruning by age).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import BinaryIO

from embervm.blobs import BlobStore
from embervm.errors import SnapshotError
from embervm.host.objects_manifest import object_key

TEMP_GLOB = ".*.tmp"
_BATCH = 4 << 20


class ObjectCache:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._locks: dict[str, asyncio.Lock] = {}
        self._users: dict[str, int] = {}

    def path_of(self, sha256: str) -> Path:
        return self.root / "sha256" / sha256[:2] / sha256

    def has(self, sha256: str, length: int) -> bool:
        """The entry is there with the right length (it was verified when it came in)."""
        try:
            return self.path_of(sha256).stat().st_size == length
        except OSError:
            return False

    async def ensure(self, store: BlobStore, sha256: str, length: int) -> int:
        """Make sure the object is in the cache; the bytes downloaded for it (0: a hit).
        ``SnapshotError`` when the store's object is not ``length`` bytes hashing to
        ``sha256`` (nothing is kept); the store's own errors as they come."""
        if await asyncio.to_thread(self._hit, sha256, length):
            return 0
        lock = self._locks.setdefault(sha256, asyncio.Lock())
        self._users[sha256] = self._users.get(sha256, 0) + 1
        try:
            async with lock:
                if await asyncio.to_thread(self._hit, sha256, length):
                    return 0
                return await self._download(store, sha256, length)
        finally:
            self._users[sha256] -= 1
            if not self._users[sha256]:
                del self._users[sha256], self._locks[sha256]

    def _hit(self, sha256: str, length: int) -> bool:
        if not self.has(sha256, length):
            return False
        with contextlib.suppress(OSError):
            os.utime(self.path_of(sha256))
        return True

    async def _download(self, store: BlobStore, sha256: str, length: int) -> int:
        final = self.path_of(sha256)
        await asyncio.to_thread(final.parent.mkdir, parents=True, exist_ok=True)
        temp = final.parent / f".{sha256}.{secrets.token_hex(6)}.tmp"
        digest = hashlib.sha256()
        received = 0
        try:
            # Opened here, not in a thread a cancellation could orphan with the file open.
            # Buffered: its close waits for a write a cancelled caller left running in a thread.
            with temp.open("xb") as out:
                batch: list[bytes] = []
                pending = 0
                async with _closing(store.get_stream(object_key(sha256))) as pieces:
                    async for piece in pieces:
                        received += len(piece)
                        if received > length:
                            raise SnapshotError(f"object {sha256} is longer than {length} bytes")
                        digest.update(piece)
                        batch.append(piece)
                        pending += len(piece)
                        if pending >= _BATCH:
                            await asyncio.to_thread(out.writelines, batch)
                            batch, pending = [], 0
                await asyncio.to_thread(out.writelines, batch)
                await asyncio.to_thread(_flush_and_sync, out)
            if received != length or digest.hexdigest() != sha256:
                raise SnapshotError(
                    f"object {sha256} is corrupt in the object store ({received} bytes, sha256 "
                    f"{digest.hexdigest()[:16]}…): refusing it"
                )
            await asyncio.to_thread(os.replace, temp, final)
        except OSError as exc:
            raise SnapshotError(f"cannot cache object {sha256}: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        return received

    def verify(self, sha256: str) -> bool:
        """Hash the entry again; a damaged one is deleted (False). A missing one is False."""
        path = self.path_of(sha256)
        digest = hashlib.sha256()
        try:
            with path.open("rb") as f:
                while block := f.read(1 << 20):
                    digest.update(block)
        except OSError:
            return False
        if digest.hexdigest() == sha256:
            return True
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return False


@contextlib.asynccontextmanager
async def _closing(stream: AsyncIterator[bytes]) -> AsyncIterator[AsyncIterator[bytes]]:
    """Close the store's stream (an async generator) at once when we stop reading it early,
    not whenever the garbage collector gets to it: its file or connection is released now."""
    try:
        yield stream
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()


def _flush_and_sync(out: BinaryIO) -> None:
    out.flush()
    os.fsync(out.fileno())
