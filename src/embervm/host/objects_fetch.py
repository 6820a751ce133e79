"""Fetching a published set of files into a directory (``host/objects.py``).

The manifest is read (bounded) and checked; every object it names is brought into the host's
``ObjectCache`` (verified there), a few at once; then one worker thread builds the directory
beside its destination (``.<name>.tmp-<random>``, as ``vmm.snapshot`` does, so its
``recover_snapshot_dir`` removes what a crash leaves): each file written sparse (data at its
extents, then truncated to its size) while its whole logical content is hashed and compared
with the manifest; qcow2 files checked and their backing files rewritten to their fetched
neighbours' final paths; modes and modification times set as published; everything fsynced
and the directory renamed into place. Any failure or cancellation removes the temp directory:
``dest_dir`` appears complete or not at all.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, NoReturn

from embervm.blobs import BlobStore, check_key
from embervm.errors import NotFoundError, SnapshotError, VmmError
from embervm.host.objects_cache import ObjectCache
from embervm.host.objects_manifest import (
    MAX_MANIFEST_BYTES,
    ChunkRef,
    ObjectFile,
    ObjectManifest,
    parse_manifest,
)
from embervm.host.objects_publish import (
    TransferStats,
    first_error,
    has_external_data_file,
    hash_zeros,
    is_qcow2,
)
from embervm.vmm.rootview import backing_chain
from embervm.vmm.snapshot import fsync_path, temp_dir_for

DOWNLOADS = 4
REBASE_TIMEOUT = 60.0
_WRITE = 4 << 20


async def read_manifest(store: BlobStore, manifest_key: str) -> ObjectManifest:
    """The manifest under ``manifest_key``, checked. ``NotFoundError`` when there is none
    (nothing was published there, or its publish never finished); ``SnapshotError`` for one
    that is too large or not a manifest this Embervm accepts."""
    check_key(manifest_key)
    data = bytearray()
    async for piece in store.get_stream(manifest_key):
        data += piece
        if len(data) > MAX_MANIFEST_BYTES:
            raise SnapshotError(
                f"object manifest {manifest_key} is larger than {MAX_MANIFEST_BYTES} bytes"
            )
    return parse_manifest(bytes(data), where=manifest_key)


async def fetch(
    store: BlobStore,
    manifest_key: str,
    dest_dir: Path,
    *,
    cache: ObjectCache,
    max_bytes: int,
    external: Mapping[str, Path] | None = None,
    concurrency: int = DOWNLOADS,
    stats: TransferStats | None = None,
) -> ObjectManifest:
    """Make ``dest_dir`` (which must not exist) hold the files published under
    ``manifest_key``, byte for byte, sparse, with their modes and modification times; qcow2
    backing files point at the fetched files in ``dest_dir`` (absolute paths), or at
    ``external[name]`` for the external names the manifest lists. ``max_bytes`` bounds the
    sum of the files' logical sizes. ``NotFoundError``: no manifest; ``SnapshotError``: a
    refused manifest, a corrupt or missing object, a file that does not hash as published,
    a local failure. Returns the manifest."""
    manifest = await read_manifest(store, manifest_key)
    if manifest.total_size > max_bytes:
        raise SnapshotError(
            f"object manifest {manifest_key} holds {manifest.total_size} bytes of files, "
            f"more than the {max_bytes} allowed"
        )
    external = dict(external or {})
    missing = sorted(set(manifest.external) - set(external))
    if missing:
        raise SnapshotError(f"object manifest {manifest_key} needs external files {missing}")
    if await asyncio.to_thread(os.path.lexists, dest_dir):
        raise SnapshotError(f"cannot fetch {manifest_key} into {dest_dir}: it already exists")
    stats = stats if stats is not None else TransferStats()
    await _download_all(store, cache, manifest.chunks(), max(1, concurrency), stats)
    builder = _DirBuilder(manifest, dest_dir, cache, external, stats)
    try:
        await asyncio.to_thread(builder.build)
    except asyncio.CancelledError:
        builder.cancel.set()  # the worker thread stops at its next step and cleans up
        raise
    return manifest


async def _download_all(
    store: BlobStore, cache: ObjectCache, chunks: dict[str, int], limit: int, stats: TransferStats
) -> None:
    """Every object into the cache, ``limit`` at once. After a failure no new download
    starts and those under way finish (they are cached for the next try, and a download is
    never cut inside a store's worker thread, which could leave its file or connection open);
    then the first failure is raised."""
    slots = asyncio.Semaphore(limit)
    errors: list[Exception] = []

    async def one(digest: str, length: int) -> None:
        try:
            got = await cache.ensure(store, digest, length)
        except NotFoundError as exc:
            missing = SnapshotError(f"object {digest} is missing from the object store")
            missing.__cause__ = exc
            errors.append(missing)
            return
        except Exception as exc:
            errors.append(exc)
            return
        finally:
            slots.release()
        if got:
            stats.objects_downloaded += 1
            stats.bytes_downloaded += got
        else:
            stats.objects_cached += 1

    try:
        async with asyncio.TaskGroup() as tg:
            for digest, length in chunks.items():
                await slots.acquire()
                if errors:
                    slots.release()
                    break
                tg.create_task(one(digest, length))
    except BaseExceptionGroup as group:  # only a bug gets here: one() keeps its errors
        leaf = first_error(group)
        raise leaf from leaf.__cause__  # keep the leaf's own cause
    if errors:
        raise errors[0]


class _Cancelled(SnapshotError):
    """The caller of ``fetch`` was cancelled: the worker thread stops here."""


class _DirBuilder:
    """Builds ``dest`` in one worker thread, which owns its temp dir to the end (a cancelled
    caller sets ``cancel``; the thread notices between steps and removes what it made)."""

    def __init__(
        self,
        manifest: ObjectManifest,
        dest: Path,
        cache: ObjectCache,
        external: dict[str, Path],
        stats: TransferStats,
    ) -> None:
        self.manifest = manifest
        self.dest = dest.absolute()
        self.cache = cache
        self.external = external
        self.stats = stats
        self.cancel = threading.Event()

    def _step(self) -> None:
        if self.cancel.is_set():
            raise _Cancelled(f"fetch into {self.dest} cancelled")

    def build(self) -> None:
        tmp = temp_dir_for(self.dest)
        try:
            for entry in self.manifest.files:
                self._step()
                self._materialize(tmp / entry.name, entry)
            self._fix_qcow2(tmp)
            for entry in self.manifest.files:
                path = tmp / entry.name
                os.chmod(path, entry.mode)
                os.utime(path, ns=(entry.mtime_ns, entry.mtime_ns))
                fsync_path(path)
            fsync_path(tmp)
            self._step()
            if os.path.lexists(self.dest):
                raise SnapshotError(f"{self.dest} appeared while it was being fetched")
            tmp.rename(self.dest)
            fsync_path(self.dest.parent)
        except OSError as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            raise SnapshotError(f"cannot fetch into {self.dest}: {exc}") from exc
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _materialize(self, path: Path, entry: ObjectFile) -> None:
        """Write ``entry``'s extents at their offsets, then its size; its logical content
        hashed on the way must be the published sha256."""
        whole = hashlib.sha256()
        pos = 0
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)  # fmt: skip
        try:
            with _ChunkStream(self.cache, entry.chunks, entry.name) as stream:
                for offset, length in entry.extents:
                    self._step()
                    hash_zeros(whole, offset - pos)
                    while length:
                        data = stream.read(min(length, _WRITE))
                        _pwrite_all(fd, data, offset)
                        whole.update(data)
                        offset += len(data)
                        length -= len(data)
                        self.stats.bytes_written += len(data)
                    pos = offset
                stream.expect_end()
            hash_zeros(whole, entry.size - pos)
            os.ftruncate(fd, entry.size)
        except _Cancelled:
            raise
        except SnapshotError as exc:
            self._evict_damaged(entry, str(exc))
        finally:
            os.close(fd)
        if whole.hexdigest() != entry.sha256:
            self._evict_damaged(entry, f"{entry.name} does not match its sha256 once assembled")

    def _evict_damaged(self, entry: ObjectFile, problem: str) -> NoReturn:
        """The objects were verified on their way into the cache, so one changed since: find
        and remove it (the next fetch downloads it again), and say so."""
        bad = [c.sha256 for c in entry.chunks if not self.cache.verify(c.sha256)]
        raise SnapshotError(f"{problem} (damaged cache entries, now removed: {bad or 'none'})")

    def _fix_qcow2(self, tmp: Path) -> None:
        """Check each file's format against its role; point each qcow2 that has a backing
        file at its final place; refuse a qcow2 that names a file nobody listed."""
        names = {f.name for f in self.manifest.files}
        for entry in self.manifest.files:
            self._step()
            path = tmp / entry.name
            qcow2 = is_qcow2(path)
            if qcow2 != (entry.role in ("disk", "layer")):
                raise SnapshotError(
                    f"{entry.name}: role {entry.role} but it is {'' if qcow2 else 'not '}qcow2"
                )
            if not qcow2:
                continue
            if has_external_data_file(path):
                raise SnapshotError(f"{entry.name}: a qcow2 with an external data file")
            if entry.backing is None:
                try:
                    named = [str(p) for p in backing_chain(path)]
                except VmmError as exc:  # it names one, unreadable or absurd
                    named = [str(exc)]
                if named:
                    raise SnapshotError(
                        f"{entry.name}: names a backing file the manifest does not list "
                        f"({named[0][:200]})"
                    )
                continue
            if entry.backing in names:
                target = self.dest / entry.backing
                fmt = "qcow2" if is_qcow2(tmp / entry.backing) else "raw"
            else:
                target = self.external[entry.backing].absolute()
                fmt = "qcow2" if is_qcow2(target) else "raw"
            rebase(path, target, fmt)


def rebase(path: Path, backing: Path, fmt: str) -> None:
    """Make the qcow2 ``path`` name ``backing`` (format ``fmt``) without touching its data
    (``qemu-img rebase -u``: only the header's backing name and format change)."""
    argv = ["qemu-img", "rebase", "-q", "-u", "-F", fmt, "-b", str(backing), str(path)]
    try:
        subprocess.run(argv, check=True, capture_output=True, text=True, timeout=REBASE_TIMEOUT)
    except subprocess.CalledProcessError as exc:
        raise SnapshotError(f"qemu-img rebase of {path.name} failed: {exc.stderr.strip()}") from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise SnapshotError(f"qemu-img rebase of {path.name} failed: {exc}") from exc


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


class _ChunkStream:
    """The concatenated bytes of ``chunks``, read from the cache in order."""

    def __init__(self, cache: ObjectCache, chunks: tuple[ChunkRef, ...], name: str) -> None:
        self._name = name
        self._paths = [cache.path_of(c.sha256) for c in chunks]
        self._next = 0
        self._file: BinaryIO | None = None

    def __enter__(self) -> _ChunkStream:
        return self

    def __exit__(self, *_exc: object) -> None:
        if self._file is not None:
            self._file.close()

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes (at least one); ``SnapshotError`` when the chunks end first."""
        while True:
            if self._file is None:
                if self._next >= len(self._paths):
                    raise SnapshotError(f"{self._name}: its cached objects end before its data")
                self._file = self._paths[self._next].open("rb")
                self._next += 1
            data = self._file.read(n)
            if data:
                return data
            self._file.close()
            self._file = None

    def expect_end(self) -> None:
        rest = self._file.read(1) if self._file is not None else b""
        if rest or self._next < len(self._paths):
            raise SnapshotError(f"{self._name}: its cached objects hold more than its data")
