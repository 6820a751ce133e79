"""Linux-specific guest operations: clock, RNG reseed, filesystem freeze. Syscalls live here.

All of these need CAP_SYS_ADMIN / CAP_SYS_TIME; the agent runs as root (PID 1) in the guest.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

# <linux/random.h>
RNDADDENTROPY = 0x40085203  # _IOW('R', 0x03, int[2])
RNDRESEEDCRNG = 0x5207  # _IO('R', 0x07)
# <linux/fs.h>
FIFREEZE = 0xC0045877  # _IOWR('X', 119, int)
FITHAW = 0xC0045878  # _IOWR('X', 120, int)

MAX_ENTROPY = 4096


def set_wall_clock(ns: int) -> None:
    """Set CLOCK_REALTIME; a restored clone otherwise lives at its snapshot's time."""
    time.clock_settime_ns(time.CLOCK_REALTIME, ns)


def reseed_rng(entropy: bytes, device: str = "/dev/urandom") -> bool:
    """Mix ``entropy`` into the kernel pool crediting it, then force a CRNG reseed.

    Returns True when the crediting ioctl worked; falls back to a plain (uncredited) write so
    the bytes are mixed in even without privileges. Clones of one snapshot diverge either way.
    """
    entropy = entropy[:MAX_ENTROPY]
    fd = os.open(device, os.O_WRONLY)
    try:
        credited = True
        try:
            req = struct.pack("ii", len(entropy) * 8, len(entropy)) + entropy
            fcntl.ioctl(fd, RNDADDENTROPY, req)
        except OSError:
            credited = False
            os.write(fd, entropy)
        try:
            fcntl.ioctl(fd, RNDRESEEDCRNG)
        except OSError:
            credited = False
        return credited
    finally:
        os.close(fd)


def freeze(path: str) -> None:
    """FIFREEZE the filesystem holding ``path`` (after a sync); raises OSError on failure."""
    os.sync()
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FIFREEZE, 0)
    finally:
        os.close(fd)


def thaw(path: str) -> bool:
    """FITHAW; False if it was not frozen (EINVAL), True if it thawed."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, FITHAW, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def kernel_release() -> str:
    return os.uname().release


def uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return time.monotonic()


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return ""


def meminfo() -> dict[str, int]:
    """MemTotal/MemAvailable in KiB."""
    out: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("MemTotal", "MemAvailable"):
                    out[key] = int(rest.split()[0])
    except (OSError, ValueError, IndexError):
        pass
    return out
