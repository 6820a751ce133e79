"""Opening a VM's tap from outside its namespace, so QEMU needs neither root nor the netns.

``TUNSETIFF`` finds the device by name in the *calling thread's* network namespace, so a
short-lived thread enters the VM's namespace (``setns(2)``), opens ``/dev/net/tun`` and attaches
to ``tap0``. The file descriptor then works from any namespace and any user: hand it to QEMU
(``pass_fds``) as ``-netdev tap,id=n0,fd=<fd>``. The thread ends after it restores its namespace,
so no pool thread is ever left in a VM's namespace.
"""

from __future__ import annotations

import asyncio
import ctypes
import fcntl
import os
import struct
import threading
from pathlib import Path

from embervm.errors import NetworkSetupError

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
CLONE_NEWNET = 0x40000000
OPEN_TIMEOUT = 5.0


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _open_in(netns_path: Path, tap: str, *, vnet_hdr: bool) -> int:
    """Runs in a dedicated thread: enter, open, leave."""
    own = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    target = os.open(netns_path, os.O_RDONLY)
    try:
        _setns(target)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
            try:
                flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
                fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", tap.encode(), flags))
            except OSError:
                os.close(fd)
                raise
        finally:
            _setns(own)
    finally:
        os.close(target)
        os.close(own)
    return fd


async def open_tap(netns_path: Path, tap: str = "tap0", *, vnet_hdr: bool = True) -> int:
    """An open file descriptor attached to ``tap`` in the namespace at ``netns_path``.

    The caller owns it: pass it to the VMM (it is close-on-exec, so list it in ``pass_fds``)
    and close the caller's copy once the VMM runs.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()

    def work() -> None:
        try:
            fd = _open_in(netns_path, tap, vnet_hdr=vnet_hdr)
        except OSError as exc:
            loop.call_soon_threadsafe(_settle, done, None, exc)
        else:
            loop.call_soon_threadsafe(_settle, done, fd, None)

    threading.Thread(target=work, name=f"open-tap-{netns_path.name}", daemon=True).start()
    try:
        return await asyncio.wait_for(asyncio.shield(done), OPEN_TIMEOUT)
    except TimeoutError as exc:
        done.cancel()  # a late descriptor is closed by _settle
        raise NetworkSetupError(
            f"opening {tap} in {netns_path} took over {OPEN_TIMEOUT} s"
        ) from exc
    except asyncio.CancelledError:
        done.cancel()
        raise
    except OSError as exc:
        raise NetworkSetupError(f"cannot open {tap} in {netns_path}: {exc}") from exc


def _settle(fut: asyncio.Future[int], fd: int | None, exc: OSError | None) -> None:
    if fut.cancelled():
        if fd is not None:
            os.close(fd)
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        assert fd is not None
        fut.set_result(fd)
