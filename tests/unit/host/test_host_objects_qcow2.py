"""``host/objects.py`` with real qcow2 chains (qemu-img, qemu-io): an image's disk published
with its whole chain down to the raw base and fetched into another directory restores the
same guest-visible disk, its backing files rewritten to the fetched neighbours; a suspended
VM's overlay travels alone over an ``external`` image disk; a qcow2 that would reach a file
the manifest does not list (a hidden backing file, an external data file) is refused."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from embervm.blobs import LocalBlobStore
from embervm.errors import SnapshotError
from embervm.host import objects_publish
from embervm.host.objects import ObjectCache, chain_of, fetch, publish, with_chain
from embervm.vmm.rootview import backing_chain

pytestmark = pytest.mark.skipif(
    not (shutil.which("qemu-img") and shutil.which("qemu-io")), reason="needs qemu-img, qemu-io"
)

MIB = 1 << 20
IMAGE = "images/web/1/manifest.json"
SUSPEND = "vms/mvm-1/suspend/manifest.json"


def run(*argv: str | Path) -> str:
    done = subprocess.run([str(a) for a in argv], check=True, capture_output=True, text=True)
    return done.stdout


def qemu_write(disk: Path, pattern: int, offset: int, length: int) -> None:
    run("qemu-io", "-f", "qcow2", "-c", f"write -P {pattern} {offset} {length}", disk)


def make_chain(folder: Path) -> Path:
    """base.raw (64 MiB, sparse, random data at two places) ← layer.qcow2 ← top.qcow2, each
    layer writing its own pattern; absolute backing names, as Embervm makes them."""
    folder.mkdir()
    base = folder / "base.raw"
    with base.open("wb") as f:
        f.truncate(64 * MIB)
        f.write(os.urandom(MIB))
        f.seek(40 * MIB)
        f.write(os.urandom(3 * MIB))
    layer, top = folder / "layer.qcow2", folder / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", layer)
    qemu_write(layer, 0x11, 2 * MIB, MIB)
    qemu_write(layer, 0x12, 40 * MIB, 64 * 1024)  # over the base's data
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", layer, "-F", "qcow2", top)
    qemu_write(top, 0x21, 2 * MIB + 4096, 8192)  # over the layer's data
    qemu_write(top, 0x22, 60 * MIB, MIB)
    return top


def guest_view(disk: Path, dest: Path) -> str:
    """The sha256 of what a guest reads from ``disk`` (its chain flattened)."""
    run("qemu-img", "convert", "-O", "raw", disk, dest)
    digest = hashlib.sha256(dest.read_bytes()).hexdigest()
    dest.unlink()
    return digest


def temp_dirs(folder: Path) -> list[str]:
    return [name for name in os.listdir(folder) if ".tmp" in name]


def signed(body: dict[str, Any]) -> bytes:
    body = {k: v for k, v in body.items() if k != "manifest_sha256"}
    canon = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    body["manifest_sha256"] = hashlib.sha256(canon).hexdigest()
    return json.dumps(body).encode()


async def test_an_image_disk_travels_with_its_whole_chain_and_points_at_the_fetched_files(
    tmp_path: Path,
) -> None:
    top = make_chain(tmp_path / "host-a")
    expected = guest_view(top, tmp_path / "flat.raw")
    assert chain_of(top) == [top, tmp_path / "host-a/layer.qcow2", tmp_path / "host-a/base.raw"]
    files = with_chain({"disk.qcow2": top})
    assert list(files) == ["disk.qcow2", "layer.qcow2", "base.raw"]
    store = LocalBlobStore(tmp_path / "store")
    manifest = await publish(store, files, IMAGE, meta={})
    assert [(f.name, f.role, f.backing) for f in manifest.files] == [
        ("disk.qcow2", "disk", "layer.qcow2"),
        ("layer.qcow2", "layer", "base.raw"),
        ("base.raw", "base", None),
    ]

    dest = tmp_path / "host-b" / "images" / "web" / "1" / "snapshot"
    await fetch(store, IMAGE, dest, cache=ObjectCache(tmp_path / "cache"), max_bytes=1 << 30)
    disk = dest / "disk.qcow2"
    assert backing_chain(disk) == [dest / "layer.qcow2", dest / "base.raw"]
    assert "No errors were found" in run("qemu-img", "check", disk)
    assert "identical" in run("qemu-img", "compare", top, disk)
    assert (dest / "base.raw").stat().st_blocks * 512 <= 5 * MIB  # the base stays sparse
    assert (dest / "base.raw").read_bytes() == (tmp_path / "host-a/base.raw").read_bytes()
    # Host A's files gone, host B's disk still reads the same: nothing points back at them.
    shutil.rmtree(tmp_path / "host-a")
    assert guest_view(disk, tmp_path / "flat.raw") == expected


async def test_a_qcow2_whose_backing_file_is_not_published_is_refused(tmp_path: Path) -> None:
    top = make_chain(tmp_path / "a")
    store = LocalBlobStore(tmp_path / "store")
    with pytest.raises(SnapshotError, match=r"backing file .*layer\.qcow2 is not among the files"):
        await publish(store, {"disk.qcow2": top}, IMAGE, meta={})
    assert not await store.exists(IMAGE)


async def test_a_suspended_overlay_travels_alone_over_the_image_disk_the_other_host_caches(
    tmp_path: Path,
) -> None:
    image_disk = make_chain(tmp_path / "host-a")
    overlay = tmp_path / "host-a" / "vm-disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", image_disk, "-F", "qcow2", overlay)
    qemu_write(overlay, 0x33, 10 * MIB, 2 * MIB)
    store = LocalBlobStore(tmp_path / "store")
    await publish(store, with_chain({"disk.qcow2": image_disk}), IMAGE, meta={})
    manifest = await publish(
        store, {"disk.qcow2": overlay}, SUSPEND, meta={"image": IMAGE},
        external={"image.disk.qcow2": image_disk},
    )  # fmt: skip
    assert manifest.external == ("image.disk.qcow2",)
    assert manifest.file("disk.qcow2").backing == "image.disk.qcow2"

    cache = ObjectCache(tmp_path / "cache")
    image_b = tmp_path / "host-b" / "image"
    await fetch(store, IMAGE, image_b, cache=cache, max_bytes=1 << 30)
    vm_b = tmp_path / "host-b" / "vm"
    with pytest.raises(SnapshotError, match="needs external files"):
        await fetch(store, SUSPEND, vm_b, cache=cache, max_bytes=1 << 30)
    await fetch(store, SUSPEND, vm_b, cache=cache, max_bytes=1 << 30,
                external={"image.disk.qcow2": image_b / "disk.qcow2"})  # fmt: skip
    assert backing_chain(vm_b / "disk.qcow2")[0] == image_b / "disk.qcow2"
    assert "identical" in run("qemu-img", "compare", overlay, vm_b / "disk.qcow2")


@pytest.mark.parametrize(
    ("role", "named_file_exists"), [("disk", True), ("disk", False), ("file", True)]
)
async def test_a_manifest_hiding_a_qcow2_backing_file_is_refused(
    tmp_path: Path, role: str, named_file_exists: bool
) -> None:
    """The overlay's header names host A's image disk; a manifest that says it has no
    backing file (so fetch would not rewrite the name) must not hand it over, whether or not
    the named file exists on this host."""
    image_disk = make_chain(tmp_path / "a")
    overlay = tmp_path / "a" / "vm.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", image_disk, "-F", "qcow2", overlay)
    store = LocalBlobStore(tmp_path / "store")
    await publish(store, {"disk.qcow2": overlay}, SUSPEND, meta={}, external={"x": image_disk})
    body = json.loads((tmp_path / "store" / SUSPEND).read_bytes())
    hostile = copy.deepcopy(body)
    hostile["external"] = []
    hostile["files"][0].update(backing=None, role=role)
    await store.put(SUSPEND, signed(hostile))
    if not named_file_exists:
        shutil.rmtree(tmp_path / "a")
    dest = tmp_path / "b"
    why = "names a backing file the manifest does not list" if role == "disk" else "is qcow2"
    with pytest.raises(SnapshotError, match=why):
        await fetch(store, SUSPEND, dest, cache=ObjectCache(tmp_path / "c"), max_bytes=1 << 30)
    assert not dest.exists()
    assert temp_dirs(tmp_path) == []


async def test_a_qcow2_with_an_external_data_file_is_neither_published_nor_fetched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = tmp_path / "disk.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", f"data_file={tmp_path / 'data.raw'}",
        disk, "64M")  # fmt: skip
    store = LocalBlobStore(tmp_path / "store")
    with pytest.raises(SnapshotError, match="external data file"):
        await publish(store, {"disk.qcow2": disk}, IMAGE, meta={})
    # A publisher without that check (an older or a hostile one): the fetcher refuses it too.
    with monkeypatch.context() as patched:
        patched.setattr(objects_publish, "has_external_data_file", lambda _path: False)
        await publish(store, {"disk.qcow2": disk}, IMAGE, meta={})
    with pytest.raises(SnapshotError, match="external data file"):
        await fetch(store, IMAGE, tmp_path / "b", cache=ObjectCache(tmp_path / "c"),
                    max_bytes=1 << 30)  # fmt: skip
    assert not (tmp_path / "b").exists()
