"""The disk layer collector on real qcow2 chains made by qemu-img."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from embervm.host.layergc import GRACE, backing_file, collect, prune_uploads
from embervm.imagebuild.cache import LayerRef, LocalLayerCache
from embervm.vmm import create_overlay

pytestmark = pytest.mark.integration

KEY = "ab" * 32
OLD = time.time() - 10 * GRACE


@pytest.fixture
def data(tmp_path: Path) -> Path:
    base = tmp_path / "artifacts" / "rootfs.raw"
    base.parent.mkdir()
    base.write_bytes(b"\0" * 65536)
    for d in ("layers", "images", "vms", "build-cache"):
        (tmp_path / d).mkdir()
    return tmp_path


def layer(data: Path, name: str, below: Path) -> Path:
    path = create_overlay(below, data / "layers" / f"{name}.qcow2",
                          "raw" if below.suffix == ".raw" else "qcow2")  # fmt: skip
    os.utime(path, (OLD, OLD))
    return path


def qcow2_naming(backing: str, dest: Path) -> None:
    """A qcow2 whose backing file is named exactly ``backing`` (not resolved)."""
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, str(dest)]
    subprocess.run(argv, check=True, timeout=60)


async def run(data: Path, cache: LocalLayerCache, cache_days: float = 14) -> set[str]:
    await collect(data / "layers", [data / "images", data / "vms"], cache, cache_days=cache_days)
    return {p.stem for p in (data / "layers").glob("*.qcow2")}


async def test_only_layers_nothing_reaches_are_deleted(data: Path) -> None:
    base = data / "artifacts" / "rootfs.raw"
    l1 = layer(data, "l1", base)
    l2 = layer(data, "l2", l1)
    layer(data, "orphan", l1)
    l5 = layer(data, "cached", base)
    l6 = layer(data, "open", l5)
    young = create_overlay(l1, data / "layers" / "young.qcow2", "qcow2")
    image = data / "images" / "acct" / "web" / "1" / "snapshot"
    image.mkdir(parents=True)
    create_overlay(l2, image / "disk.qcow2", "qcow2")
    cache = LocalLayerCache(data / "build-cache")
    await cache.put(KEY, LayerRef(str(l5)))
    with l6.open("rb"):  # a running VM's top overlay: open, recorded nowhere yet
        left = await run(data, cache)
    assert left == {"l1", "l2", "cached", "open", "young"}
    assert backing_file(image / "disk.qcow2") == l2
    assert young.exists()


async def test_a_stale_cache_entry_is_forgotten_and_its_layer_collected(data: Path) -> None:
    cached = layer(data, "cached", data / "artifacts" / "rootfs.raw")
    cache = LocalLayerCache(data / "build-cache")
    await cache.put(KEY, LayerRef(str(cached)))
    entry = data / "build-cache" / KEY[:2] / f"{KEY}.json"
    os.utime(entry, (OLD, time.time() - 20 * 86400))
    assert await run(data, cache, cache_days=30) == {"cached"}
    assert await cache.get(KEY) is not None  # a hit marks the entry used now
    assert await run(data, cache, cache_days=10) == {"cached"}
    os.utime(entry, (OLD, time.time() - 20 * 86400))
    assert await run(data, cache, cache_days=10) == set()
    assert await cache.get(KEY) is None


async def test_a_backing_name_with_dots_or_a_symlink_still_protects_its_layer(
    data: Path,
) -> None:
    l1 = layer(data, "l1", data / "artifacts" / "rootfs.raw")
    l2 = layer(data, "l2", data / "artifacts" / "rootfs.raw")
    (data / "alias").symlink_to(data / "layers")
    vm = data / "vms" / "vm1"
    vm.mkdir()
    qcow2_naming(f"{data}/vms/../layers/l1.qcow2", vm / "a.qcow2")
    qcow2_naming(f"{data}/alias/l2.qcow2", vm / "b.qcow2")
    assert await run(data, LocalLayerCache(data / "build-cache")) == {"l1", "l2"}
    assert l1.exists()
    assert l2.exists()


async def test_nothing_is_deleted_while_a_disk_cannot_be_read(data: Path) -> None:
    layer(data, "orphan", data / "artifacts" / "rootfs.raw")
    vm = data / "vms" / "vm1"
    vm.mkdir()
    (vm / "disk.qcow2").mkdir()  # listed as a disk, unreadable as one (EISDIR): it may need any
    assert await run(data, LocalLayerCache(data / "build-cache")) == {"orphan"}
    (vm / "disk.qcow2").rmdir()
    assert await run(data, LocalLayerCache(data / "build-cache")) == set()


def test_old_uploads_and_crash_leftovers_are_pruned(tmp_path: Path) -> None:
    now = time.time()
    fresh, stale, partial = tmp_path / "a.zip", tmp_path / "b.zip", tmp_path / ".upload-1.tmp"
    for path in (fresh, stale, partial):
        path.write_bytes(b"PK")
    os.utime(stale, (now - 20 * 86400, now - 20 * 86400))
    os.utime(partial, (now - 2 * GRACE, now - 2 * GRACE))
    assert prune_uploads(tmp_path, now - 14 * 86400, now) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["a.zip"]
