"""The last link of a VMM's launch chain: the view, the filter, then QEMU with the same pid.

``python -I -S -c STEP <plan> <argv…>`` (no site, no embervm import; 15 to 20 ms here, of which
the view takes ~3 ms):

1. when the plan names mounts (a jailed VMM, ``rootview``): a new mount namespace, private
   propagation, an empty tmpfs made the root with ``pivot_root``, each path bound in from the
   old root (read-only unless it is the VM's own directory, its RAM file or a device), the old
   root detached, and the new root remounted read-only;
2. ``NoNewPrivs`` and embervm's seccomp filter (``seccomp``; it refuses ``mount``,
   ``pivot_root`` and ``unshare``, so it comes after step 1);
3. ``execv`` of QEMU, whose path is looked up on ``PATH`` before step 1 (the interpreter's own
   library is out of the view afterwards, so nothing is imported after it).

Any failure prints ``embervm-jail: <what>: <error>`` on stderr and exits 126: QEMU never
starts half-jailed.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from embervm.vmm.rootview import Mount

STEP = """\
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
def ok(result, what):
    if result != 0:
        sys.stderr.write("embervm-jail: %s: %s\\n" % (what, os.strerror(ctypes.get_errno())))
        sys.exit(126)
RDONLY, NOSUID, NODEV, NOEXEC, REMOUNT, BIND, PRIVATE = 1, 2, 4, 8, 32, 4096, 1 << 18
REC, CLONE_NEWNS, MNT_DETACH, SYS_PIVOT_ROOT = 16384, 0x20000, 2, 155
plan = json.loads(sys.argv[1])
argv = sys.argv[2:]
exe = argv[0]
if "/" not in exe:
    found = [d + "/" + exe for d in os.environ.get("PATH", "").split(":") if d]
    found = [p for p in found if os.access(p, os.X_OK)]
    if not found:
        sys.stderr.write("embervm-jail: %s: not on PATH\\n" % exe)
        sys.exit(126)
    exe = found[0]
if plan["mounts"]:
    ok(libc.unshare(CLONE_NEWNS), "unshare")
    ok(libc.mount(None, b"/", None, REC | PRIVATE, None), "make / private")
    ok(libc.mount(b"tmpfs", b"/tmp", b"tmpfs", NOSUID | NODEV | NOEXEC, b"mode=0755,size=1m"),
       "mount tmpfs")
    os.mkdir("/tmp/.old", 0o700)
    ok(libc.syscall(SYS_PIVOT_ROOT, b"/tmp", b"/tmp/.old"), "pivot_root")
    os.chdir("/")
    for path, kind, source in plan["mounts"]:
        source = "/.old" + source
        parent = os.path.dirname(path)
        os.makedirs(parent, 0o755, exist_ok=True)
        if kind == "link":
            os.symlink(os.readlink(source), path)
            continue
        if os.path.isdir(source):
            os.mkdir(path, 0o755)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        ok(libc.mount(source.encode(), path.encode(), None, BIND, None), "bind " + path)
        flags = REMOUNT | BIND | NOSUID | (0 if kind == "dev" else NODEV)
        flags |= 0 if kind in ("rw", "dev") else RDONLY
        ok(libc.mount(None, path.encode(), None, flags, None), "remount " + path)
    ok(libc.umount2(b"/.old", MNT_DETACH), "detach the old root")
    os.rmdir("/.old")
    ok(libc.mount(None, b"/", None, REMOUNT | RDONLY | NOSUID | NODEV, None), "remount / read-only")
if plan["filter"]:
    prog = bytes.fromhex(plan["filter"])
    buf = ctypes.create_string_buffer(prog, len(prog))
    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
    fprog = Prog(len(prog) // 8, ctypes.cast(buf, ctypes.c_void_p))
    ok(libc.prctl(38, 1, 0, 0, 0), "no_new_privs")
    ok(libc.prctl(22, 2, ctypes.byref(fprog), 0, 0), "seccomp")
os.execv(exe, argv)
"""


def launch_prefix(
    *, seccomp_filter: bytes | None, mounts: Sequence[Mount] = (), python: str = sys.executable
) -> list[str]:
    """argv prefix that enters the view ``mounts`` (none: the host's), loads
    ``seccomp_filter`` (a ``struct sock_filter[]``; None: none) and execs the rest."""
    plan = {
        "mounts": [[m.path, m.kind, m.source or m.path] for m in mounts],
        "filter": seccomp_filter.hex() if seccomp_filter else "",
    }
    return [python, "-I", "-S", "-c", STEP, json.dumps(plan, separators=(",", ":"))]
