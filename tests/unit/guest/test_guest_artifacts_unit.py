"""Pure pieces of the artifact builders: dependency resolution, cpio, cache, CA diff, cmdline."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from embervm.errors import ArtifactError
from embervm.guest import _cpio as cpio
from embervm.guest._cache import cached_dir, hash_inputs
from embervm.guest._initramfs import INIT_SCRIPT
from embervm.guest._kernel import load_order, parse_meta_depends, parse_modules_dep
from embervm.guest._rootfs import extra_certificates
from embervm.guest.artifacts import host_tsc_khz, kernel_cmdline

MODULES_DEP = """\
d/v/virtio.ko: d/v/virtio_ring.ko
d/v/virtio_ring.ko:
d/v/virtio_mmio.ko: d/v/virtio.ko d/v/virtio_ring.ko
d/n/virtio_net.ko: d/n/net_failover.ko n/c/failover.ko d/v/virtio.ko d/v/virtio_ring.ko
d/n/net_failover.ko: n/c/failover.ko
n/c/failover.ko:
d/h/virtio-rng.ko: d/v/virtio.ko d/v/virtio_ring.ko
"""


def test_meta_depends_names_the_versioned_image() -> None:
    pkg = parse_meta_depends(" linux-image-6.1.0-56-cloud-amd64 (= 6.1.192-2)")
    assert (pkg.name, pkg.version) == ("linux-image-6.1.0-56-cloud-amd64", "6.1.192-2")


def test_meta_depends_without_image_is_an_error() -> None:
    with pytest.raises(ArtifactError):
        parse_meta_depends("libc6 (>= 2.36)")


def test_load_order_puts_dependencies_first() -> None:
    order = load_order(parse_modules_dep(MODULES_DEP), ("virtio_mmio", "virtio_net", "virtio_rng"))
    names = [p.rsplit("/", 1)[-1] for p in order]
    assert names == [
        "virtio_ring.ko",
        "virtio.ko",
        "virtio_mmio.ko",
        "failover.ko",
        "net_failover.ko",
        "virtio_net.ko",
        "virtio-rng.ko",
    ]


def test_load_order_of_unknown_module_is_an_error() -> None:
    with pytest.raises(ArtifactError, match="no module"):
        load_order(parse_modules_dep(MODULES_DEP), ("virtio_blk",))


def test_newc_archive_is_readable_by_cpio(tmp_path: Path) -> None:
    data = cpio.build_newc(
        [
            cpio.directory("bin"),
            cpio.regular("bin/hello", b"hi there", 0o755),
            cpio.symlink("bin/sh", "hello"),
            cpio.chardev("console", 5, 1),
        ]
    )
    listing = subprocess.run(["cpio", "-itv"], input=data, capture_output=True, check=True)
    lines = listing.stdout.decode().splitlines()
    assert [ln.split()[-1] for ln in lines[:2]] == ["bin", "bin/hello"]
    assert lines[1].startswith("-rwxr-xr-x")
    assert lines[2].endswith("bin/sh -> hello")
    assert lines[3].startswith("crw-------")
    assert len(data) % 4 == 0


def test_init_script_is_valid_shell(tmp_path: Path) -> None:
    script = tmp_path / "init"
    script.write_text(INIT_SCRIPT)
    subprocess.run(["sh", "-n", str(script)], check=True)


def test_hash_inputs_separates_parts() -> None:
    assert hash_inputs(["ab", "c"]) != hash_inputs(["a", "bc"])
    assert hash_inputs(["x"]) == hash_inputs([b"x"])


async def test_concurrent_builders_build_once(tmp_path: Path) -> None:
    calls = 0

    async def build(d: Path) -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        (d / "out").write_text("done")

    dirs = await asyncio.gather(
        *(cached_dir(tmp_path, "k", "key", build, lock_timeout=10) for _ in range(4))
    )
    assert calls == 1
    assert len(set(dirs)) == 1
    assert (dirs[0] / "out").read_text() == "done"


async def test_failed_build_leaves_no_artifact(tmp_path: Path) -> None:
    async def build(d: Path) -> None:
        (d / "half").write_text("x")
        raise ArtifactError("boom")

    with pytest.raises(ArtifactError):
        await cached_dir(tmp_path, "k", "key", build, lock_timeout=10)
    assert [n for n in os.listdir(tmp_path) if not n.startswith(".k-")] == []


CERT_A = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
CERT_B = b"-----BEGIN CERTIFICATE-----\nBBBB\n-----END CERTIFICATE-----\n"


def test_extra_certificates_are_those_the_guest_lacks() -> None:
    assert extra_certificates(CERT_A + CERT_B + CERT_B, CERT_A) == [CERT_B]
    assert extra_certificates(CERT_A, CERT_A) == []


def test_tsc_prefers_sysfs(tmp_path: Path) -> None:
    (tmp_path / "tsc").write_text("2596119\n")
    assert host_tsc_khz(sysfs=tmp_path / "tsc", cpuinfo=tmp_path / "none") == 2596119


def test_tsc_falls_back_to_cpuinfo_with_invariant_tsc(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu tsc constant_tsc\ncpu MHz\t\t: 2599.998\n")
    assert host_tsc_khz(sysfs=tmp_path / "x", cpuinfo=tmp_path / "cpuinfo") == 2599998


def test_tsc_unknown_without_invariant_tsc(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("flags\t\t: fpu tsc\ncpu MHz\t\t: 2599.998\n")
    assert host_tsc_khz(sysfs=tmp_path / "x", cpuinfo=tmp_path / "cpuinfo") is None


def test_cmdline_carries_network_and_tsc() -> None:
    line = kernel_cmdline(guest_ip="10.0.2.15", gateway="10.0.2.2", prefix=24, tsc_khz=2596119)
    params = line.split()
    assert "tsc_early_khz=2596119" in params
    assert "vmip=10.0.2.15/24" in params
    assert "vmgw=10.0.2.2" in params
    assert "quiet" in params


def test_cmdline_without_tsc_omits_it() -> None:
    line = kernel_cmdline(guest_ip="10.0.2.15", gateway="10.0.2.2", prefix=24, tsc_khz=None)
    assert "tsc_early_khz" not in line
