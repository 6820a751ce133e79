"""LocalBlobStore and the blob key rules; file:// and scheme handling of fetch_code_artifact."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from embervm.blobs import BlobStore, FilePolicy, LocalBlobStore, check_key, fetch_code_artifact
from embervm.errors import BuildFailure, NotFoundError, RuntimeFailure, ValidationError


async def test_local_store_round_trip(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    assert isinstance(store, BlobStore)
    await store.put("artifacts/a.zip", b"zipdata")
    assert await store.exists("artifacts/a.zip")
    chunks = [c async for c in store.get_stream("artifacts/a.zip", chunk_size=3)]
    assert chunks == [b"zip", b"dat", b"a"]
    src = tmp_path / "big.bin"
    src.write_bytes(b"x" * 5000)
    await store.put_file("snap/mem", src)
    assert await store.get_to_file("snap/mem", tmp_path / "out.bin", max_bytes=5000) == 5000
    assert (tmp_path / "out.bin").read_bytes() == b"x" * 5000
    await store.delete("snap/mem")
    await store.delete("snap/mem")  # idempotent
    assert not await store.exists("snap/mem")
    assert not list((tmp_path / "blobs").rglob("*.tmp"))


async def test_missing_blob_is_not_found(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path)
    with pytest.raises(NotFoundError):
        _ = [c async for c in store.get_stream("nope")]


async def test_get_to_file_enforces_the_limit_and_leaves_nothing(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "b")
    await store.put("k", b"x" * 100)
    with pytest.raises(RuntimeFailure, match="larger than 10 bytes"):
        await store.get_to_file("k", tmp_path / "out" / "k", max_bytes=10)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize("key", ["", "/abs", "a/../b", "a//b", "./a", "a\\b", "a\0b"])
def test_unsafe_keys_are_refused(key: str) -> None:
    with pytest.raises(ValidationError):
        check_key(key)


async def test_fetch_file_uri_copies_the_artifact(tmp_path: Path) -> None:
    src = tmp_path / "my app.zip"
    src.write_bytes(b"PK..")
    dest = await fetch_code_artifact(src.as_uri(), tmp_path / "work" / "a.zip", max_bytes=100)
    assert dest.read_bytes() == b"PK.."


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("file:///nonexistent/a.zip", "could not be fetched"),
        ("ftp://host/a.zip", "not supported"),
        ("http://example.com/a.zip", "plain http"),
        ("s3://bucket-only", "must look like s3://bucket/key"),
        ("file://otherhost/a.zip", "must name a local path"),
    ],
)
async def test_fetch_refusals_are_build_failures(tmp_path: Path, uri: str, why: str) -> None:
    with pytest.raises(BuildFailure, match=why):
        await fetch_code_artifact(uri, tmp_path / "a.zip")
    assert not (tmp_path / "a.zip").exists()


async def test_a_missing_file_a_folder_and_a_fifo_get_the_same_answer(tmp_path: Path) -> None:
    """Nothing tells the caller what is at a path: it is a zip or it "could not be fetched"."""
    os.mkfifo(tmp_path / "pipe.zip")
    (tmp_path / "unreadable.zip").write_bytes(b"x")
    (tmp_path / "unreadable.zip").chmod(0)
    answers = set()
    for name in ("missing.zip", "", "pipe.zip", "unreadable.zip" if os.geteuid() else ""):
        with pytest.raises(BuildFailure) as err:
            await fetch_code_artifact((tmp_path / name).as_uri(), tmp_path / "a.zip")
        answers.add(err.value.reason.replace(repr((tmp_path / name).as_uri()), "URI"))
    assert answers == {"code artifact URI could not be fetched; give a zip file"}


async def test_fetch_file_uri_confined_to_roots(tmp_path: Path) -> None:
    (tmp_path / "uploads").mkdir()
    outside = tmp_path / "secret.zip"
    outside.write_bytes(b"x")
    policy = FilePolicy(roots=(tmp_path / "uploads",))
    with pytest.raises(BuildFailure, match="does not read artifacts from"):
        await fetch_code_artifact(outside.as_uri(), tmp_path / "a.zip", file_policy=policy)
    sneaky = f"file://{tmp_path}/uploads/../secret.zip"
    with pytest.raises(BuildFailure, match="does not read artifacts from"):
        await fetch_code_artifact(sneaky, tmp_path / "a.zip", file_policy=policy)
    (tmp_path / "uploads" / "link.zip").symlink_to(outside)
    with pytest.raises(BuildFailure, match="does not read artifacts from"):
        await fetch_code_artifact(
            (tmp_path / "uploads" / "link.zip").as_uri(), tmp_path / "a.zip", file_policy=policy
        )


async def test_fetch_file_uri_denied_folder_except_its_carve_out(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "keys").mkdir(parents=True)
    (data / "uploads").mkdir()
    (data / "keys" / "tokens.zip").write_bytes(b"secret")
    (data / "uploads" / "app.zip").write_bytes(b"app")
    policy = FilePolicy(denied=(data,), carve_outs=(data / "uploads",))
    with pytest.raises(BuildFailure, match="does not read artifacts from"):
        await fetch_code_artifact(
            (data / "keys" / "tokens.zip").as_uri(), tmp_path / "a.zip", file_policy=policy
        )
    escape = f"file://{data}/uploads/../keys/tokens.zip"
    with pytest.raises(BuildFailure, match="does not read artifacts from"):
        await fetch_code_artifact(escape, tmp_path / "a.zip", file_policy=policy)
    out = await fetch_code_artifact(
        (data / "uploads" / "app.zip").as_uri(), tmp_path / "a.zip", file_policy=policy
    )
    assert out.read_bytes() == b"app"


async def test_fetch_file_uri_never_reads_pseudo_file_systems(tmp_path: Path) -> None:
    for uri in ("file:///proc/self/environ", "file:///dev/zero", "file:///sys/kernel/notes"):
        with pytest.raises(BuildFailure, match="does not read artifacts from"):
            await fetch_code_artifact(uri, tmp_path / "a.zip")
    assert not (tmp_path / "a.zip").exists()


async def test_fetch_file_uri_of_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.zip"
    os.mkfifo(fifo)
    with pytest.raises(BuildFailure, match="could not be fetched"):
        await fetch_code_artifact(fifo.as_uri(), tmp_path / "a.zip", timeout=5.0)


async def test_fetch_size_limit_counts_real_bytes(tmp_path: Path) -> None:
    src = tmp_path / "big.zip"
    src.write_bytes(b"x" * 1000)
    with pytest.raises(BuildFailure, match="larger than 999 bytes"):
        await fetch_code_artifact(src.as_uri(), tmp_path / "out" / "a.zip", max_bytes=999)
    assert list((tmp_path / "out").iterdir()) == []


async def test_a_read_cancelled_while_the_file_opens_closes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The open runs in a thread that a cancel cannot stop: what it opens must still be closed
    (it leaked as a ResourceWarning before)."""
    store = LocalBlobStore(tmp_path / "blobs")
    await store.put("a/b", b"data")
    started, release = threading.Event(), threading.Event()
    opened: list[Any] = []
    real_open = Path.open

    def slow_open(self: Path, *args: Any, **kwargs: Any) -> Any:
        started.set()
        release.wait(10)
        handle = real_open(self, *args, **kwargs)
        opened.append(handle)
        return handle

    monkeypatch.setattr(Path, "open", slow_open)
    reading = asyncio.create_task(anext(store.get_stream("a/b")))
    await asyncio.to_thread(started.wait, 10)
    reading.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reading
    release.set()
    for _ in range(200):
        if opened and opened[0].closed:
            break
        await asyncio.sleep(0.01)
    assert opened
    assert opened[0].closed
