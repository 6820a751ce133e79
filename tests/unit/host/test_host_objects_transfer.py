"""``host/objects.py`` over a ``LocalBlobStore``: sparse files move their data and not their
holes, objects dedupe within and across publishes, each object is fetched once per host,
corrupt objects and damaged cache entries are refused without leaving a partial file or a
poisoned cache entry, a missing manifest is ``NotFoundError``, and a cancelled publish or
fetch leaves no manifest and no directory. (Hostile manifests: test_host_objects_manifest;
qcow2 chains: test_host_objects_qcow2; a real S3 server: tests/integration/host.)"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from embervm.blobs import LocalBlobStore
from embervm.blobs._store import CHUNK
from embervm.errors import NotFoundError, SnapshotError
from embervm.host.objects import (
    OBJECT_PREFIX,
    ObjectCache,
    TransferStats,
    fetch,
    object_key,
    publish,
    read_manifest,
)

MIB = 1 << 20
KEY = "images/web/1/manifest.json"


class CountingStore:
    """A ``LocalBlobStore`` that counts what crosses it, and can hold puts of objects."""

    def __init__(self, root: Path) -> None:
        self.inner = LocalBlobStore(root)
        self.put_bytes = 0
        self.object_puts: list[str] = []
        self.get_bytes = 0
        self.object_gets: list[str] = []
        self.hold_puts_after: int | None = None
        self.held = asyncio.Event()

    async def put(self, key: str, data: bytes) -> None:
        if key.startswith(OBJECT_PREFIX):
            if self.hold_puts_after is not None and len(self.object_puts) >= self.hold_puts_after:
                self.held.set()
                await asyncio.Event().wait()
            self.object_puts.append(key)
        self.put_bytes += len(data)
        await self.inner.put(key, data)

    async def put_file(self, key: str, source: Path) -> None:
        raise AssertionError("publish streams chunks, never whole files")

    async def get_stream(self, key: str, *, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        if key.startswith(OBJECT_PREFIX):
            self.object_gets.append(key)
        async for piece in self.inner.get_stream(key, chunk_size=chunk_size):
            self.get_bytes += len(piece)
            yield piece

    async def get_to_file(self, key: str, dest: Path, *, max_bytes: int) -> int:
        raise AssertionError("not used")

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)


def sparse_file(path: Path, size: int, runs: list[tuple[int, bytes]], mode: int = 0o640) -> Path:
    with path.open("wb") as f:
        f.truncate(size)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
    path.chmod(mode)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def leftovers(root: Path) -> list[Path]:
    """Temp files and dirs under ``root`` (what a failed fetch must not leave)."""
    return sorted(p for p in root.rglob("*") if ".tmp" in p.name)


@pytest.fixture
def store(tmp_path: Path) -> CountingStore:
    return CountingStore(tmp_path / "store")


@pytest.fixture
def cache(tmp_path: Path) -> ObjectCache:
    return ObjectCache(tmp_path / "cache")


RUNS = [
    (0, os.urandom(MIB)),
    (20 * MIB, os.urandom(2 * MIB)),
    (64 * MIB - MIB // 2, b"\x5a" * (MIB // 2)),
]
DATA = sum(len(data) for _, data in RUNS)  # 3.5 MiB of data in a 64 MiB file


async def test_a_sparse_file_moves_its_data_not_its_size(
    tmp_path: Path, store: CountingStore, cache: ObjectCache
) -> None:
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    os.utime(src, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    up = TransferStats()
    manifest = await publish(store, {"memory": src}, KEY, meta={"image": "web"}, stats=up)

    entry = manifest.file("memory")
    assert entry.extents == ((0, MIB), (20 * MIB, 2 * MIB), (64 * MIB - MIB // 2, MIB // 2))
    assert (entry.size, entry.mode, entry.sha256) == (64 * MIB, 0o640, sha256_of(src))
    assert len(entry.chunks) == 3  # three grid cells of 16 MiB hold data
    manifest_bytes = len(manifest.to_json())
    assert store.put_bytes == DATA + manifest_bytes  # not one byte of the holes
    assert (up.objects_uploaded, up.bytes_uploaded) == (3, DATA)

    down = TransferStats()
    dest = tmp_path / "host-b" / "snapshot"
    fetched = await fetch(store, KEY, dest, cache=cache, max_bytes=1 << 30, stats=down)
    assert fetched == manifest
    assert fetched.meta == {"image": "web"}
    assert store.get_bytes == DATA + manifest_bytes
    assert (down.objects_downloaded, down.bytes_downloaded, down.bytes_written) == (3, DATA, DATA)
    out = dest / "memory"
    assert out.read_bytes() == src.read_bytes()
    assert allocated(out) <= DATA + 64 * 1024  # sparse: the holes were not written
    st = out.stat()
    assert (st.st_mode & 0o7777, st.st_mtime_ns) == (0o640, 1_700_000_000_123_456_789)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["snapshot"]  # no temp dir left

    # The same manifest again on this host: every object is in the cache, nothing is downloaded.
    again = TransferStats()
    await fetch(store, KEY, tmp_path / "again", cache=cache, max_bytes=1 << 30, stats=again)
    assert (again.objects_downloaded, again.objects_cached) == (0, 3)
    assert store.get_bytes == DATA + 2 * manifest_bytes


async def test_small_chunks_cut_extents_on_the_grid_and_empty_and_dense_files_round_trip(
    tmp_path: Path, store: CountingStore, cache: ObjectCache
) -> None:
    dense = tmp_path / "device.state"
    dense.write_bytes(os.urandom(300 * 1024 + 17))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    hole_only = sparse_file(tmp_path / "hole", 5 * MIB, [])
    manifest = await publish(
        store, {"device.state": dense, "empty": empty, "hole": hole_only}, KEY, meta={},
        chunk_size=64 * 1024,
    )  # fmt: skip
    state = manifest.file("device.state")
    assert [c.length for c in state.chunks] == [64 * 1024] * 4 + [300 * 1024 + 17 - 256 * 1024]
    assert manifest.file("empty").extents == manifest.file("hole").extents == ()
    dest = tmp_path / "out"
    await fetch(store, KEY, dest, cache=cache, max_bytes=1 << 30)
    assert (dest / "device.state").read_bytes() == dense.read_bytes()
    assert (dest / "empty").read_bytes() == b""
    assert (dest / "hole").stat().st_size == 5 * MIB
    assert allocated(dest / "hole") == 0


async def test_publishing_the_same_files_again_uploads_nothing_and_shared_chunks_are_stored_once(
    tmp_path: Path, store: CountingStore
) -> None:
    shared = os.urandom(MIB)
    a = sparse_file(tmp_path / "a", 32 * MIB, [(0, shared), (16 * MIB, os.urandom(MIB))])
    b = sparse_file(tmp_path / "b", 8 * MIB, [(0, shared)])  # its one cell is a's first
    first = TransferStats()
    await publish(store, {"a": a, "b": b}, KEY, meta={}, stats=first)
    assert len(store.object_puts) == len(set(store.object_puts)) == 2
    assert (first.objects_uploaded, first.objects_skipped) == (2, 1)

    second = TransferStats()
    await publish(store, {"a": a, "b": b}, "images/web/2/manifest.json", meta={}, stats=second)
    assert len(store.object_puts) == 2  # nothing uploaded the second time
    assert (second.objects_uploaded, second.objects_skipped) == (0, 3)
    objects = list((tmp_path / "store" / OBJECT_PREFIX).iterdir())
    assert len(objects) == 2


async def test_concurrent_fetches_on_one_host_download_each_object_once(
    tmp_path: Path, store: CountingStore, cache: ObjectCache
) -> None:
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    await publish(store, {"memory": src}, KEY, meta={})
    dests = [tmp_path / f"out{i}" for i in range(3)]
    await asyncio.gather(*(fetch(store, KEY, d, cache=cache, max_bytes=1 << 30) for d in dests))
    assert sorted(store.object_gets) == sorted(set(store.object_gets))
    assert len(store.object_gets) == 3
    for d in dests:
        assert sha256_of(d / "memory") == sha256_of(src)


async def test_a_corrupt_object_fails_the_fetch_and_leaves_no_file_and_no_cache_entry(
    tmp_path: Path, store: CountingStore, cache: ObjectCache
) -> None:
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    manifest = await publish(store, {"memory": src}, KEY, meta={})
    victim = manifest.file("memory").chunks[1].sha256
    path = store.inner.path_of(object_key(victim))
    raw = bytearray(path.read_bytes())
    raw[12345] ^= 0x01
    path.write_bytes(bytes(raw))

    dest = tmp_path / "out"
    with pytest.raises(SnapshotError, match=f"object {victim} is corrupt"):
        await fetch(store, KEY, dest, cache=cache, max_bytes=1 << 30)
    assert not dest.exists()
    assert not cache.path_of(victim).exists()  # never renamed into the cache
    assert leftovers(tmp_path) == []

    raw[12345] ^= 0x01  # the store is repaired: the same cache fetches it now
    path.write_bytes(bytes(raw))
    await fetch(store, KEY, dest, cache=cache, max_bytes=1 << 30)
    assert sha256_of(dest / "memory") == sha256_of(src)


async def test_a_cache_entry_damaged_after_download_is_found_removed_and_fetched_again(
    tmp_path: Path, store: CountingStore, cache: ObjectCache
) -> None:
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    manifest = await publish(store, {"memory": src}, KEY, meta={})
    await fetch(store, KEY, tmp_path / "first", cache=cache, max_bytes=1 << 30)
    victim = manifest.file("memory").chunks[0].sha256
    entry = cache.path_of(victim)
    raw = bytearray(entry.read_bytes())
    raw[0] ^= 0xFF  # same length: only the assembled file's sha256 can tell
    entry.write_bytes(bytes(raw))

    with pytest.raises(SnapshotError, match=f"does not match its sha256.*{victim}"):
        await fetch(store, KEY, tmp_path / "second", cache=cache, max_bytes=1 << 30)
    assert not (tmp_path / "second").exists()
    assert not entry.exists()
    assert leftovers(tmp_path) == []
    await fetch(store, KEY, tmp_path / "second", cache=cache, max_bytes=1 << 30)
    assert (tmp_path / "second" / "memory").read_bytes() == src.read_bytes()


async def test_missing_manifest_is_not_found_and_a_missing_object_is_a_snapshot_error(
    tmp_path: Path, store: CountingStore, cache: ObjectCache
) -> None:
    with pytest.raises(NotFoundError):
        await fetch(store, "images/none/manifest.json", tmp_path / "out", cache=cache,
                    max_bytes=1 << 30)  # fmt: skip
    with pytest.raises(NotFoundError):
        await read_manifest(store, "images/none/manifest.json")
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    manifest = await publish(store, {"memory": src}, KEY, meta={})
    await store.delete(object_key(manifest.file("memory").chunks[2].sha256))
    with pytest.raises(SnapshotError, match="missing from the object store"):
        await fetch(store, KEY, tmp_path / "out", cache=cache, max_bytes=1 << 30)
    assert not (tmp_path / "out").exists()


async def test_fetch_refuses_more_than_max_bytes_and_an_existing_destination(
    tmp_path: Path, store: CountingStore, cache: ObjectCache
) -> None:
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    await publish(store, {"memory": src}, KEY, meta={})
    with pytest.raises(SnapshotError, match="more than the"):
        await fetch(store, KEY, tmp_path / "out", cache=cache, max_bytes=64 * MIB - 1)
    assert store.object_gets == []  # refused before any download
    (tmp_path / "taken").mkdir()
    with pytest.raises(SnapshotError, match="already exists"):
        await fetch(store, KEY, tmp_path / "taken", cache=cache, max_bytes=1 << 30)


async def test_publish_refuses_bad_names_and_files_it_cannot_read(
    tmp_path: Path, store: CountingStore
) -> None:
    good = tmp_path / "f"
    good.write_bytes(b"x")
    for bad in ("../x", "a/b", "", "..", "nul\0"):
        with pytest.raises(SnapshotError, match="plain file name"):
            await publish(store, {bad: good}, KEY, meta={})
    with pytest.raises(SnapshotError, match="cannot publish"):
        await publish(store, {"gone": tmp_path / "missing"}, KEY, meta={})
    with pytest.raises(SnapshotError, match="not a regular file"):
        await publish(store, {"dir": tmp_path}, KEY, meta={})
    with pytest.raises(SnapshotError, match="meta"):
        await publish(store, {"f": good}, KEY, meta={"x": object()})
    assert not await store.exists(KEY)


async def test_a_file_that_changes_while_it_is_published_is_refused(
    tmp_path: Path, store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    inner_put = store.put

    async def put_then_write(key: str, data: bytes) -> None:
        await inner_put(key, data)
        with src.open("r+b") as f:  # the guest still running, say
            f.write(b"changed")

    monkeypatch.setattr(store, "put", put_then_write)
    with pytest.raises(SnapshotError, match="changed while it was being published"):
        await publish(store, {"memory": src}, KEY, meta={}, concurrency=1)
    assert not await store.inner.exists(KEY)


async def test_a_cancelled_publish_writes_no_manifest_and_stops_its_uploads(
    tmp_path: Path, store: CountingStore
) -> None:
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    store.hold_puts_after = 1  # the first object goes up, the next ones hang
    task = asyncio.create_task(publish(store, {"memory": src}, KEY, meta={}, concurrency=2))
    await asyncio.wait_for(store.held.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await store.exists(KEY)
    assert len(store.object_puts) == 1
    pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert pending == []  # no upload left running


async def test_a_failed_upload_fails_the_publish_with_its_error_and_no_manifest(
    tmp_path: Path, store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    calls = 0

    async def failing_put(key: str, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise NotFoundError("bucket is gone")
        await store.inner.put(key, data)

    monkeypatch.setattr(store, "put", failing_put)
    with pytest.raises(NotFoundError, match="bucket is gone"):
        await publish(store, {"memory": src}, KEY, meta={}, concurrency=1)
    assert not await store.exists(KEY)


async def test_a_cancelled_fetch_leaves_no_directory_and_no_temp_files(
    tmp_path: Path, store: CountingStore, cache: ObjectCache, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = sparse_file(tmp_path / "memory", 64 * MIB, RUNS)
    await publish(store, {"memory": src}, KEY, meta={})
    started = asyncio.Event()
    inner_stream = store.get_stream

    async def slow_stream(key: str, *, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        async for piece in inner_stream(key, chunk_size=chunk_size):
            yield piece
            if key.startswith(OBJECT_PREFIX):
                started.set()
                await asyncio.Event().wait()

    monkeypatch.setattr(store, "get_stream", slow_stream)
    dest = tmp_path / "out"
    # One download at a time: a cancellation that lands inside LocalBlobStore.get_stream's
    # threaded open() leaks that file (the store's own doing, not what is tested here).
    task = asyncio.create_task(
        fetch(store, KEY, dest, cache=cache, max_bytes=1 << 30, concurrency=1)
    )
    await asyncio.wait_for(started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not dest.exists()
    assert leftovers(tmp_path) == []
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
