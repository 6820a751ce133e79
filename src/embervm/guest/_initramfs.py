"""The project's initramfs: static busybox, a few virtio modules, the guest agent, ``/init``.

``/init`` (busybox sh) loads the modules, waits for ``/dev/vda``, mounts it as the root, brings
up ``eth0`` from the ``vmip=``/``vmgw=`` kernel parameters, copies the agent into a tmpfs at
``/run/embervm`` and ``switch_root``s into ``python3 -m embervm_agent`` as PID 1 (no shell and no
dynamically linked tool run in the guest before the agent; its timings: docs/GUEST_PROTOCOL.md).

The agent ships here rather than on the base disk so that changing it rebuilds a 3 MiB archive
in well under a second instead of a multi-minute root filesystem.
"""

from __future__ import annotations

import py_compile
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

from embervm.guest import _cpio as cpio

BUSYBOX = Path("/bin/busybox")
AGENT_SRC = Path(__file__).resolve().parent / "agent"
#: Where the agent package lives inside the guest (a tmpfs, so the disk stays pristine).
GUEST_AGENT_DIR = "/run/embervm/lib"
GUEST_AGENT_MODULE = "embervm_agent"

INIT_SCRIPT = r"""#!/bin/busybox sh
# Embervm initramfs /init. Failures print one line on the console and power off.
/bin/busybox --install -s /bin
export PATH=/bin
fail() { echo "embervm-init: $*" >/dev/console; sync; poweroff -f; sleep 5; exit 1; }
debug=
# With vmdebug=1 on the kernel command line, print guest uptime at each step (boot profiling).
mark() {
  [ -n "$debug" ] || return 0
  u=/proc/uptime; [ -r "$u" ] || u=/newroot/proc/uptime
  read -r up _ <"$u"
  echo "embervm-init: $up $*" >/dev/console
}
mount -t devtmpfs -o mode=0755 devtmpfs /dev || fail "devtmpfs"
mount -t proc proc /proc || fail "proc"
mount -t sysfs sysfs /sys || fail "sysfs"
ip=10.0.2.15/24; gw=10.0.2.2; rootfs=ext4
read -r cmdline </proc/cmdline
for p in $cmdline; do
  case "$p" in
    vmip=*) ip="${p#vmip=}" ;;
    vmgw=*) gw="${p#vmgw=}" ;;
    vmroot=*) rootfs="${p#vmroot=}" ;;
    vmdebug=1) debug=1 ;;
  esac
done
mark "init started"
while read -r m; do insmod "/lib/modules/$m" || fail "insmod $m"; done </lib/modules/order
mark "modules loaded"
n=0
while [ ! -b /dev/vda ]; do
  # virtio-blk probes synchronously in insmod: if vda is not there soon, it never will be.
  n=$((n + 1)); [ "$n" -gt 300 ] && fail "no /dev/vda after 3 s"; usleep 10000
done
mount -t "$rootfs" -o rw,noatime /dev/vda /newroot || fail "mount /dev/vda ($rootfs)"
mark "root mounted"
ip link set lo up
[ -r /newroot/etc/hostname ] && hostname "$(cat /newroot/etc/hostname)"
if [ -e /sys/class/net/eth0 ]; then
  ip link set eth0 up && ip addr add "$ip" dev eth0 && ip route add default via "$gw" \
    || echo "embervm-init: eth0 setup failed" >/dev/console
fi
for d in dev proc sys run tmp; do [ -d "/newroot/$d" ] || mkdir -p "/newroot/$d"; done
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /newroot/run || fail "run tmpfs"
mkdir -p /newroot/run/embervm /newroot/run/lock
cp -a /embervm/lib /newroot/run/embervm/lib || fail "copy agent"
mount --move /dev /newroot/dev || fail "move dev"
mount --move /proc /newroot/proc || fail "move proc"
mount --move /sys /newroot/sys || fail "move sys"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,gid=5,mode=620,ptmxmode=666 devpts /newroot/dev/pts || fail "devpts"
ln -sf pts/ptmx /newroot/dev/ptmx 2>/dev/null
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /newroot/dev/shm
export PYTHONPATH=/run/embervm/lib PYTHONDONTWRITEBYTECODE=1 HOME=/root
mark "switch_root"
exec switch_root /newroot /usr/bin/python3 -u -m embervm_agent
fail "switch_root"
"""


def agent_files() -> Iterator[tuple[str, bytes]]:
    """(relative path, content) of every agent source file, in a stable order."""
    for path in sorted(AGENT_SRC.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        yield path.relative_to(AGENT_SRC).as_posix(), path.read_bytes()


def compiled_agent_files() -> Iterator[tuple[str, bytes]]:
    """Bytecode of the agent for this host's Python, as ``__pycache__/<mod>.<tag>.pyc``.

    Compiling the agent costs about 0.2 s of a TCG boot. The files are unchecked-hash pycs
    (valid whatever the mtimes in the guest); a guest whose Python has another cache tag simply
    ignores them and compiles the sources in memory.
    """
    tag = sys.implementation.cache_tag
    if tag is None:
        return
    with tempfile.TemporaryDirectory(prefix="embervm-pyc-") as tmp:
        for rel, data in agent_files():
            src = Path(tmp) / "src.py"
            src.write_bytes(data)
            out = Path(tmp) / "out.pyc"
            py_compile.compile(
                str(src), cfile=str(out), dfile=f"{GUEST_AGENT_DIR}/{GUEST_AGENT_MODULE}/{rel}",
                doraise=True, invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
            )  # fmt: skip
            parent, _, name = rel.rpartition("/")
            stem = name.removesuffix(".py")
            prefix = f"{parent}/" if parent else ""
            yield f"{prefix}__pycache__/{stem}.{tag}.pyc", out.read_bytes()


def build_initramfs(modules_dir: Path) -> bytes:
    """The newc archive for the kernel whose modules (and ``order``) sit in ``modules_dir``."""
    order = modules_dir.joinpath("order").read_text().split()
    entries = [
        cpio.directory(d)
        for d in (
            "bin",
            "dev",
            "proc",
            "sys",
            "newroot",
            "lib",
            "lib/modules",
            "embervm",
            "embervm/lib",
            f"embervm/lib/{GUEST_AGENT_MODULE}",
        )
    ]
    entries += [
        cpio.chardev("dev/console", 5, 1),
        cpio.chardev("dev/null", 1, 3, 0o666),
        cpio.regular("bin/busybox", BUSYBOX.read_bytes(), 0o755),
        cpio.symlink("bin/sh", "busybox"),
        cpio.regular("init", INIT_SCRIPT.encode(), 0o755),
        cpio.regular("lib/modules/order", ("\n".join(order) + "\n").encode()),
    ]
    entries += [cpio.regular(f"lib/modules/{m}", (modules_dir / m).read_bytes()) for m in order]
    dirs: set[str] = set()
    for rel, data in [*agent_files(), *compiled_agent_files()]:
        parent = rel.rpartition("/")[0]
        if parent and parent not in dirs:
            dirs.add(parent)
            entries.append(cpio.directory(f"embervm/lib/{GUEST_AGENT_MODULE}/{parent}"))
        entries.append(cpio.regular(f"embervm/lib/{GUEST_AGENT_MODULE}/{rel}", data))
    return cpio.build_newc(entries)
