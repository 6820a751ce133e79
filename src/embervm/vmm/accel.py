"""Which accelerator this host can really use: KVM only when a probe guest proves it.

``/dev/kvm`` opening is not enough: on the development machines it belongs to a paravirtual
nested hypervisor that runs trivial real-mode code but hangs Linux guests. So the probe has two
bounded stages, each run under a hard timeout and killed when it expires:

1. a 64 KiB real-mode "BIOS" that writes to ``isa-debug-exit`` (QEMU exits with code 99);
2. the guest kernel booted with no root: it must reach its "VFS: Unable to mount root" panic
   and reboot (``panic=-1`` + ``-no-reboot`` makes QEMU exit 0) within the timeout.

Stage 2 needs a kernel; without one KVM cannot be proven and the answer is ``tcg`` (not
cached). The result is cached in ``cache_file`` per host key: host kernel release, QEMU
version and whether ``/dev/kvm`` exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import tempfile
from pathlib import Path
from typing import Literal

from embervm.fileio import atomic_write
from embervm.vmm.cmdline import QEMU_BINARY
from embervm.vmm.qemu import qemu_version

Accelerator = Literal["kvm", "tcg"]
KVM_DEVICE = Path("/dev/kvm")
_DEBUG_EXIT_CODE = 99  # (0x31 << 1) | 1


def probe_bios() -> bytes:
    """64 KiB of ``hlt`` with, at the reset vector: ``mov al,0x31; out 0xf4,al; hlt``."""
    image = bytearray(b"\xf4" * 65536)
    code = bytes([0xB0, 0x31, 0xE6, 0xF4, 0xF4, 0xEB, 0xFD])
    image[0xFFF0 : 0xFFF0 + len(code)] = code
    return bytes(image)


def host_key(kvm_device: Path = KVM_DEVICE, binary: str = QEMU_BINARY) -> str:
    return f"{platform.release()}|qemu-{qemu_version(binary)}|kvm={kvm_device.exists()}"


def kvm_opens(kvm_device: Path = KVM_DEVICE) -> bool:
    try:
        fd = os.open(kvm_device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


async def _run_bounded(argv: list[str], timeout: float) -> int | None:  # noqa: ASYNC109
    """Run ``argv``; its exit code, or None when it outlived ``timeout`` (then it is killed)."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        return None
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 5)


async def probe_accelerator(
    accel: Accelerator,
    *,
    kernel: Path | None,
    timeout: float,  # noqa: ASYNC109
    binary: str = QEMU_BINARY,
) -> bool:
    """True when a probe guest runs to completion under ``accel`` within ``timeout``."""
    base = [binary, "-nodefaults", "-no-user-config", "-nographic", "-display", "none",
            "-no-reboot", "-accel", accel, "-cpu", "max", "-m", "64M"]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="embervm-accel-") as tmp:
        bios = Path(tmp) / "probe.bin"
        bios.write_bytes(probe_bios())
        stage1 = [*base, "-M", "microvm,pit=off,pic=off,rtc=off,isa-serial=off",
                  "-bios", str(bios), "-device", "isa-debug-exit,iobase=0xf4,iosize=1"]  # fmt: skip
        if await _run_bounded(stage1, timeout) != _DEBUG_EXIT_CODE:
            return False
        if kernel is None:
            return False
        console = Path(tmp) / "console.log"
        stage2 = [*base, "-M", "microvm", "-kernel", str(kernel),
                  "-append", "console=ttyS0 panic=-1 loglevel=3 quiet",
                  "-serial", f"file:{console}"]  # fmt: skip
        if await _run_bounded(stage2, timeout) != 0:
            return False
        return "Kernel panic" in console.read_text(errors="replace")


async def detect_accelerator(
    cache_file: Path,
    *,
    timeout: float = 10,  # noqa: ASYNC109
    kernel: Path | None = None,
    kvm_device: Path = KVM_DEVICE,
    binary: str = QEMU_BINARY,
) -> Accelerator:
    """``"kvm"`` when ``kvm_device`` opens and both probe stages pass, else ``"tcg"``.

    Never hangs: each stage is killed after ``timeout`` seconds. Cached per host key.
    """
    key = await asyncio.to_thread(host_key, kvm_device, binary)
    cache = await asyncio.to_thread(_read_cache, cache_file)
    if cache.get(key) in ("kvm", "tcg"):
        return "kvm" if cache[key] == "kvm" else "tcg"
    result: Accelerator = "tcg"
    if await asyncio.to_thread(kvm_opens, kvm_device):
        if kernel is None:
            return "tcg"  # unproven; do not cache
        ok = await probe_accelerator("kvm", kernel=kernel, timeout=timeout, binary=binary)
        result = "kvm" if ok else "tcg"
    cache[key] = result
    await asyncio.to_thread(_write_cache, cache_file, cache)
    return result


def _read_cache(cache_file: Path) -> dict[str, str]:
    with contextlib.suppress(OSError, ValueError):
        loaded = json.loads(cache_file.read_text())
        if isinstance(loaded, dict):
            return {str(k): str(v) for k, v in loaded.items()}
    return {}


def _write_cache(cache_file: Path, cache: dict[str, str]) -> None:
    with contextlib.suppress(OSError):
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache_file, json.dumps(cache, indent=1, sort_keys=True))
