"""The jailed VMM's view of the host: which files it names, and the launch step that builds the
mount namespace for real (root only; a shell stands in for QEMU)."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from embervm.errors import VmmError
from embervm.vmm import VmConfig, create_overlay
from embervm.vmm.cmdline import MemorySpec
from embervm.vmm.launchstep import launch_prefix
from embervm.vmm.rootview import Mount, backing_chain, vmm_view

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="mount namespaces need root")


def chain(tmp_path: Path) -> tuple[Path, Path, Path]:
    base = tmp_path / "images" / "base.raw"
    base.parent.mkdir()
    base.write_bytes(b"\0" * 65536)
    middle = create_overlay(base, tmp_path / "images" / "layer.qcow2", "raw")
    (tmp_path / "vm").mkdir()
    top = create_overlay(middle, tmp_path / "vm" / "disk.qcow2", "qcow2")
    return base, middle, top


def vm_config(tmp_path: Path, disk: Path, **kw: object) -> VmConfig:
    kernel, initrd = tmp_path / "vmlinuz", tmp_path / "initrd"
    kernel.write_bytes(b"k")
    initrd.write_bytes(b"i")
    return VmConfig.for_workdir(
        "vm-1", disk.parent, memory_mib=16, vcpus=1, kernel=kernel, initrd=initrd,
        cmdline="console=ttyS0", **kw,
    )  # fmt: skip


def test_the_backing_chain_is_read_from_the_qcow2_headers(tmp_path: Path) -> None:
    base, middle, top = chain(tmp_path)
    assert backing_chain(top) == [middle, base]
    assert backing_chain(base) == []


def test_a_relative_backing_name_is_relative_to_its_file_and_a_bad_header_is_refused(
    tmp_path: Path,
) -> None:
    base, _, top = chain(tmp_path)
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", "../images/layer.qcow2",
                    str(top)], check=True)  # fmt: skip
    assert backing_chain(top) == [tmp_path / "vm" / "../images/layer.qcow2", base]
    with open(top, "r+b") as f:  # a backing name longer than QEMU accepts
        f.seek(16)
        f.write(struct.pack(">I", 5000))
    with pytest.raises(VmmError, match="5000 bytes"):
        backing_chain(top)


def test_a_backing_chain_that_loops_is_refused(tmp_path: Path) -> None:
    _, middle, top = chain(tmp_path)
    subprocess.run(["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str(top), str(middle)],
                   check=True)  # fmt: skip
    with pytest.raises(VmmError, match="deeper than"):
        backing_chain(top)


def test_the_view_holds_the_system_the_vm_files_and_nothing_of_other_vms(tmp_path: Path) -> None:
    base, middle, top = chain(tmp_path)
    ram = tmp_path / "images" / "memory"
    ram.write_bytes(b"")
    cfg = vm_config(tmp_path, top, tap="tap0")
    view = {m.path: m.kind for m in vmm_view(cfg, MemorySpec(ram, share=False), "true")}
    assert view["/usr"] == "ro"
    assert view[str(cfg.workdir)] == "rw"
    assert view[str(base)] == view[str(middle)] == "ro"
    assert view[str(cfg.kernel)] == view[str(cfg.initrd)] == "ro"
    assert view[str(ram)] == "rw"  # QEMU 7.2 opens it read-write (docs/JAIL.md)
    assert view["/dev/net/tun"] == "dev"
    assert "/dev/kvm" not in view  # TCG
    assert str(top) not in view  # inside the VM's own directory
    assert not any(p.startswith(("/etc/shadow", "/root", "/proc", "/home")) for p in view)
    assert not any(p.startswith(f"{tmp_path}/vm/") for p in view)


def test_a_socket_outside_the_vm_directory_is_refused(tmp_path: Path) -> None:
    _, _, top = chain(tmp_path)
    cfg = vm_config(tmp_path, top).with_changes(qmp_socket=tmp_path / "qmp.sock")
    with pytest.raises(VmmError, match="outside the VM's directory"):
        vmm_view(cfg, MemorySpec(None), "true")


@needs_root
def test_the_launch_step_shows_the_child_only_its_view(tmp_path: Path) -> None:
    own = tmp_path / "vm"
    own.mkdir()
    (own / "mine").write_text("mine")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "theirs").write_text("theirs")
    shown = tmp_path / "kernel"
    shown.write_text("kernel")
    # Named through an absolute symbolic link, as the server's artifacts often are.
    linked = tmp_path / "artifacts"
    linked.symlink_to(tmp_path)
    view = [
        Mount.of("/usr", "ro"), *(Mount.of(p, "link") for p in ("/bin", "/lib", "/lib64")),
        Mount.of("/etc/ld.so.cache", "ro"), Mount.of("/dev/null", "dev"),
        Mount.of(own, "rw"), Mount.of(linked / "kernel", "ro"),
    ]  # fmt: skip
    script = (
        f'echo "root: $(ls -A / | tr "\\n" " ")"; echo "tmp: $(ls -A {tmp_path} | tr "\\n" " ")"; '
        f'echo "read: $(cat {own}/mine {linked}/kernel)"; echo w > {own}/written; '
        f"(echo x > {linked}/kernel) 2>/dev/null || echo kernel read-only; "
        "touch /new 2>/dev/null || echo root read-only; "
        "ls /proc/self >/dev/null 2>&1 || echo no proc"
    )
    argv = [*launch_prefix(seccomp_filter=None, mounts=view, python=sys.executable),
            "sh", "-c", script]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    assert done.stdout.splitlines() == [
        f"root: bin dev etc lib lib64 {tmp_path.parts[1]} usr ",
        "tmp: artifacts vm ",  # another VM's directory is not there at all
        "read: minekernel",
        "kernel read-only",
        "root read-only",
        "no proc",
    ]
    assert (own / "written").read_text() == "w\n"  # the VM's own directory is the host's
    assert shown.read_text() == "kernel"
    # The host's mounts did not change.
    assert str(tmp_path) not in Path("/proc/self/mountinfo").read_text()


@needs_root
def test_the_launch_step_fails_closed_when_a_path_is_missing(tmp_path: Path) -> None:
    view = [Mount.of("/usr", "ro"), Mount.of(tmp_path / "absent", "ro")]
    argv = [*launch_prefix(seccomp_filter=None, mounts=view), "/usr/bin/true"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode != 0
