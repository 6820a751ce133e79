"""The second seccomp filter, loaded for real into child processes (no QEMU needed)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from embervm.vmm.launchstep import launch_prefix
from embervm.vmm.seccomp import ALLOWED_SYSCALLS, HOT_SYSCALLS, program

# Calls a syscall by number and prints its errno (0: it ran).
PROBE = """\
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
for nr in map(int, sys.argv[1:]):
    ctypes.set_errno(0)
    libc.syscall(nr, 0, 0, 0, 0, 0)
    print(ctypes.get_errno())
"""


def probe(*numbers: int) -> list[int]:
    prefix = launch_prefix(seccomp_filter=program())
    argv = [*prefix, sys.executable, "-I", "-S", "-c", PROBE, *map(str, numbers)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True)
    return [int(x) for x in done.stdout.split()]


# x86-64 numbers of calls no VMM makes: bpf, perf_event_open, ptrace, io_uring_setup,
# userfaultfd, keyctl, splice, kill, mkdir, unshare.
REFUSED = {"bpf": 321, "perf_event_open": 298, "ptrace": 101, "io_uring_setup": 425,
           "userfaultfd": 323, "keyctl": 250, "splice": 275, "kill": 62, "mkdir": 83,
           "unshare": 272}  # fmt: skip
UNISTD = Path("/usr/include/x86_64-linux-gnu/asm/unistd_64.h")


def test_the_filter_refuses_what_is_not_on_its_list_with_eperm() -> None:
    assert not set(REFUSED) & set(ALLOWED_SYSCALLS)
    assert probe(*REFUSED.values()) == [1] * len(REFUSED)  # EPERM


def test_the_filter_lets_the_listed_calls_through() -> None:
    getppid, getuid = ALLOWED_SYSCALLS["getppid"], ALLOWED_SYSCALLS["getuid"]
    assert probe(getppid, getuid) == [0, 0]


def test_x32_numbers_are_refused_too() -> None:
    assert probe(0x40000000 + 39) == [1]  # x32 getpid


@pytest.mark.skipif(not UNISTD.exists(), reason="no kernel headers here")
def test_the_numbers_are_the_kernel_s() -> None:
    text = UNISTD.read_text()
    kernel = {m[1]: int(m[2]) for m in re.finditer(r"#define __NR_(\w+) (\d+)", text)}
    assert {name: kernel[name] for name in ALLOWED_SYSCALLS} == ALLOWED_SYSCALLS
    assert {name: kernel[name] for name in REFUSED} == REFUSED


def test_every_allowed_number_is_tested_once_and_the_program_fits_the_kernel() -> None:
    assert len(set(ALLOWED_SYSCALLS.values())) == len(ALLOWED_SYSCALLS)
    assert set(HOT_SYSCALLS) <= set(ALLOWED_SYSCALLS)
    assert len(program()) // 8 == len(ALLOWED_SYSCALLS) + 7
    assert len(ALLOWED_SYSCALLS) < 255  # a BPF jump reaches 255 instructions at most
