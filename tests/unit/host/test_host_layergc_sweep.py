"""``host/layergc.py`` on a temp dir with qcow2 headers written by hand (no qemu-img; the real
chains are in tests/integration/host/test_host_layergc.py): backing names read, chains
followed safely, only layers nothing reaches deleted, the collector errs towards keeping."""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from embervm.host import layergc
from embervm.host.layergc import (
    GRACE,
    Collected,
    backing_file,
    chain,
    collect,
    needed_layers,
    open_files_under,
    prune_uploads,
)
from embervm.imagebuild.cache import LayerRef

NOW = time.time()
OLD = NOW - 2 * GRACE


def qcow2(path: Path, backing: str | None = None, *, age: float | None = OLD) -> Path:
    """A qcow2 header naming ``backing`` (as written: relative or absolute)."""
    name = os.fsencode(backing) if backing else b""
    header = struct.pack(">4sIQI", b"QFI\xfb", 3, 512 if name else 0, len(name))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.ljust(512, b"\0") + name + b"\0" * 3584)
    if age is not None:
        os.utime(path, (age, age))
    return path


# -- reading backing files -------------------------------------------------------------------


def test_a_relative_backing_name_is_relative_to_the_files_folder(tmp_path: Path) -> None:
    top = qcow2(tmp_path / "layers" / "top.qcow2", "../base/b.qcow2")
    assert backing_file(top) == tmp_path / "layers" / "../base/b.qcow2"


def test_an_absolute_backing_name_stays_absolute(tmp_path: Path) -> None:
    top = qcow2(tmp_path / "top.qcow2", "/srv/base.raw")
    assert backing_file(top) == Path("/srv/base.raw")


@pytest.mark.parametrize(
    "content",
    [
        b"",  # empty
        b"QFI\xfb\x00\x00",  # shorter than a header
        struct.pack(">4sIQI", b"RAW!", 3, 512, 4).ljust(600, b"a"),  # not qcow2
        struct.pack(">4sIQI", b"QFI\xfb", 3, 0, 0),  # no backing file
        struct.pack(">4sIQI", b"QFI\xfb", 3, 512, 0).ljust(600, b"a"),  # empty name
        struct.pack(">4sIQI", b"QFI\xfb", 3, 512, 4097).ljust(5000, b"a"),  # absurd name size
    ],
)
def test_files_without_a_usable_backing_name_have_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "x.qcow2"
    path.write_bytes(content)
    assert backing_file(path) is None


