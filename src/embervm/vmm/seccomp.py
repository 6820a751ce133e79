"""A second seccomp filter under QEMU's own: kernel interfaces no VMM uses, refused.

QEMU's ``-sandbox on`` is a deny-list of what QEMU's authors chose; an escaped QEMU still
reaches much of the kernel's attack surface through calls it never makes itself (eBPF,
perf events, io_uring, userfaultfd, keyrings, the new mount API, module loading, ptrace). This
filter refuses those with EPERM, refuses every non-x86-64 system call (the 32-bit ``int 0x80``
entry and x32 numbers are classic ways around a filter written for one table) and allows the
rest, which QEMU's own filter then judges: the stricter verdict wins.

The launch chain's last step (``launchstep``) loads it right before it ``exec``s QEMU, which
inherits it (a filter, once loaded, cannot be removed): after ``ip netns exec`` and the jail's
mount namespace, which need ``setns``, ``unshare``, ``mount`` and ``pivot_root``.
"""

from __future__ import annotations

import struct

#: x86-64 numbers of the calls refused (``asm/unistd_64.h``).
DENIED_SYSCALLS: dict[str, int] = {
    "ptrace": 101, "syslog": 103, "uselib": 134, "personality": 135, "vhangup": 153,
    "pivot_root": 155, "adjtimex": 159, "acct": 163, "settimeofday": 164, "mount": 165,
    "umount2": 166, "swapon": 167, "swapoff": 168, "reboot": 169, "sethostname": 170,
    "setdomainname": 171, "iopl": 172, "ioperm": 173, "init_module": 175,
    "delete_module": 176, "quotactl": 179, "lookup_dcookie": 212, "clock_settime": 227,
    "kexec_load": 246, "add_key": 248, "request_key": 249, "keyctl": 250, "unshare": 272,
    "perf_event_open": 298, "fanotify_init": 300, "name_to_handle_at": 303,
    "open_by_handle_at": 304, "clock_adjtime": 305, "setns": 308, "process_vm_readv": 310,
    "process_vm_writev": 311, "finit_module": 313, "kexec_file_load": 320, "bpf": 321,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "open_tree": 428, "move_mount": 429, "fsopen": 430,
    "fsconfig": 431, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
}  # fmt: skip

_AUDIT_ARCH_X86_64 = 0xC000003E
_X32_SYSCALL_BIT = 0x40000000
_RET_KILL_PROCESS = 0x80000000
_RET_ERRNO_EPERM = 0x00050000 | 1
_RET_ALLOW = 0x7FFF0000
# BPF opcodes: ld [k] (word, absolute), jeq #k, jge #k, ret #k.
_LD_ABS = 0x20
_JEQ = 0x15
_JGE = 0x35
_RET = 0x06
_NR, _ARCH = 0, 4  # offsets in struct seccomp_data


def _insn(code: int, k: int, jt: int = 0, jf: int = 0) -> bytes:
    return struct.pack("=HBBI", code, jt, jf, k)


def program() -> bytes:
    """The filter as ``struct sock_filter[]`` (8 bytes an instruction)."""
    numbers = sorted(DENIED_SYSCALLS.values())
    body = [
        _insn(_LD_ABS, _ARCH),
        _insn(_JEQ, _AUDIT_ARCH_X86_64, jt=1),
        _insn(_RET, _RET_KILL_PROCESS),
        _insn(_LD_ABS, _NR),
        _insn(_JGE, _X32_SYSCALL_BIT, jt=len(numbers) + 1),  # x32: to the EPERM at the end
    ]
    # Each denied number jumps to the EPERM two instructions past the last test.
    for i, nr in enumerate(numbers):
        body.append(_insn(_JEQ, nr, jt=len(numbers) - i))
    body += [_insn(_RET, _RET_ALLOW), _insn(_RET, _RET_ERRNO_EPERM)]
    return b"".join(body)
