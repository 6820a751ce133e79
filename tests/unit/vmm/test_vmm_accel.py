import json
import os
from pathlib import Path

import pytest

from embervm.vmm import accel


@pytest.fixture
def fake_qemu(tmp_path: Path) -> str:
    """A stand-in ``qemu-system-x86_64`` that reports a version and hangs when run as a guest."""
    script = tmp_path / "qemu"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = --version ]; then echo "QEMU emulator version 9.1.3"; exit 0; fi\n'
        "exec sleep 60\n"
    )
    script.chmod(0o755)
    return str(script)


def test_probe_bios_puts_debug_exit_code_at_the_reset_vector() -> None:
    image = accel.probe_bios()
    assert len(image) == 65536
    assert image[0xFFF0:0xFFF4] == bytes([0xB0, 0x31, 0xE6, 0xF4])


async def test_no_kvm_device_means_tcg_without_probing(tmp_path: Path, fake_qemu: str) -> None:
    cache = tmp_path / "accel.json"
    result = await accel.detect_accelerator(
        cache, kvm_device=tmp_path / "kvm", binary=fake_qemu, kernel=Path("/k")
    )
    assert result == "tcg"
    assert json.loads(cache.read_text()) == {f"{os.uname().release}|qemu-9.1.3|kvm=False": "tcg"}


async def test_cached_answer_is_reused_per_host_key(tmp_path: Path, fake_qemu: str) -> None:
    cache = tmp_path / "accel.json"
    key = f"{os.uname().release}|qemu-9.1.3|kvm=False"
    cache.write_text(json.dumps({key: "kvm"}))
    assert await accel.detect_accelerator(
        cache, kvm_device=tmp_path / "kvm", binary=fake_qemu
    ) == "kvm"  # fmt: skip


@pytest.mark.timeout(30)
async def test_hanging_probe_guest_is_killed_at_the_timeout(fake_qemu: str) -> None:
    # The fake guest sleeps 60 s: only the probe's own timeout can end this test in time.
    ok = await accel.probe_accelerator("kvm", kernel=None, timeout=0.5, binary=fake_qemu)
    assert ok is False
