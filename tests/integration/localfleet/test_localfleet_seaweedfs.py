"""LocalSeaweedFS, and ``S3BlobStore`` against it: the first test of the S3 store on a real S3
server. Round trips of bytes and of a 20 MiB file, missing keys, overwrites, keys with slashes,
prefixes, the size limit; a server killed in the middle of an upload (nothing visible under the
key, a RuntimeFailure in bounded time, the server's earlier objects back after a restart);
nothing of weed left behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from embervm.blobs import BlobStore, S3BlobStore, S3Config, S3Credentials
from embervm.errors import ConfigError, NotFoundError, RuntimeFailure, ValidationError
from embervm.localfleet import LocalSeaweedFS, free_port
from embervm.localfleet._proc import is_gone

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

MIB = 1 << 20


def store_of(sw: LocalSeaweedFS, *, prefix: str = "", secret: str | None = None) -> S3BlobStore:
    keys = sw.credentials
    creds = S3Credentials(keys.access_key_id, secret or keys.secret_access_key)
    return S3BlobStore("embervm", sw.endpoint_url, creds, prefix=prefix)


def random_file(path: Path, mib: int) -> str:
    """Write ``mib`` MiB of random bytes (nothing SeaweedFS could compress); their sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as fh:
        for _ in range(mib):
            block = os.urandom(MIB)
            digest.update(block)
            fh.write(block)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(MIB):
            digest.update(block)
    return digest.hexdigest()


async def test_bytes_round_trip_missing_keys_overwrites_and_slashes(
    seaweedfs: LocalSeaweedFS,
) -> None:
    store = store_of(seaweedfs)
    assert isinstance(store, BlobStore)
    key = "images/sha256-ab/snapshot/device.state"
    assert not await store.exists(key)
    with pytest.raises(NotFoundError):
        _ = [c async for c in store.get_stream(key)]
    await store.delete(key)  # deleting what is not there is not an error (as LocalBlobStore)

    await store.put(key, b"first version")
    assert await store.exists(key)
    assert not await store.exists("images/sha256-ab/snapshot")  # a prefix is not an object
    assert not await store.exists("images/sha256-ab/snapshot/device")
    await store.put(key, b"second, longer version")  # overwrite
    chunks = [c async for c in store.get_stream(key, chunk_size=7)]
    assert b"".join(chunks) == b"second, longer version"
    assert all(len(c) <= 7 for c in chunks)

    await store.put("empty", b"")
    assert await store.exists("empty")
    assert [c async for c in store.get_stream("empty")] == []
    await store.put("unicode/ñame with spaces+plus", b"u")
    assert b"".join([c async for c in store.get_stream("unicode/ñame with spaces+plus")]) == b"u"

    await store.delete(key)
    assert not await store.exists(key)
    with pytest.raises(NotFoundError):
        _ = [c async for c in store.get_stream(key)]


async def test_a_20_mib_file_round_trip_and_the_size_limit(
    seaweedfs: LocalSeaweedFS, tmp_path: Path
) -> None:
    store = store_of(seaweedfs)
    source = tmp_path / "memory"
    digest = random_file(source, 20)
    await store.put_file("snapshots/mvm-1/memory", source)  # multipart (over 8 MiB)
    assert await store.exists("snapshots/mvm-1/memory")
    out = tmp_path / "out" / "memory"
    assert await store.get_to_file("snapshots/mvm-1/memory", out, max_bytes=20 * MIB) == 20 * MIB
    assert sha256_of(out) == digest

    # Overwritten by a smaller file: the object is the new one, whole.
    small = tmp_path / "small"
    small_digest = random_file(small, 3)
    await store.put_file("snapshots/mvm-1/memory", small)
    assert await store.get_to_file("snapshots/mvm-1/memory", out, max_bytes=20 * MIB) == 3 * MIB
    assert sha256_of(out) == small_digest

    # Over the limit: refused on the bytes received, and nothing is left at the destination.
    limited = tmp_path / "limited"
    with pytest.raises(RuntimeFailure, match="larger than"):
        await store.get_to_file("snapshots/mvm-1/memory", limited, max_bytes=MIB)
    assert not limited.exists()
    assert not [p for p in limited.parent.iterdir() if p.name.startswith(".limited")]
    with pytest.raises(NotFoundError):
        await store.get_to_file("snapshots/mvm-2/memory", tmp_path / "none", max_bytes=MIB)
    assert not (tmp_path / "none").exists()


async def test_prefixes_keep_stores_apart_and_bad_keys_are_refused(
    seaweedfs: LocalSeaweedFS,
) -> None:
    one, two = store_of(seaweedfs, prefix="fleet-a/"), store_of(seaweedfs, prefix="fleet-b/")
    await one.put("k", b"a")
    assert await one.exists("k")
    assert not await two.exists("k")
    assert await store_of(seaweedfs).exists("fleet-a/k")
    with pytest.raises(ValidationError, match=r"segment"):
        await one.put("../escape", b"x")


