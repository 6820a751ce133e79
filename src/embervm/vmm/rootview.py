"""What a jailed VMM sees of the host's files: a mount namespace of its own.

QEMU starts as root and opens its files before it drops to its own uid and chroots into the
VM's directory (docs/JAIL.md). Until that drop it would see the whole host: other VMs'
directories, the server's keys and credentials, every user's files. The launch step
(``launchstep``) therefore gives it a mount namespace whose root is an empty, read-only
tmpfs with only what this list names bound in, at the same paths as on the host (QEMU's
command line and the server's sockets keep their names):

- the system QEMU runs from, read-only: ``/usr``, the merged-``/usr`` links (``/bin``,
  ``/lib``, ``/lib64``, ``/sbin``) and the dynamic loader's cache;
- a few devices: ``/dev/null``, ``zero``, ``urandom``, ``random``, ``/dev/net/tun`` when the
  VM has a tap, ``/dev/kvm`` under KVM;
- this VM's files: its directory (read-write: QEMU makes its sockets there and, later, chroots
  into it), the kernel and initrd, every file of its disk's backing chain (read-only) and the
  RAM file it maps.

Nothing is bound recursively: a mount below a bound directory stays out of the view.
"""

from __future__ import annotations

import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from embervm.errors import VmmError
from embervm.vmm.cmdline import MemorySpec
from embervm.vmm.config import VmConfig

MountKind = Literal["ro", "rw", "dev", "link"]
"""``ro``/``rw``: a bind mount, read-only or not (never devices, never setuid); ``dev``: a
device node, read-write; ``link``: a symbolic link made again with the host's target."""

SYSTEM_DIRS = ("/usr",)
SYSTEM_LINKS = ("/bin", "/lib", "/lib32", "/lib64", "/libx32", "/sbin")
SYSTEM_FILES = ("/etc/ld.so.cache",)
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random")
TUN_DEVICE = "/dev/net/tun"
KVM_DEVICE = "/dev/kvm"

#: A chain deeper than this is refused (QEMU's own limit on backing chains is near it).
MAX_BACKING_DEPTH = 64
#: QEMU refuses backing file names longer than this (``block/qcow2.c``).
MAX_BACKING_NAME = 1023
_QCOW2_MAGIC = b"QFI\xfb"


@dataclass(frozen=True)
class Mount:
    """``path`` as QEMU names it, bound from the host's ``source`` (the same path with every
    symbolic link resolved: the old root's absolute links point nowhere inside the view)."""

    path: str
    kind: MountKind
    source: str = ""

    @classmethod
    def of(cls, path: Path | str, kind: MountKind) -> Mount:
        return cls(str(path), kind, str(path) if kind == "link" else os.path.realpath(path))


def backing_chain(disk: Path) -> list[Path]:
    """The files below ``disk`` in its qcow2 backing chain, nearest first, read from the
    qcow2 headers (``qemu-img`` would take ~20 ms a call). A relative name is relative to the
    directory of the file that names it, as in QEMU; a raw file ends the chain."""
    chain: list[Path] = []
    current = disk
    for _ in range(MAX_BACKING_DEPTH):
        try:
            with open(current, "rb") as f:
                head = f.read(20)
                if len(head) < 20 or head[:4] != _QCOW2_MAGIC:
                    return chain  # raw (or not qcow2): nothing below it
                offset, size = struct.unpack(">QI", head[8:20])
                if offset == 0 or size == 0:
                    return chain
                if size > MAX_BACKING_NAME:
                    raise VmmError(f"backing file name of {current} is {size} bytes long")
                f.seek(offset)
                name = os.fsdecode(f.read(size))
        except OSError as exc:
            raise VmmError(f"cannot read the backing chain of {disk}: {exc}") from exc
        current = Path(name) if os.path.isabs(name) else current.parent / name
        chain.append(current)
    raise VmmError(f"backing chain of {disk} is deeper than {MAX_BACKING_DEPTH}")


def _system() -> list[Mount]:
    mounts = [Mount.of(d, "ro") for d in SYSTEM_DIRS]
    for path in SYSTEM_LINKS:
        if os.path.islink(path):
            mounts.append(Mount.of(path, "link"))
        elif os.path.isdir(path):  # a host without merged /usr
            mounts.append(Mount.of(path, "ro"))
    mounts += [Mount.of(f, "ro") for f in SYSTEM_FILES if os.path.isfile(f)]
    return mounts


def _outside(path: Path, roots: list[str]) -> bool:
    resolved = os.path.realpath(path)
    return not any(resolved == r or resolved.startswith(r.rstrip("/") + "/") for r in roots)


def base_view(workdir: Path, binary: str, *, tap: bool = False, kvm: bool = False) -> list[Mount]:
    """The system, the devices and the VM's own directory ``workdir``: what every jailed
    QEMU sees. ``binary`` is QEMU (a name on ``PATH`` or a path); bound read-only when it
    lives outside ``/usr``."""
    mounts = _system()
    devices = [*DEVICES]
    if tap:
        devices.append(TUN_DEVICE)
    if kvm:
        devices.append(KVM_DEVICE)
    mounts += [Mount.of(d, "dev") for d in devices]
    exe = shutil.which(binary)
    if exe is None:
        raise VmmError(f"{binary} is not on PATH")
    if _outside(Path(exe), list(SYSTEM_DIRS)):
        mounts.append(Mount.of(os.path.realpath(exe), "ro"))
    mounts.append(Mount.of(workdir, "rw"))
    return mounts


def vmm_view(cfg: VmConfig, memory: MemorySpec, binary: str) -> tuple[Mount, ...]:
    """Everything a jailed QEMU for ``cfg`` may see, for the launch step."""
    mounts = base_view(cfg.workdir, binary, tap=cfg.tap is not None, kvm=cfg.accel == "kvm")
    own = str(cfg.workdir)
    for sock in (cfg.qmp_socket, cfg.agent_socket):
        if _outside(sock, [own]):
            raise VmmError(f"{sock} is outside the VM's directory {own}")
    files = [cfg.kernel, cfg.initrd, *backing_chain(cfg.disk)]
    mounts += [Mount.of(f, "ro") for f in files if _outside(f, [own])]
    # QEMU 7.2 opens a memory-backend-file read-write even when it maps it copy-on-write
    # (``readonly=on`` there also maps the guest's RAM read-only), so the image's RAM file is
    # bound writable; docs/JAIL.md says what guards it.
    if memory.path is not None and _outside(memory.path, [own]):
        mounts.append(Mount.of(memory.path, "rw"))
    return tuple(mounts)
