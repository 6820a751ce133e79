"""The second seccomp filter, loaded for real into child processes (no QEMU needed)."""

from __future__ import annotations

import subprocess
import sys

from embervm.vmm.launchstep import launch_prefix
from embervm.vmm.seccomp import DENIED_SYSCALLS, program

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


def test_the_filter_refuses_what_no_vmm_uses_with_eperm() -> None:
    bpf, perf, ptrace, io_uring = (
        DENIED_SYSCALLS[n] for n in ("bpf", "perf_event_open", "ptrace", "io_uring_setup")
    )
    assert probe(bpf, perf, ptrace, io_uring) == [1, 1, 1, 1]  # EPERM


def test_the_filter_lets_everything_else_through() -> None:
    getppid, getuid = 110, 102
    assert probe(getppid, getuid) == [0, 0]


def test_x32_numbers_are_refused_too() -> None:
    assert probe(0x40000000 + 39) == [1]  # x32 getpid


def test_every_denied_number_is_tested_once_and_the_program_fits_the_kernel() -> None:
    assert len(set(DENIED_SYSCALLS.values())) == len(DENIED_SYSCALLS)
    assert len(program()) // 8 == len(DENIED_SYSCALLS) + 7
    assert len(program()) // 8 <= 4096  # BPF_MAXINSNS
