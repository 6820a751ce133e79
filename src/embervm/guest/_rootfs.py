"""The ``debian12`` base disk: mmdebstrap → customise → ``mkfs.ext4 -d`` into a sparse raw file.

Decisions (and why):
- ext4 *with* its journal: a VM killed mid-write (crash, OOM kill, a build VM stopped early)
  leaves an overlay that still mounts cleanly, and the init never has to run e2fsck. The journal
  costs nothing measurable on an idle guest; its 64 MiB are zeros in a sparse file.
- ``assume_storage_prezeroed``: the file is freshly truncated, so mke2fs skips zeroing inode
  tables and marks them initialised; otherwise every VM's kernel would run ``ext4lazyinit`` and
  write megabytes of zeros into its own copy-on-write overlay.
- The host CA bundle's extra certificates (e.g. a TLS-intercepting proxy) are added through
  ``/usr/local/share/ca-certificates`` + ``update-ca-certificates``, so they survive later
  ``update-ca-certificates`` runs inside images.
- DNS is the gateway ``10.0.2.2`` (the per-VM resolver); apt lists are removed like in Docker's
  images (a Dockerfile runs ``apt-get update`` first).
- Packages come from the Debian mirror the host uses (``mirrors.resolve_mirrors``), but the
  cache key names the archive by its canonical address (deb.debian.org), not by the mirror: a
  mirror is a copy of the same archive, so it changes where the packages are fetched from, not
  which packages are installed. Hosts (and a fleet's hosts) with different mirrors share a key,
  and a host on deb.debian.org keeps the key it had before mirrors were configurable. What is
  not named by the key: the guest's ``/etc/apt/sources.list`` lists the mirror the disk was
  built from, and changing the mirror does not rebuild a disk already cached.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from embervm.errors import ArtifactError
from embervm.guest._host_tools import run_tool
from embervm.guest.mirrors import CANONICAL, DebianMirrors

DISK_SIZE = 8 * 1024**3
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
GUEST_HOSTNAME = "embervm"
GUEST_DNS = "10.0.2.2"
ROOTFS_RECIPE = "rootfs-v1"

_PEM_RE = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.+?-----END CERTIFICATE-----", re.DOTALL)


@dataclass(frozen=True)
class RootfsRecipe:
    """Every input of a base disk; its hash names the cached artifact."""

    suite: str
    packages: tuple[str, ...]
    size: int
    host_ca: bytes = field(repr=False)

    @classmethod
    def debian12(cls) -> RootfsRecipe:
        try:
            host_ca = HOST_CA_BUNDLE.read_bytes()
        except OSError:
            host_ca = b""
        return cls(
            suite="bookworm",
            packages=(
                "python3",
                "python3-venv",
                "python3-pip",
                "ca-certificates",
                "curl",
                "iproute2",
                "procps",
                "util-linux",
                "iputils-ping",
                "less",
                "netbase",
            ),
            size=DISK_SIZE,
            host_ca=host_ca,
        )

    def sources(self, mirrors: DebianMirrors = CANONICAL) -> tuple[str, ...]:
        """The apt ``deb`` lines of this suite at ``mirrors``."""
        return mirrors.sources(self.suite)

    def hash_parts(self) -> list[bytes | str]:
        # The canonical sources, whatever mirror builds the disk (see the module docstring).
        return [
            ROOTFS_RECIPE,
            self.suite,
            *self.packages,
            *self.sources(CANONICAL),
            str(self.size),
            hashlib.sha256(self.host_ca).hexdigest(),
            _CUSTOMISE_VERSION,
        ]


_CUSTOMISE_VERSION = "customise-v1"


def extra_certificates(host_bundle: bytes, guest_bundle: bytes) -> list[bytes]:
    """PEM certificates the host trusts that the guest's bundle lacks, in host order."""
    have = {_norm(m) for m in _PEM_RE.findall(guest_bundle)}
    extra: list[bytes] = []
    for pem in _PEM_RE.findall(host_bundle):
        n = _norm(pem)
        if n not in have:
            have.add(n)
            extra.append(n + b"\n")
    return extra


def _norm(pem: bytes) -> bytes:
    return b"\n".join(line.strip() for line in pem.strip().splitlines())


async def build_rootfs(
    recipe: RootfsRecipe,
    dest: Path,
    progress: Callable[[str], None],
    mirrors: DebianMirrors = CANONICAL,
) -> None:
    """Build the tree in a temp dir next to ``dest`` (packages from ``mirrors``) and pack it
    into the raw image ``dest``."""
    with tempfile.TemporaryDirectory(prefix=".rootfs-", dir=dest.parent) as tmp_s:
        tree = Path(tmp_s) / "tree"
        started = time.monotonic()
        progress(
            f"mmdebstrap {recipe.suite} (minbase + {len(recipe.packages)} packages) from "
            f"{mirrors.archive} and {mirrors.security} ({mirrors.origin})"
        )
        await run_tool(
            [
                "mmdebstrap",
                "--quiet",
                "--variant=minbase",
                "--mode=root",
                "--format=directory",
                f"--include={','.join(recipe.packages)}",
                "--dpkgopt=path-exclude=/usr/share/man/*",
                "--dpkgopt=path-exclude=/usr/share/doc/*",
                "--dpkgopt=path-include=/usr/share/doc/*/copyright",
                "--dpkgopt=path-exclude=/usr/share/locale/*",
                "--dpkgopt=path-exclude=/usr/share/info/*",
                recipe.suite,
                str(tree),
                *recipe.sources(mirrors),
            ],
            time_limit=1200,
        )
        progress(f"mmdebstrap done in {time.monotonic() - started:.1f} s")
        await customise(tree, recipe)
        progress("mkfs.ext4")
        await asyncio.to_thread(_sparse_file, dest, recipe.size)
        await run_tool(
            [
                "mkfs.ext4",
                "-q",
                "-F",
                "-L",
                "embervm-root",
                "-m",
                "0",
                "-E",
                "assume_storage_prezeroed=1",
                "-d",
                str(tree),
                str(dest),
            ],
            time_limit=600,
        )
        progress(f"base disk built in {time.monotonic() - started:.1f} s")


def _sparse_file(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


async def customise(tree: Path, recipe: RootfsRecipe) -> None:
    """Network identity, DNS and trust store of every guest."""
    if not (tree / "usr/bin/python3").exists():
        raise ArtifactError("rootfs has no /usr/bin/python3")
    etc = tree / "etc"
    (etc / "resolv.conf").unlink(missing_ok=True)
    (etc / "resolv.conf").write_text(f"nameserver {GUEST_DNS}\n")
    (etc / "hostname").write_text(GUEST_HOSTNAME + "\n")
    (etc / "hosts").write_text(
        "127.0.0.1\tlocalhost\n127.0.1.1\t" + GUEST_HOSTNAME + "\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    (etc / "fstab").write_text("# root is mounted by the Embervm initramfs\n")
    (etc / "machine-id").write_text("")
    guest_bundle = (etc / "ssl/certs/ca-certificates.crt").read_bytes()
    extra = extra_certificates(recipe.host_ca, guest_bundle)
    if extra:
        local = tree / "usr/local/share/ca-certificates/embervm-host"
        local.mkdir(parents=True, exist_ok=True)
        for i, pem in enumerate(extra):
            (local / f"host-{i:03d}.crt").write_bytes(pem)
        await run_tool(["chroot", str(tree), "update-ca-certificates"], time_limit=300)
    for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (tree / leftover).glob("*"):
            if p.is_file():
                p.unlink()
            elif p.is_dir() and p.name != "partial":
                shutil.rmtree(p)