def test_an_unreadable_file_raises(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        backing_file(tmp_path / "absent.qcow2")


def test_a_chain_is_followed_to_its_end_and_resolved(tmp_path: Path) -> None:
    base = qcow2(tmp_path / "layers" / "base.qcow2")
    middle = qcow2(tmp_path / "layers" / "mid.qcow2", "base.qcow2")
    (tmp_path / "alias").symlink_to(tmp_path / "layers")
    top = qcow2(tmp_path / "vms" / "disk.qcow2", "../alias/mid.qcow2")
    assert chain(top) == [top, middle, base]


def test_a_loop_of_backing_files_ends(tmp_path: Path) -> None:
    a = qcow2(tmp_path / "a.qcow2", "b.qcow2")
    b = qcow2(tmp_path / "b.qcow2", "a.qcow2")
    assert chain(a) == [a, b]


def test_a_dangling_backing_name_ends_the_chain(tmp_path: Path) -> None:
    top = qcow2(tmp_path / "top.qcow2", "gone.qcow2")
    assert chain(top) == [top, tmp_path / "gone.qcow2"]


def test_a_chain_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(layergc, "_MAX_CHAIN", 3)
    for i in range(6):
        qcow2(tmp_path / f"{i}.qcow2", f"{i + 1}.qcow2")
    assert [p.name for p in chain(tmp_path / "0.qcow2")] == ["0.qcow2", "1.qcow2", "2.qcow2"]


def test_files_this_process_holds_open_are_found(tmp_path: Path) -> None:
    layer = qcow2(tmp_path / "layers" / "open.qcow2")
    qcow2(tmp_path / "layers" / "closed.qcow2")
    with layer.open("rb"):
        assert layer in open_files_under(tmp_path / "layers")
    assert not any(p.parent == tmp_path / "layers" for p in open_files_under(tmp_path / "layers"))


# -- what is needed --------------------------------------------------------------------------


def test_needed_layers_come_from_image_and_vm_disks_and_the_cache(tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    for name in ("base", "img", "vm", "cached", "orphan"):
        qcow2(layers / f"{name}.qcow2", "base.qcow2" if name != "base" else None)
    outside = qcow2(tmp_path / "elsewhere" / "disk.qcow2")
    qcow2(
        tmp_path / "images" / "a" / "web" / "1" / "snapshot" / "disk.qcow2",
        str(layers / "img.qcow2"),
    )
    qcow2(tmp_path / "vms" / "x" / "disk.qcow2", "../../layers/vm.qcow2")
    needed = needed_layers(
        [tmp_path / "images", tmp_path / "vms", tmp_path / "missing-root"],
        [layers / "cached.qcow2", outside],
        layers,
    )
    assert {p.name for p in needed} == {"base.qcow2", "img.qcow2", "vm.qcow2", "cached.qcow2"}


# -- collect ---------------------------------------------------------------------------------


class FakeCache:
    """The step cache: ``forget_unused_since`` drops entries older than the cutoff."""

    def __init__(self, entries: dict[str, tuple[Path, float]]) -> None:
        self.entries = entries
        self.cutoffs: list[float] = []

    async def forget_unused_since(self, cutoff: float) -> int:
        self.cutoffs.append(cutoff)
        stale = [k for k, (_, used) in self.entries.items() if used < cutoff]
        for key in stale:
            del self.entries[key]
        return len(stale)

    async def layers(self) -> dict[str, LayerRef]:
        return {key: LayerRef(str(path)) for key, (path, _) in self.entries.items()}


def _layers(data: Path) -> set[str]:
    return {p.stem for p in (data / "layers").glob("*.qcow2")}


async def test_collect_deletes_only_what_nothing_reaches(tmp_path: Path) -> None:
    layers = tmp_path / "layers"
    qcow2(layers / "base.qcow2")
    qcow2(layers / "used.qcow2", "base.qcow2")
    qcow2(layers / "cached.qcow2", "base.qcow2")
    qcow2(layers / "stale.qcow2", "base.qcow2")
    orphan = qcow2(layers / "orphan.qcow2", "base.qcow2")
    qcow2(layers / "fresh.qcow2", "base.qcow2", age=NOW - GRACE / 2)  # just frozen by a build
    (layers / "notes.txt").write_text("not a layer")
    qcow2(tmp_path / "images" / "disk.qcow2", "../layers/used.qcow2")
    cache = FakeCache(
        {
            "k1": (layers / "cached.qcow2", NOW - 86400),
            "k2": (layers / "stale.qcow2", NOW - 30 * 86400),
        }
    )
    size = orphan.stat().st_blocks * 512
    done = await collect(layers, [tmp_path / "images"], cache, cache_days=14, now=NOW)
    assert cache.cutoffs == [NOW - 14 * 86400]
    assert done == Collected(layers_removed=2, bytes_freed=size * 2, cache_entries_forgotten=1)
    assert _layers(tmp_path) == {"base", "used", "cached", "fresh"}
    assert (layers / "notes.txt").exists()


async def test_nothing_is_deleted_while_a_disk_cannot_be_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    layers = tmp_path / "layers"
    qcow2(layers / "orphan.qcow2")
    (tmp_path / "a-folder").mkdir()
    qcow2(tmp_path / "vms" / "disk.qcow2", "../a-folder")  # reading its "backing file" fails
    with caplog.at_level(logging.WARNING, logger="embervm.host.layergc"):
        done = await collect(layers, [tmp_path / "vms"], FakeCache({}), cache_days=1, now=NOW)
    assert done == Collected()
    assert _layers(tmp_path) == {"orphan"}
    assert "disk layers not collected" in caplog.text


async def test_no_layers_folder_yet_still_forgets_stale_entries(tmp_path: Path) -> None:
    cache = FakeCache({"k": (tmp_path / "layers" / "x.qcow2", 0.0)})
    done = await collect(tmp_path / "layers", [], cache, cache_days=1, now=NOW)
    assert done == Collected(cache_entries_forgotten=1)


# -- uploads ---------------------------------------------------------------------------------


def test_uploads_not_sent_again_since_the_cutoff_and_old_temp_files_go(tmp_path: Path) -> None:
    def file(name: str, mtime: float) -> None:
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, (mtime, mtime))

    file("old.zip", NOW - 20 * 86400)
    file("recent.zip", NOW - 86400)
    file(".upload-crashed.tmp", NOW - 2 * GRACE)
    file(".upload-running.tmp", NOW - 10)
    file("other.bin", NOW - 100 * 86400)
    assert prune_uploads(tmp_path, NOW - 14 * 86400, NOW) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".upload-running.tmp",
        "other.bin",
        "recent.zip",
    ]


async def test_keep_collecting_survives_a_failed_round(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    rounds: list[str] = []

    async def failing_collect(*_args: object, **_kwargs: object) -> Collected:
        rounds.append("collect")
        raise RuntimeError("disk on fire")

    async def sleep(seconds: float) -> None:
        rounds.append(f"sleep {seconds:g}")
        if len(rounds) >= 4:
            raise asyncio.CancelledError

    monkeypatch.setattr(layergc, "collect", failing_collect)
    # Only the module's view of asyncio: other tasks of the loop keep the real sleep.
    monkeypatch.setattr(
        layergc, "asyncio", SimpleNamespace(sleep=sleep, to_thread=asyncio.to_thread)
    )
    with (
        caplog.at_level(logging.ERROR, logger="embervm.host.layergc"),
        pytest.raises(asyncio.CancelledError),
    ):
        await layergc.keep_collecting(
            tmp_path / "layers", [], FakeCache({}), uploads=tmp_path, cache_days=1
        )
    assert rounds == ["collect", "sleep 3600", "collect", "sleep 3600"]
    assert caplog.text.count("disk layer collection failed") == 2
