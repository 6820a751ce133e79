"""``host/objects_manifest.py``: a manifest survives its own JSON, and a hostile or damaged one
is refused with ``SnapshotError`` before any object is downloaded or any file written: names
that leave the directory, sizes past the limit, negative, overlapping or out-of-bounds
extents, bad hex, chunk lists that do not add up, wrong types, loops and dangling backing
links, duplicate keys, oversized and deeply nested documents, checksum mismatches."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from embervm.blobs import LocalBlobStore
from embervm.errors import SnapshotError
from embervm.host.objects import (
    MAX_MANIFEST_BYTES,
    OBJECT_PREFIX,
    ObjectCache,
    fetch,
    parse_manifest,
    publish,
)

KEY = "images/web/1/manifest.json"
HOSTILE = "images/hostile/manifest.json"
MIB = 1 << 20


def signed(body: dict[str, Any]) -> bytes:
    """``body`` with a valid ``manifest_sha256`` (so the check under test is the one that
    refuses it, not the checksum)."""
    body = {k: v for k, v in body.items() if k != "manifest_sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["manifest_sha256"] = hashlib.sha256(canon).hexdigest()
    return json.dumps(body).encode()


@pytest.fixture
async def published(tmp_path: Path) -> tuple[LocalBlobStore, dict[str, Any]]:
    """A store holding a real publish of two files; its manifest as a dict."""
    store = LocalBlobStore(tmp_path / "store")
    a = tmp_path / "memory"
    with a.open("wb") as f:
        f.truncate(8 * MIB)
        f.write(os.urandom(MIB))
        f.seek(4 * MIB)
        f.write(os.urandom(MIB))
    b = tmp_path / "device.state"
    b.write_bytes(os.urandom(5000))
    await publish(store, {"memory": a, "device.state": b}, KEY, meta={"v": 1}, chunk_size=MIB)
    body: dict[str, Any] = json.loads((tmp_path / "store" / KEY).read_bytes())
    return store, body


def mem(body: dict[str, Any]) -> dict[str, Any]:
    file: dict[str, Any] = body["files"][0]
    return file


def set_name(value: str) -> Callable[[dict[str, Any]], None]:
    return lambda b: mem(b).update(name=value)


def set_field(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda b: mem(b).update({field: value})


def two_lengths(b: dict[str, Any]) -> None:
    # device.state's one chunk listed again inside memory's list with another length
    first = mem(b)["chunks"][0]
    b["files"][1]["chunks"] = [[first[0], b["files"][1]["chunks"][0][1]]]


def plain_file_with_backing(b: dict[str, Any]) -> None:
    mem(b).update(backing="device.state")
    b["files"][1].update(role="base")


def backing_loop(b: dict[str, Any]) -> None:
    mem(b).update(role="layer", backing="device.state")
    b["files"][1].update(role="layer", backing="memory")


HOSTILE_EDITS: dict[str, tuple[Callable[[dict[str, Any]], None], str]] = {
    "dot-dot name": (set_name("../x"), "plain file name"),
    "slash name": (set_name("a/b"), "plain file name"),
    "dot name": (set_name("."), "plain file name"),
    "empty name": (set_name(""), "plain file name"),
    "NUL name": (set_name("x\0y"), "plain file name"),
    "long name": (set_name("x" * 256), "longer than 255"),
    "name not a string": (set_name(7), "plain file name"),  # type: ignore[arg-type]
    "huge size": (set_field("size", 1 << 60), "size"),
    "negative size": (set_field("size", -1), "size"),
    "size as float": (set_field("size", 8.0 * MIB), "size"),
    "size as bool": (set_field("size", True), "size"),
    "setuid mode": (set_field("mode", 0o4755), "mode"),
    "negative offset": (lambda b: mem(b)["extents"][0].__setitem__(0, -1), "offset"),
    "zero length extent": (lambda b: mem(b)["extents"][0].__setitem__(1, 0), "length"),
    "overlapping extents": (lambda b: mem(b)["extents"][1].__setitem__(0, MIB // 2), "overlaps"),
    "extents out of order": (lambda b: mem(b)["extents"].reverse(), "overlaps|out of order"),
    "extent past the size": (set_field("size", 5 * MIB - 1), "past the size"),
    "extent not a pair": (lambda b: mem(b)["extents"].append([1]), "extent"),
    "bad file hex": (set_field("sha256", "G" * 64), "hex"),
    "upper-case hex": (set_field("sha256", "A" * 64), "hex"),
    "short chunk hex": (lambda b: mem(b)["chunks"][0].__setitem__(0, "ab" * 10), "hex"),
    "chunk hex with a path": (
        lambda b: mem(b)["chunks"][0].__setitem__(0, "../" + "a" * 61),
        "hex",
    ),
    "chunk too long": (lambda b: mem(b)["chunks"][0].__setitem__(1, 65 * MIB), "chunk length"),
    "chunks do not add up": (lambda b: mem(b)["chunks"].pop(), "do not add up"),
    "one chunk, two lengths": (two_lengths, "two lengths|do not add up"),
    "duplicate file names": (set_name("device.state"), "appears twice"),
    "unknown role": (set_field("role", "kernel"), "role"),
    "backing to nothing": (set_field("backing", "elsewhere.qcow2"), "not in the manifest"),
    "backing of a plain file": (plain_file_with_backing, "role is file"),
    "backing loop": (backing_loop, "loops"),
    "layer nobody backs onto": (set_field("role", "layer"), "no file backs onto it"),
    "external with a path": (lambda b: b.update(external=["/etc/passwd"]), "plain file name"),
    "missing field": (lambda b: mem(b).pop("mtime_ns"), "fields"),
    "extra field": (set_field("owner", "root"), "fields"),
    "extra top-level field": (lambda b: b.update(extra=1), "unexpected fields"),
    "files not a list": (lambda b: b.update(files={}), "must be lists"),
    "meta not an object": (lambda b: b.update(meta=[]), "meta"),
    "other version": (lambda b: b.update(version=2), "version"),
    "other format": (lambda b: b.update(format="tar"), "format"),
}


@pytest.mark.parametrize("edit", HOSTILE_EDITS, ids=list(HOSTILE_EDITS))
async def test_a_hostile_manifest_is_refused_before_anything_is_fetched(
    tmp_path: Path, published: tuple[LocalBlobStore, dict[str, Any]], edit: str
) -> None:
    store, body = published
    change, why = HOSTILE_EDITS[edit]
    hostile = copy.deepcopy(body)
    change(hostile)
    await store.put(HOSTILE, signed(hostile))
    cache = ObjectCache(tmp_path / "cache")
    with pytest.raises(SnapshotError, match=why):
        await fetch(store, HOSTILE, tmp_path / "out", cache=cache, max_bytes=1 << 40)
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "cache").exists()  # refused before the first download
    assert not (tmp_path / "x").exists()


def test_the_unchanged_manifest_passes_the_same_checks(
    published: tuple[LocalBlobStore, dict[str, Any]],
) -> None:
    """The control of the test above: the re-signed, unedited body is accepted."""
    _, body = published
    manifest = parse_manifest(signed(copy.deepcopy(body)), where="x")
    assert [f.name for f in manifest.files] == ["memory", "device.state"]
    assert manifest.meta == {"v": 1}
    assert parse_manifest(manifest.to_json(), where="x") == manifest


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "not valid JSON"),
        (b'{"format": "embervm-objects", "format": "x"}', "duplicate key"),
        (b'{"size": NaN}', "not valid JSON"),
        (b'{"size": 1' + b"0" * 5000 + b"}", "not valid JSON"),
    ],
    ids=["text", "list", "bad utf-8", "deep nesting", "duplicate keys", "NaN", "huge integer"],
)
def test_documents_that_are_not_manifests_are_refused(raw: bytes, why: str) -> None:
    with pytest.raises(SnapshotError, match=why):
        parse_manifest(raw, where="k")


async def test_a_changed_byte_fails_the_checksum_and_an_oversized_manifest_is_not_read_whole(
    tmp_path: Path, published: tuple[LocalBlobStore, dict[str, Any]]
) -> None:
    store, body = published
    edited = copy.deepcopy(body)
    mem(edited)["mode"] = 0o777  # a valid value, but not what was signed
    await store.put(HOSTILE, json.dumps(edited).encode())
    cache = ObjectCache(tmp_path / "cache")
    with pytest.raises(SnapshotError, match="checksum mismatch"):
        await fetch(store, HOSTILE, tmp_path / "out", cache=cache, max_bytes=1 << 40)

    await store.put(HOSTILE, b" " * (MAX_MANIFEST_BYTES + 1))
    with pytest.raises(SnapshotError, match="larger than"):
        await fetch(store, HOSTILE, tmp_path / "out", cache=cache, max_bytes=1 << 40)
    assert not (tmp_path / "out").exists()
    assert list((tmp_path / "store" / OBJECT_PREFIX).iterdir())  # the objects are untouched
