"""``QemuVmm`` spawning against a fake QEMU (a shell script): what a failed start tells its
caller, what a flood of console and stderr output leaves on disk, and the modes of the files
a VM is made of. The real QEMU versions of these are in tests/integration/vmm/."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from embervm.errors import VmmError
from embervm.vmm import QemuVmm, VmConfig, create_overlay
from embervm.vmm.logcap import HEAD_BYTES, cap_bytes

SECRET = "/srv/secret-data-dir/vms/0123abcd/disk.qcow2"
FLOOD = 3_000_000

# Writes FLOOD bytes to whatever the console is (the -serial file: or -chardev file path, or
# the descriptor of fd set 2 when that path is /dev/fdset/2), floods stderr, and fails the
# way QEMU does: one line naming a host path.
FAKE_QEMU = f"""#!/bin/sh
for a; do case "$a" in
  file:*) console="${{a#file:}}";;
  file,id=console,path=*) console="${{a#file,id=console,path=}}"
                          console="${{console%,append=on}}";;
  fd=*,set=2) fd="${{a#fd=}}"; serial="/proc/self/fd/${{fd%,set=2}}";;
esac; done
[ "$console" = /dev/fdset/2 ] && console="$serial"
head -c {FLOOD} /dev/zero | tr '\\0' A > "$console"
head -c {FLOOD} /dev/zero | tr '\\0' B >&2
echo "qemu-system-x86_64: -drive file={SECRET}: Could not open" >&2
exit 1
"""


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def fake_qemu(tmp_path: Path) -> QemuVmm:
    binary = tmp_path / "fake-qemu"
    binary.write_text(FAKE_QEMU)
    binary.chmod(0o755)
    return QemuVmm(binary=str(binary), start_timeout=30)


def vm_config(tmp_path: Path) -> VmConfig:
    workdir = tmp_path / "vm"
    workdir.mkdir()
    base = tmp_path / "base.raw"
    base.write_bytes(b"\0" * 65536)
    cfg = VmConfig.for_workdir(
        "vm-1", workdir, memory_mib=16, vcpus=1, kernel=Path("/k"), initrd=Path("/i"),
        cmdline="console=ttyS0", sandbox=False,  # a shell stands in for QEMU: it must wait4
    )  # fmt: skip
    create_overlay(base, cfg.disk, "raw")
    return cfg


async def test_a_failed_start_gives_a_fixed_reason_and_logs_qemus_words(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = vm_config(tmp_path)
    with caplog.at_level(logging.WARNING, logger="embervm.vmm"), pytest.raises(VmmError) as err:
        await fake_qemu(tmp_path).boot(cfg)
    assert SECRET not in str(err.value)
    assert str(tmp_path) not in str(err.value)
    assert str(err.value) == "the VMM of vm-1 did not start (details in the server log)"
    assert SECRET in caplog.text  # the operator still sees why


async def test_console_and_stderr_floods_leave_bounded_logs(tmp_path: Path) -> None:
    cfg = vm_config(tmp_path)
    with pytest.raises(VmmError):
        await fake_qemu(tmp_path).boot(cfg)
    console = cfg.console_log.read_bytes()
    assert len(console) <= cap_bytes()
    assert console.startswith(b"A" * HEAD_BYTES)  # the boot is kept
    assert b"bytes dropped]" in console
    stderr = (cfg.workdir / "qemu.stderr").read_bytes()
    assert len(stderr) <= cap_bytes()
    assert stderr.rstrip().endswith(b"Could not open")  # and so is how it ended


async def test_vm_files_are_the_owners_alone_whatever_the_umask(
    tmp_path: Path, open_umask: None
) -> None:
    cfg = vm_config(tmp_path)
    with pytest.raises(VmmError):
        await fake_qemu(tmp_path).boot(cfg)
    for path in (cfg.disk, cfg.memory_file, cfg.console_log, cfg.workdir / "qemu.stderr"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
