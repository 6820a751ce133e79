"""Guest artifacts: the kernel, the initramfs and the ``debian12`` base disk, cached by hash.

Each artifact is a directory ``<artifacts_dir>/<kind>-<key>/`` whose key hashes every input of
its recipe (kernel package version, busybox bytes, init script, agent source, rootfs recipe, host
CA bundle...), so it is rebuilt exactly when an input changes (the Debian mirror a disk is
fetched from is not an input: see ``_rootfs``). Builds run in a private temporary
directory under a file lock and are published with an atomic rename (see ``_cache``).

The agent is shipped on the initramfs, not on the base disk: editing the agent rebuilds a 3 MiB
archive in about a second and leaves the base disk (and every image built on it) untouched.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from embervm.errors import ArtifactError
from embervm.guest import _initramfs, _kernel, _rootfs
from embervm.guest._cache import cached_dir, hash_inputs
from embervm.guest.mirrors import resolve_mirrors

#: Bump when a recipe changes in a way its inputs do not capture.
KERNEL_RECIPE = "kernel-v1"
INITRAMFS_RECIPE = "initramfs-v1"

_KERNEL_LOCK_TIMEOUT = 900.0
_DISK_LOCK_TIMEOUT = 1800.0


@dataclass(frozen=True)
class BootArtifacts:
    """What a VMM needs to boot: kernel, initramfs and the kernel release string."""

    kernel: Path
    initrd: Path
    kernel_release: str


@dataclass(frozen=True)
class GuestArtifacts:
    """Everything a VM boots from; ``base_disk`` is read-only, VMs use qcow2 overlays on it."""

    kernel: Path
    initrd: Path
    base_disk: Path
    kernel_release: str


def _noop(_: str) -> None:
    return None


def _newest_cached(artifacts_dir: Path, kind: str) -> Path | None:
    """The most recently built ``kind`` artifact (offline fallback when apt cannot answer)."""
    found = [p for p in artifacts_dir.glob(f"{kind}-*") if p.is_dir()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


async def ensure_kernel(
    artifacts_dir: Path, *, progress: Callable[[str], None] | None = None
) -> tuple[Path, str]:
    """The cached kernel directory (``vmlinuz``, ``release``, ``modules/``) and its release."""
    report = progress or _noop
    try:
        await asyncio.to_thread(artifacts_dir.mkdir, parents=True, exist_ok=True)
        pkg = await _kernel.resolve_kernel_package(artifacts_dir / "kernel-resolution.json")
    except ArtifactError as exc:
        cached = await asyncio.to_thread(_newest_cached, artifacts_dir, "kernel")
        if cached is None:
            raise
        report(f"using cached kernel {cached.name}: {exc}")
        return cached, (cached / "release").read_text().strip()
    key = hash_inputs([KERNEL_RECIPE, pkg.name, pkg.version, *_kernel.WANTED_MODULES])

    async def build(tmp: Path) -> None:
        await _kernel.fetch_kernel(pkg, tmp, report)

    kdir = await cached_dir(artifacts_dir, "kernel", key, build, lock_timeout=_KERNEL_LOCK_TIMEOUT)
    return kdir, (kdir / "release").read_text().strip()


async def ensure_boot_artifacts(
    artifacts_dir: Path, *, progress: Callable[[str], None] | None = None
) -> BootArtifacts:
    """Kernel and initramfs only (seconds, no root filesystem build)."""
    report = progress or _noop
    kdir, release = await ensure_kernel(artifacts_dir, progress=report)
    if not _initramfs.BUSYBOX.is_file():
        raise ArtifactError(f"{_initramfs.BUSYBOX} missing: install busybox-static")
    parts: list[bytes | str] = [INITRAMFS_RECIPE, kdir.name, _initramfs.INIT_SCRIPT,
                                str(sys.implementation.cache_tag), sys.version]  # fmt: skip
    parts.append(hashlib.sha256(_initramfs.BUSYBOX.read_bytes()).hexdigest())
    for rel, data in _initramfs.agent_files():
        parts += [rel, data]
    key = hash_inputs(parts)

    async def build(tmp: Path) -> None:
        report("building initramfs")
        (tmp / "initrd.cpio").write_bytes(_initramfs.build_initramfs(kdir / "modules"))

    idir = await cached_dir(
        artifacts_dir, "initramfs", key, build, lock_timeout=_KERNEL_LOCK_TIMEOUT
    )
    return BootArtifacts(
        kernel=kdir / "vmlinuz", initrd=idir / "initrd.cpio", kernel_release=release
    )


async def ensure_base_disk(
    artifacts_dir: Path,
    *,
    progress: Callable[[str], None] | None = None,
    debian_mirror: str | None = None,
    debian_security_mirror: str | None = None,
) -> Path:
    """The ``debian12`` base disk (raw sparse ext4, 8 GiB), built once per recipe.

    A build fetches packages from the given mirrors, else the host's own (``mirrors``); the
    mirror is not part of the key (see ``_rootfs``), so it is only looked up for a build.
    """
    report = progress or _noop
    recipe = _rootfs.RootfsRecipe.debian12()
    key = hash_inputs(recipe.hash_parts())

    async def build(tmp: Path) -> None:
        if os.geteuid() != 0:
            raise ArtifactError(
                "building the base disk runs mmdebstrap --mode=root and needs root; "
                "run once as root (or copy a built artifacts/ directory)"
            )
        mirrors = await asyncio.to_thread(resolve_mirrors, debian_mirror, debian_security_mirror)
        await _rootfs.build_rootfs(recipe, tmp / "rootfs.raw", report, mirrors)

    ddir = await cached_dir(
        artifacts_dir, "disk-debian12", key, build, lock_timeout=_DISK_LOCK_TIMEOUT
    )
    return ddir / "rootfs.raw"


async def ensure_guest_artifacts(
    artifacts_dir: Path,
    *,
    progress: Callable[[str], None] | None = None,
    debian_mirror: str | None = None,
    debian_security_mirror: str | None = None,
) -> GuestArtifacts:
    """Kernel, initramfs and base disk, building whatever is missing or stale (the Debian
    mirrors: see ``ensure_base_disk``)."""
    boot = await ensure_boot_artifacts(artifacts_dir, progress=progress)
    disk = await ensure_base_disk(
        artifacts_dir,
        progress=progress,
        debian_mirror=debian_mirror,
        debian_security_mirror=debian_security_mirror,
    )
    return GuestArtifacts(
        kernel=boot.kernel, initrd=boot.initrd, base_disk=disk, kernel_release=boot.kernel_release
    )


def host_tsc_khz(
    *,
    sysfs: Path = Path("/sys/devices/system/cpu/cpu0/tsc_freq_khz"),
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> int | None:
    """The host TSC frequency in kHz, or None when it cannot be known.

    Prefers the exact sysfs value; falls back to the first ``cpu MHz`` of ``/proc/cpuinfo`` when
    the CPU has an invariant TSC (``constant_tsc``), because then that figure is the TSC rate.
    """
    try:
        return int(sysfs.read_text().strip())
    except (OSError, ValueError):
        pass
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    flags: set[str] = set()
    mhz: float | None = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = set(value.split())
        elif key == "cpu MHz" and mhz is None:
            try:
                mhz = float(value)
            except ValueError:
                return None
    if mhz is None or mhz <= 0 or "tsc" not in flags or "constant_tsc" not in flags:
        return None
    return round(mhz * 1000)


def kernel_cmdline(*, guest_ip: str, gateway: str, prefix: int, tsc_khz: int | None) -> str:
    """The tuned kernel command line (docs/GUEST_PROTOCOL.md): quiet, fast, free of the PIT hang.

    ``tsc_early_khz`` is what lets the VMM run ``microvm,pit=off,pic=off`` without hanging;
    when ``tsc_khz`` is None it is left out and the VMM must keep the PIT on.
    """
    params = [
        "console=ttyS0",
        "quiet",
        "loglevel=1",
        "panic=-1",
        "reboot=k",
        "mitigations=off",
        "nokaslr",
        "init_on_alloc=0",
        "cryptomgr.notests",
        "random.trust_cpu=on",
        "i8042.noaux",
        "i8042.nomux",
        "i8042.nopnp",
        "i8042.dumbkbd",
        "8250.nr_uarts=1",
        "audit=0",
        "apparmor=0",
        "rcupdate.rcu_expedited=1",
    ]
    if tsc_khz is not None:
        if tsc_khz <= 0:
            raise ArtifactError(f"bad TSC frequency {tsc_khz} kHz")
        params.append(f"tsc_early_khz={tsc_khz}")
    params += ["vmroot=ext4", f"vmip={guest_ip}/{prefix}", f"vmgw={gateway}"]
    return " ".join(params)
