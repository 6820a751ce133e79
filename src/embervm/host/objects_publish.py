"""Publishing a set of files as content-addressed objects, the manifest last (``host/objects.py``).

Each file is read once, in worker threads: its data extents (``SEEK_DATA``/``SEEK_HOLE``) cut
on a fixed grid of ``chunk_size`` bytes of file offsets, each grid cell's data one object; the
whole logical file (holes as zeros) and each chunk hashed on the way. Up to ``concurrency``
objects are uploaded at once, each only if the store does not have it yet; at most that many
chunks (plus the one being read) are in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import os
import stat
import struct
import threading
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embervm.blobs import BlobStore, check_key
from embervm.errors import EmbervmError, SnapshotError, VmmError
from embervm.host.objects_manifest import (
    MAX_CHUNK,
    ChunkRef,
    ObjectFile,
    ObjectManifest,
    Role,
    check_meta,
    check_name,
    object_key,
)
from embervm.vmm.rootview import backing_chain

CHUNK_SIZE = 16 << 20
UPLOADS = 4
_ZEROS = bytes(1 << 20)
_QCOW2_MAGIC = b"QFI\xfb"
_QCOW2_V3_FEATURES = struct.Struct(">4sI64xQ")  # magic, version, …, incompatible_features
_EXTERNAL_DATA_FILE = 1 << 2  # incompatible feature bit: the guest's data is in another file


@dataclass
class TransferStats:
    """What a ``publish`` or ``fetch`` moved (filled in when passed as ``stats=``)."""

    objects_uploaded: int = 0
    objects_skipped: int = 0  # already in the store (or twice in this publish)
    bytes_uploaded: int = 0
    objects_downloaded: int = 0
    objects_cached: int = 0  # already in the local cache
    bytes_downloaded: int = 0
    bytes_written: int = 0  # data written into the fetched files (holes are not written)


def chain_of(disk: Path) -> list[Path]:
    """``disk`` and every file below it in its qcow2 backing chain, top first, down to the
    raw base (read from the qcow2 headers by ``vmm.rootview.backing_chain``)."""
    try:
        return [disk, *backing_chain(disk)]
    except VmmError as exc:
        raise SnapshotError(str(exc)) from exc


def with_chain(files: Mapping[str, Path]) -> dict[str, Path]:
    """``files`` plus every file of the backing chains of the qcow2 files among them, each
    named by its own file name (made unique with a ``-2``, ``-3``… suffix when two clash), so
    ``publish`` carries whole chains: hosts build their own base disks, which differ."""
    out = dict(files)
    seen = {_identity(p) for p in out.values()}
    for path in list(files.values()):
        for below in chain_of(path)[1:]:
            ident = _identity(below)
            if ident in seen:
                continue
            seen.add(ident)
            name, n = below.name, 1
            while name in out:
                n += 1
                name = f"{below.name}-{n}"
            out[check_name(name)] = below
    return out


def _identity(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError as exc:
        raise SnapshotError(f"cannot publish {path}: {exc.strerror or exc}") from exc
    return st.st_dev, st.st_ino


@dataclass(frozen=True)
class _Planned:
    name: str
    path: Path
    role: Role
    backing: str | None


def _plan(files: Mapping[str, Path], external: Mapping[str, Path]) -> list[_Planned]:
    """Each file's role and backing name; refuses a qcow2 whose backing file is neither among
    ``files`` nor ``external`` (the published set would not restore)."""
    names: dict[tuple[int, int], str] = {}
    for name, path in [*files.items(), *external.items()]:
        names.setdefault(_identity(path), name)
    backing: dict[str, str | None] = {}
    qcow2: dict[str, bool] = {}
    for name, path in files.items():
        if not stat.S_ISREG(path.stat().st_mode):  # a FIFO would hang the reads below
            raise SnapshotError(f"cannot publish {path}: not a regular file")
        qcow2[name] = is_qcow2(path)
        if qcow2[name] and has_external_data_file(path):
            raise SnapshotError(f"cannot publish {name}: a qcow2 with an external data file")
        below = chain_of(path)[1:2] if qcow2[name] else []
        if not below:
            backing[name] = None
            continue
        found = names.get(_identity(below[0]))
        if found is None:
            raise SnapshotError(
                f"cannot publish {name}: its backing file {below[0]} is not among the files "
                "(publish its whole chain: with_chain), nor an external file"
            )
        backing[name] = found
    backed = set(backing.values())
    out = []
    for name, path in files.items():
        role: Role
        if name in backed:
            role = "layer" if qcow2[name] else "base"
        else:
            role = "disk" if qcow2[name] else "file"
        out.append(_Planned(name, path, role, backing[name]))
    return out


def is_qcow2(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.read(4) == _QCOW2_MAGIC
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror or exc}") from exc


def has_external_data_file(path: Path) -> bool:
    """Whether the qcow2 ``path`` keeps its guest data in another file (a path its header
    names, which neither ``publish`` carries nor ``fetch`` may let a disk reach)."""
    try:
        with path.open("rb") as f:
            head = f.read(_QCOW2_V3_FEATURES.size)
    except OSError as exc:
        raise SnapshotError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if len(head) < _QCOW2_V3_FEATURES.size:
        return False
    _, version, features = _QCOW2_V3_FEATURES.unpack(head)
    return version >= 3 and bool(features & _EXTERNAL_DATA_FILE)


async def publish(
    store: BlobStore,
    files: Mapping[str, Path],
    manifest_key: str,
    *,
    meta: Mapping[str, Any],
    external: Mapping[str, Path] | None = None,
    chunk_size: int = CHUNK_SIZE,
    concurrency: int = UPLOADS,
    stats: TransferStats | None = None,
) -> ObjectManifest:
    """Store ``files`` (name → local path) as objects and write their manifest under
    ``manifest_key``, last. A qcow2's backing file must be among ``files`` (``with_chain``) or
    in ``external`` (name → path: a file the fetcher supplies, e.g. the image disk under a
    suspended VM's overlay). ``SnapshotError`` for a file that cannot be read or changes
    while it is read; the store's errors as they come. Cancelled or failed, no manifest is
    written (objects already uploaded stay: they are content-addressed and harmless)."""
    check_key(manifest_key)
    if not 4096 <= chunk_size <= MAX_CHUNK or chunk_size % 4096:
        raise SnapshotError(f"chunk_size {chunk_size} is not a multiple of 4 KiB up to 64 MiB")
    external = dict(external or {})
    for name in [*files, *external]:
        check_name(name)
    if set(files) & set(external):
        raise SnapshotError("a name is both a file and an external file")
    plain_meta = check_meta(meta)
    stats = stats if stats is not None else TransferStats()
    planned = await asyncio.to_thread(_plan, files, external)
    uploader = _Uploader(store, concurrency, stats)
    async with uploader.running():
        entries = [await _publish_file(uploader, p, chunk_size) for p in planned]
    manifest = ObjectManifest(
        files=tuple(entries), meta=plain_meta, external=tuple(sorted(external))
    )
    await store.put(manifest_key, manifest.to_json())
    return manifest


class _Uploader:
    """Uploads objects, at most ``limit`` at once, each once; the first failure cancels the
    others and is raised from ``running()``."""

    def __init__(self, store: BlobStore, limit: int, stats: TransferStats) -> None:
        self._store = store
        self._slots = asyncio.Semaphore(max(1, limit))
        self._stats = stats
        self._seen: set[str] = set()
        self._tg: asyncio.TaskGroup | None = None

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                yield
        except BaseExceptionGroup as group:
            leaf = first_error(group)
            raise leaf from leaf.__cause__  # keep the leaf's own cause
        finally:
            self._tg = None

    async def submit(self, digest: str, data: bytes) -> None:
        if digest in self._seen:
            self._stats.objects_skipped += 1
            return
        self._seen.add(digest)
        assert self._tg is not None
        await self._slots.acquire()
        self._tg.create_task(self._upload(digest, data))

    async def _upload(self, digest: str, data: bytes) -> None:
        try:
            key = object_key(digest)
            if await self._store.exists(key):
                self._stats.objects_skipped += 1
                return
            await self._store.put(key, data)
            self._stats.objects_uploaded += 1
            self._stats.bytes_uploaded += len(data)
        finally:
            self._slots.release()


def first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to raise for a task group's failure: the first leaf that is not a
    cancellation (one of ours before a foreign one), else the first leaf."""
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for wanted in (EmbervmError, Exception):
        for leaf in leaves:
            if isinstance(leaf, wanted):
                return leaf
    return leaves[0]


async def _publish_file(uploader: _Uploader, planned: _Planned, chunk_size: int) -> ObjectFile:
    # Opened here, not in a thread a cancellation could orphan with the file open.
    reader = _SparseReader.open(planned.path, chunk_size)
    try:
        await asyncio.to_thread(reader.map)
        chunks: list[ChunkRef] = []
        for cell in reader.cells:
            digest, data = await asyncio.to_thread(reader.read_cell, cell)
            chunks.append(ChunkRef(digest, len(data)))
            await uploader.submit(digest, data)
        whole = await asyncio.to_thread(reader.finish)
    finally:
        reader.close()
    st = reader.st
    return ObjectFile(
        name=planned.name, size=st.st_size, mode=stat.S_IMODE(st.st_mode) & 0o777,
        mtime_ns=st.st_mtime_ns, sha256=whole, role=planned.role, backing=planned.backing,
        extents=tuple(reader.extents), chunks=tuple(chunks),
    )  # fmt: skip


class _SparseReader:
    """Reads one file's data extents, cell by cell, hashing the whole logical file in order."""

    def __init__(self, path: Path, fd: int, st: os.stat_result, chunk_size: int) -> None:
        self.path = path
        self.fd = fd
        self.st = st
        self.chunk_size = chunk_size
        self.extents: list[tuple[int, int]] = []
        self.cells: list[list[tuple[int, int]]] = []
        self._whole = hashlib.sha256()
        self._pos = 0
        # A cancelled caller closes the file while a worker thread may still be reading it:
        # the close waits for that read (never a read of a reused descriptor).
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, chunk_size: int) -> _SparseReader:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # a FIFO: no wait
        except OSError as exc:
            raise SnapshotError(f"cannot publish {path}: {exc.strerror or exc}") from exc
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SnapshotError(f"cannot publish {path}: not a regular file")
            return cls(path, fd, st, chunk_size)
        except BaseException:
            os.close(fd)
            raise

    def map(self) -> None:
        """Find the data extents and cut them into cells (in a worker thread)."""
        with self._lock:
            self.extents = data_extents(self.fd, self.st.st_size)
        self.cells = _cells(self.extents, self.chunk_size)

    def read_cell(self, pieces: list[tuple[int, int]]) -> tuple[str, bytes]:
        """The bytes of ``pieces`` (offset, length) and their sha256; the whole-file hash
        goes on through the hole before each piece and through the piece."""
        chunk = hashlib.sha256()
        parts: list[bytes] = []
        with self._lock:
            self._read_into(pieces, chunk, parts)
        return chunk.hexdigest(), b"".join(parts)

    def _read_into(self, pieces: list[tuple[int, int]], chunk: Any, parts: list[bytes]) -> None:
        for offset, length in pieces:
            hash_zeros(self._whole, offset - self._pos)
            try:
                data = os.pread(self.fd, length, offset)
            except OSError as exc:
                raise SnapshotError(f"cannot read {self.path}: {exc.strerror}") from exc
            if len(data) != length:
                raise SnapshotError(f"{self.path} was cut short while it was being published")
            self._whole.update(data)
            chunk.update(data)
            parts.append(data)
            self._pos = offset + length

    def finish(self) -> str:
        hash_zeros(self._whole, self.st.st_size - self._pos)
        now = os.stat(self.path)
        if (now.st_size, now.st_mtime_ns, now.st_ino) != (
            self.st.st_size, self.st.st_mtime_ns, self.st.st_ino,
        ):  # fmt: skip
            raise SnapshotError(f"{self.path} changed while it was being published")
        return self._whole.hexdigest()

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError):
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """The (offset, length) runs of ``fd`` that hold data, by ``SEEK_DATA``/``SEEK_HOLE`` (a
    file system without them reports the whole file as data)."""
    out: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole from here on
                    break
                raise
            if start >= size:
                break
            end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            out.append((start, end - start))
            pos = end
    except OSError as exc:
        raise SnapshotError(f"cannot map the data of a file: {exc.strerror}") from exc
    return out


def _cells(extents: list[tuple[int, int]], chunk_size: int) -> list[list[tuple[int, int]]]:
    """The extents cut on the grid of ``chunk_size`` file offsets, grouped by grid cell: one
    chunk per cell that holds data, so a change in one place of a file changes one chunk."""
    cells: list[list[tuple[int, int]]] = []
    current = -1
    for offset, length in extents:
        end = offset + length
        while offset < end:
            cell = offset // chunk_size
            stop = min(end, (cell + 1) * chunk_size)
            if cell != current:
                cells.append([])
                current = cell
            cells[-1].append((offset, stop - offset))
            offset = stop
    return cells


def hash_zeros(digest: Any, count: int) -> None:
    """Feed ``count`` zero bytes to ``digest`` (a hole of the logical file)."""
    view = memoryview(_ZEROS)
    while count > 0:
        step = min(count, len(_ZEROS))
        digest.update(view[:step])
        count -= step