async def test_only_signed_requests_with_the_secret_get_in(
    seaweedfs: LocalSeaweedFS,
) -> None:
    await store_of(seaweedfs).put("private", b"secret data")
    assert (
        await asyncio.to_thread(anonymous_get, f"{seaweedfs.endpoint_url}/embervm/private") == 403
    )
    with pytest.raises(RuntimeFailure):
        await store_of(seaweedfs, secret="0" * 40).exists("private")
    keys_file = seaweedfs.root / "credentials.json"
    assert keys_file.stat().st_mode & 0o777 == 0o600
    assert (seaweedfs.root / "s3.json").stat().st_mode & 0o777 == 0o600
    assert "***" in repr(seaweedfs.credentials)
    assert seaweedfs.credentials.secret_access_key not in repr(seaweedfs.credentials)


async def test_killed_in_the_middle_of_an_upload(seaweedfs: LocalSeaweedFS, tmp_path: Path) -> None:
    store = store_of(seaweedfs)
    await store.put("before/kept", b"written before the crash")
    big = tmp_path / "big"
    random_file(big, 256)
    watcher = seaweedfs.client(connect_timeout=2, read_timeout=5)
    upload = asyncio.create_task(store.put_file("snapshots/mvm-9/memory", big))

    def parts_stored() -> int:
        uploads = watcher.list_multipart_uploads(Bucket="embervm").get("Uploads", [])
        return sum(
            len(watcher.list_parts(Bucket="embervm", Key=u["Key"], UploadId=u["UploadId"])
                .get("Parts", []))
            for u in uploads
        )  # fmt: skip

    deadline = time.monotonic() + 60
    while await asyncio.to_thread(parts_stored) == 0:  # under way: a part is on the server
        assert not upload.done(), "the upload ended before any part was seen"
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert not upload.done()
    pid = seaweedfs.pid
    assert pid is not None
    seaweedfs.kill()
    assert is_gone(pid)
    assert seaweedfs.pid is None

    killed_at = time.monotonic()
    with pytest.raises(RuntimeFailure, match="S3 put"):
        await asyncio.wait_for(upload, timeout=120)
    failed_after = time.monotonic() - killed_at
    assert failed_after < 60, f"the store took {failed_after:.1f} s to give up"

    print(f"the store gave up {failed_after:.2f} s after the kill")
    seaweedfs.start(seaweedfs.s3_port)  # the same endpoint as before the crash
    assert not await store.exists("snapshots/mvm-9/memory")
    with pytest.raises(NotFoundError):
        await store.get_to_file("snapshots/mvm-9/memory", tmp_path / "x", max_bytes=512 * MIB)
    assert b"".join([c async for c in store.get_stream("before/kept")]) == (
        b"written before the crash"
    )
    # After uploads, SIGTERM still stops it in a few seconds (not its 30 s connection deadline).
    await store.put_file("after/restart", big)
    started = time.monotonic()
    seaweedfs.stop()
    assert time.monotonic() - started < seaweedfs.stop_grace / 2


async def test_a_store_whose_server_is_gone_fails_in_bounded_time(
    seaweedfs: LocalSeaweedFS,
) -> None:
    endpoint = seaweedfs.endpoint_url
    seaweedfs.stop()
    keys = seaweedfs.credentials
    config = S3Config(endpoint, S3Credentials(keys.access_key_id, keys.secret_access_key))
    store = S3BlobStore("embervm", endpoint, None, config=config)
    started = time.monotonic()
    with pytest.raises(RuntimeFailure):
        await store.put("k", b"v")
    assert time.monotonic() - started < 30


def test_start_stop_are_idempotent_and_nothing_is_left_behind(
    seaweedfs: LocalSeaweedFS,
) -> None:
    port = seaweedfs.s3_port
    pid = seaweedfs.pid
    assert pid is not None
    seaweedfs.start(port)  # already running there: nothing to do
    assert seaweedfs.pid == pid
    with pytest.raises(ConfigError, match="already runs"):
        seaweedfs.start(free_port())
    listeners = own_tcp_listeners(pid)
    assert port in {p for _, p in listeners}
    assert {address for address, _ in listeners} == {"0100007F"}  # 127.0.0.1 only
    ports = seaweedfs_grpc_sockets(seaweedfs)
    assert ports  # weed made its gRPC sockets in /tmp
    # Another LocalSeaweedFS of the same folder (as `fleet down` in another process) stops it.
    started = time.monotonic()
    LocalSeaweedFS(seaweedfs.root).stop()
    assert time.monotonic() - started < 15
    assert is_gone(pid)
    assert seaweedfs.pid is None
    assert not (seaweedfs.root / "run.json").exists()
    assert not [p for p in ports if p.exists()]
    seaweedfs.stop()
    seaweedfs.kill()


def anonymous_get(url: str) -> int:
    """The HTTP status of an unsigned GET."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def seaweedfs_grpc_sockets(sw: LocalSeaweedFS) -> list[Path]:
    import json

    ports = json.loads((sw.root / "run.json").read_text())["ports"]
    return [
        Path(f"/tmp/seaweedfs-{name}-grpc-{ports[name + '_grpc']}.sock")
        for name in ("master", "volume", "filer", "s3", "admin")
        if Path(f"/tmp/seaweedfs-{name}-grpc-{ports[name + '_grpc']}.sock").exists()
    ]


def own_tcp_listeners(pid: int) -> set[tuple[str, int]]:
    """(hex address, port) of every TCP socket ``pid`` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                fields = line.split()
                address, hex_port = fields[1].split(":")
                if fields[3] == "0A" and fields[9] in inodes:
                    found.add((address, int(hex_port, 16)))
    return found
