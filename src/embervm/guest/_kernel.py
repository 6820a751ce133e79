"""Fetch the Debian cloud kernel without root: resolve, ``apt-get download``, ``dpkg-deb -x``.

``linux-image-cloud-amd64`` is a meta package; its ``Depends`` names the real, versioned image
(``linux-image-6.1.0-NN-cloud-amd64 (= V)``). We resolve that from the local apt lists (no
network), download exactly that version, unpack it into a temporary directory, run ``depmod -b``
there and keep only ``vmlinuz`` plus the modules the initramfs loads, in load order.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from embervm.errors import ArtifactError
from embervm.fileio import atomic_write
from embervm.guest._host_tools import run_tool

META_PACKAGE = "linux-image-cloud-amd64"

#: Modules the initramfs loads (with their dependencies, resolved through ``modules.dep``).
#: ext4 is built into the cloud kernel; virtio-mmio devices are found through ACPI (LNRO0005).
WANTED_MODULES = ("virtio_mmio", "virtio_blk", "virtio_console", "virtio_net", "virtio_rng")

_DEP_RE = re.compile(r"^(linux-image-[0-9][^\s(]*)\s*\(=\s*([^)\s]+)\)")


@dataclass(frozen=True)
class KernelPackage:
    """The versioned kernel package the meta package currently points at."""

    name: str
    version: str


def parse_meta_depends(depends: str) -> KernelPackage:
    """Pick the versioned ``linux-image-*`` out of the meta package's Depends field."""
    for alt in depends.split(","):
        m = _DEP_RE.match(alt.strip())
        if m:
            return KernelPackage(m.group(1), m.group(2))
    raise ArtifactError(f"{META_PACKAGE} depends on no versioned linux-image: {depends!r}")


APT_LISTS = Path("/var/lib/apt/lists")


def _lists_fingerprint(lists: Path) -> str:
    """Changes whenever ``apt-get update`` changes what apt knows."""
    parts = []
    for entry in sorted(os.scandir(lists), key=lambda e: e.name):
        if entry.is_file():
            st = entry.stat()
            parts.append(f"{entry.name}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


async def resolve_kernel_package(memo: Path | None = None) -> KernelPackage:
    """The kernel the meta package's candidate depends on, per the local apt lists.

    ``apt-cache`` parses every list (about a second here, with no pkgcache.bin), so the answer
    is memoised in ``memo`` next to a fingerprint of the lists and reused until they change.
    """
    try:
        fingerprint = await asyncio.to_thread(_lists_fingerprint, APT_LISTS)
    except OSError:
        fingerprint = ""
    if memo is not None and fingerprint:
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            saved = json.loads(await asyncio.to_thread(memo.read_text))
            if saved["lists"] == fingerprint:
                return KernelPackage(str(saved["name"]), str(saved["version"]))
    pkg = await _ask_apt_cache()
    if memo is not None and fingerprint:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(
                _write_atomic,
                memo,
                json.dumps({"lists": fingerprint, "name": pkg.name, "version": pkg.version}),
            )
    return pkg


def _write_atomic(path: Path, text: str) -> None:
    atomic_write(path, text)


async def _ask_apt_cache() -> KernelPackage:
    out = await run_tool(["apt-cache", "show", "--no-all-versions", META_PACKAGE], time_limit=60)
    for line in out.decode(errors="replace").splitlines():
        if line.startswith("Depends:"):
            return parse_meta_depends(line.split(":", 1)[1])
    raise ArtifactError(f"apt-cache knows no {META_PACKAGE}; run apt-get update")


def parse_modules_dep(text: str) -> dict[str, list[str]]:
    """``modules.dep`` as {module name: [dependency paths]} keyed by name without ``.ko``."""
    deps: dict[str, list[str]] = {}
    for line in text.splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_mod_name(path)] = [path, *rest.split()]
    return deps


def _mod_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def load_order(deps: dict[str, list[str]], wanted: tuple[str, ...]) -> list[str]:
    """Module paths to ``insmod`` so that every module's dependencies come before it."""
    order: list[str] = []
    seen: set[str] = set()

    def visit(name: str, stack: tuple[str, ...]) -> None:
        if name in seen:
            return
        if name in stack:
            raise ArtifactError(f"module dependency cycle: {' -> '.join((*stack, name))}")
        if name not in deps:
            raise ArtifactError(f"kernel has no module {name}")
        path, *requires = deps[name]
        for dep in requires:
            visit(_mod_name(dep), (*stack, name))
        seen.add(name)
        order.append(path)

    for name in wanted:
        visit(name, ())
    return order


async def fetch_kernel(pkg: KernelPackage, dest: Path, progress: Callable[[str], None]) -> str:
    """Fill ``dest`` with ``vmlinuz``, ``release``, ``modules/*.ko`` and ``modules/order``.

    Returns the kernel release (``6.1.0-NN-cloud-amd64``).
    """
    with tempfile.TemporaryDirectory(prefix="embervm-kernel-") as work_s:
        work = Path(work_s)
        progress(f"downloading {pkg.name}={pkg.version}")
        await run_tool(
            ["apt-get", "download", f"{pkg.name}={pkg.version}"], cwd=work, time_limit=600
        )
        deb = _single_deb(work)
        tree = work / "x"
        progress("unpacking kernel package")
        await run_tool(["dpkg-deb", "-x", str(deb), str(tree)], time_limit=300)
        release = _single_release(tree)
        await run_tool(["depmod", "-b", str(tree), release], time_limit=120)
        await asyncio.to_thread(_keep_needed, tree, release, dest)
        return release


def _single_deb(work: Path) -> Path:
    debs = list(work.glob("*.deb"))
    if len(debs) != 1:
        raise ArtifactError(f"apt-get download produced {len(debs)} .deb files")
    return debs[0]


def _single_release(tree: Path) -> str:
    releases = sorted(p.name for p in (tree / "lib" / "modules").iterdir())
    if len(releases) != 1:
        raise ArtifactError(f"kernel package holds {len(releases)} module trees")
    return releases[0]


def _keep_needed(tree: Path, release: str, dest: Path) -> None:
    """Copy vmlinuz, config, release and the wanted modules (in load order) into ``dest``."""
    moddir = tree / "lib" / "modules" / release
    deps = parse_modules_dep((moddir / "modules.dep").read_text())
    order = load_order(deps, WANTED_MODULES)
    (dest / "modules").mkdir()
    for rel in order:
        shutil.copy2(moddir / rel, dest / "modules" / rel.rsplit("/", 1)[-1])
    (dest / "modules" / "order").write_text("".join(rel.rsplit("/", 1)[-1] + "\n" for rel in order))
    shutil.copy2(tree / "boot" / f"vmlinuz-{release}", dest / "vmlinuz")
    shutil.copy2(tree / "boot" / f"config-{release}", dest / "config")
    (dest / "release").write_text(release + "\n")
