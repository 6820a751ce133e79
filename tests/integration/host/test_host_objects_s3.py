"""``host/objects.py`` against a real S3 server (SeaweedFS, ``localfleet.LocalSeaweedFS``,
started by this module): a sparse file and a qcow2 chain published by one "host" and fetched
by another, bytes moved ≈ the data, a second publish uploading nothing; a missing manifest, a
corrupt object; the server killed in the middle of a publish (the publish fails in bounded
time and no manifest exists once the server is back)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from embervm.blobs import BlobStore, S3BlobStore, S3Credentials
from embervm.blobs._store import CHUNK
from embervm.errors import ConfigError, NotFoundError, RuntimeFailure, SnapshotError
from embervm.host.objects import (
    OBJECT_PREFIX,
    ObjectCache,
    TransferStats,
    fetch,
    object_key,
    publish,
    with_chain,
)
from embervm.localfleet import LocalSeaweedFS, free_port
from embervm.vmm.rootview import backing_chain

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MIB = 1 << 20
KEY = "images/web/1/manifest.json"


@pytest.fixture(scope="module")
def seaweedfs() -> Iterator[LocalSeaweedFS]:
    """One SeaweedFS for the module (each test uses its own key prefix), bucket ``embervm``."""
    root = Path(tempfile.mkdtemp(prefix="embervm-objects-s3-"))
    sw = LocalSeaweedFS(root / "seaweedfs")
    try:
        sw.weed  # noqa: B018 - ConfigError when the wheel is missing
    except ConfigError as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(str(exc))
    try:
        sw.start(free_port())
        sw.create_bucket("embervm")
        yield sw
    finally:
        try:
            sw.stop()
        finally:
            if sw.is_running():
                sw.kill()
            shutil.rmtree(root, ignore_errors=True)


def store_of(sw: LocalSeaweedFS, prefix: str) -> S3BlobStore:
    keys = sw.credentials
    creds = S3Credentials(keys.access_key_id, keys.secret_access_key)
    return S3BlobStore("embervm", sw.endpoint_url, creds, prefix=f"{prefix}/")


class Counting:
    """Any ``BlobStore``, with the bytes that cross it counted."""

    def __init__(self, inner: S3BlobStore) -> None:
        self.inner = inner
        self.put_bytes = 0
        self.get_bytes = 0
        self.object_puts = 0
        self.after_put: list[object] = []

    async def put(self, key: str, data: bytes) -> None:
        await self.inner.put(key, data)
        self.put_bytes += len(data)
        self.object_puts += key.startswith(OBJECT_PREFIX)
        for hook in self.after_put:
            await asyncio.to_thread(hook)  # type: ignore[arg-type]

    async def put_file(self, key: str, source: Path) -> None:
        await self.inner.put_file(key, source)

    async def get_stream(self, key: str, *, chunk_size: int = CHUNK) -> AsyncIterator[bytes]:
        async for piece in self.inner.get_stream(key, chunk_size=chunk_size):
            self.get_bytes += len(piece)
            yield piece

    async def get_to_file(self, key: str, dest: Path, *, max_bytes: int) -> int:
        return await self.inner.get_to_file(key, dest, max_bytes=max_bytes)

    async def exists(self, key: str) -> bool:
        return await self.inner.exists(key)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)


def sparse_file(path: Path) -> tuple[Path, int]:
    """64 MiB with three data extents (3.5 MiB); the path and the data bytes."""
    runs = [(0, os.urandom(MIB)), (20 * MIB, os.urandom(2 * MIB)), (63 * MIB, os.urandom(MIB // 2))]
    with path.open("wb") as f:
        f.truncate(64 * MIB)
        for offset, data in runs:
            f.seek(offset)
            f.write(data)
    return path, sum(len(d) for _, d in runs)


def run(argv: list[str]) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(MIB):
            digest.update(block)
    return digest.hexdigest()


async def test_a_sparse_file_round_trip_moves_the_data_and_a_second_publish_uploads_nothing(
    seaweedfs: LocalSeaweedFS, tmp_path: Path
) -> None:
    store = Counting(store_of(seaweedfs, "roundtrip"))
    assert isinstance(store, BlobStore)
    src, data = sparse_file(tmp_path / "memory")
    state = tmp_path / "device.state"
    state.write_bytes(os.urandom(70_000))
    manifest = await publish(store, {"memory": src, "device.state": state}, KEY, meta={"n": 1})
    manifest_bytes = len(manifest.to_json())
    assert store.put_bytes == data + 70_000 + manifest_bytes
    assert store.object_puts == 4

    await publish(store, {"memory": src, "device.state": state}, "again.json", meta={"n": 1})
    assert store.object_puts == 4  # every object is already there

    stats = TransferStats()
    dest = tmp_path / "host-b" / "snapshot"
    cache = ObjectCache(tmp_path / "host-b" / "cache")
    await fetch(store, KEY, dest, cache=cache, max_bytes=1 << 30, stats=stats)
    assert store.get_bytes == data + 70_000 + manifest_bytes
    assert (stats.objects_downloaded, stats.bytes_downloaded) == (4, data + 70_000)
    assert sha256_of(dest / "memory") == sha256_of(src)
    assert (dest / "memory").stat().st_blocks * 512 <= data + MIB
    assert (dest / "device.state").read_bytes() == state.read_bytes()


@pytest.mark.skipif(not shutil.which("qemu-io"), reason="needs qemu-img and qemu-io")
async def test_a_qcow2_chain_published_on_one_host_restores_on_another(
    seaweedfs: LocalSeaweedFS, tmp_path: Path
) -> None:
    a = tmp_path / "host-a"
    a.mkdir()
    base, _ = sparse_file(a / "base.raw")
    layer, top = a / "layer.qcow2", a / "disk.qcow2"
    for argv in (
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw", str(layer)],
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 1M 2M", str(layer)],
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(layer), "-F", "qcow2", str(top)],
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x22 30M 1M", str(top)],
    ):
        run(argv)
    store = store_of(seaweedfs, "chain")
    await publish(store, with_chain({"disk.qcow2": top}), KEY, meta={})
    dest = tmp_path / "host-b" / "snapshot"
    await fetch(store, KEY, dest, cache=ObjectCache(tmp_path / "cache"), max_bytes=1 << 30)
    disk = dest / "disk.qcow2"
    assert backing_chain(disk) == [dest / "layer.qcow2", dest / "base.raw"]
    assert "No errors were found" in run(["qemu-img", "check", str(disk)])
    assert "identical" in run(["qemu-img", "compare", str(top), str(disk)])


async def test_a_missing_manifest_and_a_corrupt_object(
    seaweedfs: LocalSeaweedFS, tmp_path: Path
) -> None:
    store = store_of(seaweedfs, "corrupt")
    cache = ObjectCache(tmp_path / "cache")
    with pytest.raises(NotFoundError):
        await fetch(store, KEY, tmp_path / "out", cache=cache, max_bytes=1 << 30)
    src, _ = sparse_file(tmp_path / "memory")
    manifest = await publish(store, {"memory": src}, KEY, meta={})
    victim = manifest.file("memory").chunks[0]
    good = b"".join([piece async for piece in store.get_stream(victim.key)])
    await store.put(victim.key, good[:-1] + bytes([good[-1] ^ 1]))
    with pytest.raises(SnapshotError, match="corrupt in the object store"):
        await fetch(store, KEY, tmp_path / "out", cache=cache, max_bytes=1 << 30)
    assert not (tmp_path / "out").exists()
    assert not cache.path_of(victim.sha256).exists()
    await store.put(object_key(victim.sha256), good)
    await fetch(store, KEY, tmp_path / "out", cache=cache, max_bytes=1 << 30)
    assert sha256_of(tmp_path / "out" / "memory") == sha256_of(src)


async def test_the_server_killed_in_the_middle_of_a_publish(
    seaweedfs: LocalSeaweedFS, tmp_path: Path
) -> None:
    """Last in the module: it kills the server (and starts it again on the same port)."""
    store = Counting(store_of(seaweedfs, "killed"))
    src, _ = sparse_file(tmp_path / "memory")
    store.after_put.append(seaweedfs.kill)  # after the first object is stored
    started = time.monotonic()
    with pytest.raises(RuntimeFailure):
        await publish(store, {"memory": src}, KEY, meta={}, concurrency=1)
    failed_after = time.monotonic() - started
    print(f"the publish failed {failed_after:.2f} s after it started (server killed)")
    assert failed_after < 60, failed_after
    store.after_put.clear()
    port = seaweedfs.s3_port
    await asyncio.to_thread(seaweedfs.start, port)
    assert not await store.exists(KEY)  # never half a published set
    await publish(store, {"memory": src}, KEY, meta={})
    dest = tmp_path / "out"
    await fetch(store, KEY, dest, cache=ObjectCache(tmp_path / "cache"), max_bytes=1 << 30)
    assert sha256_of(dest / "memory") == sha256_of(src)
