"""Embervm's seccomp filter under QEMU's own: an allow-list of the system calls a VMM makes.

QEMU's ``-sandbox on`` is a deny-list of what QEMU's authors chose; an escaped QEMU would still
reach much of the kernel through calls QEMU never makes itself (eBPF, perf events, io_uring,
userfaultfd, keyrings, the mount API, module loading, ptrace, …). This filter allows only the
calls below and answers every other one with EPERM; any call that is not x86-64 (the 32-bit
``int 0x80`` table) kills the process and x32 numbers get EPERM (both are classic ways around a
filter written for one table). QEMU's own filter then judges what this one allows: the stricter
verdict wins.

The list is what QEMU 7.2 was seen calling under TCG (``strace -f -c`` over a boot, a
migration to a file and a restore, then every VMM test of the suite run under this filter),
plus what its KVM code and other C libraries call for the same jobs (``ioctl`` carries KVM
itself; ``rt_sigtimedwait``, ``signalfd4``, ``eventfd2``, ``epoll_*`` and the legacy
spellings of allowed calls). A call outside it fails with EPERM rather than killing QEMU: a
QEMU build that needs one more call fails to start (``embervm doctor`` and the VMM tests show
it), it does not crash a running guest. ``execve`` is allowed because the filter is loaded
before QEMU is executed; QEMU's ``spawn=deny`` refuses every later one.

The launch chain's last step (``launchstep``) loads it right before it ``exec``s QEMU, which
inherits it (a filter, once loaded, cannot be removed): after ``ip netns exec`` and the jail's
mount namespace, which need ``setns``, ``unshare``, ``mount`` and ``pivot_root``.
"""

from __future__ import annotations

import struct

#: x86-64 numbers (``asm/unistd_64.h``) of the calls allowed, by what QEMU uses them for.
ALLOWED_SYSCALLS: dict[str, int] = {
    # memory
    "mmap": 9, "mprotect": 10, "munmap": 11, "brk": 12, "mremap": 25, "msync": 26,
    "mincore": 27, "madvise": 28, "mbind": 237, "set_mempolicy": 238, "get_mempolicy": 239,
    "memfd_create": 319,
    # files and descriptors
    "read": 0, "write": 1, "open": 2, "close": 3, "stat": 4, "fstat": 5, "lstat": 6, "lseek": 8,
    "pread64": 17, "pwrite64": 18, "readv": 19, "writev": 20, "access": 21, "pipe": 22,
    "dup": 32, "dup2": 33, "fcntl": 72, "fsync": 74, "fdatasync": 75, "ftruncate": 77,
    "getcwd": 79, "chdir": 80, "fchdir": 81, "unlink": 87, "readlink": 89, "umask": 95,
    "statfs": 137, "fstatfs": 138, "getdents64": 217, "fadvise64": 221, "openat": 257,
    "newfstatat": 262, "unlinkat": 263, "readlinkat": 267, "faccessat": 269, "fallocate": 285,
    "dup3": 292, "pipe2": 293, "preadv": 295, "pwritev": 296, "preadv2": 327, "pwritev2": 328,
    "statx": 332, "faccessat2": 439,
    # waiting and events
    "poll": 7, "sched_yield": 24, "nanosleep": 35, "futex": 202, "epoll_create": 213,
    "clock_nanosleep": 230, "epoll_wait": 232, "epoll_ctl": 233, "ppoll": 271,
    "epoll_pwait": 281, "signalfd": 282, "eventfd": 284, "signalfd4": 289, "eventfd2": 290,
    "epoll_create1": 291, "epoll_pwait2": 441,
    # sockets
    "socket": 41, "connect": 42, "accept": 43, "sendto": 44, "recvfrom": 45, "sendmsg": 46,
    "recvmsg": 47, "shutdown": 48, "bind": 49, "listen": 50, "getsockname": 51,
    "getpeername": 52, "socketpair": 53, "setsockopt": 54, "getsockopt": 55, "accept4": 288,
    # devices
    "ioctl": 16,
    # signals
    "rt_sigaction": 13, "rt_sigprocmask": 14, "rt_sigreturn": 15, "rt_sigpending": 127,
    "rt_sigtimedwait": 128, "rt_sigsuspend": 130, "sigaltstack": 131, "tkill": 200,
    "restart_syscall": 219, "tgkill": 234,
    # threads and the process
    "getpid": 39, "clone": 56, "execve": 59, "exit": 60, "uname": 63, "gettimeofday": 96,
    "getrlimit": 97, "getrusage": 98, "sysinfo": 99, "times": 100, "getppid": 110, "prctl": 157,
    "arch_prctl": 158, "gettid": 186, "time": 201, "sched_getaffinity": 204,
    "set_tid_address": 218, "clock_gettime": 228, "clock_getres": 229, "exit_group": 231,
    "set_robust_list": 273, "prlimit64": 302, "getcpu": 309, "seccomp": 317, "getrandom": 318,
    "membarrier": 324, "rseq": 334, "clone3": 435,
    # the privilege drop
    "getuid": 102, "getgid": 104, "setuid": 105, "setgid": 106, "geteuid": 107, "getegid": 108,
    "setreuid": 113, "setregid": 114, "getgroups": 115, "setgroups": 116, "setresuid": 117,
    "getresuid": 118, "setresgid": 119, "getresgid": 120, "chroot": 161,
}  # fmt: skip

#: Tested first: the calls a running VMM makes most (TCG and KVM vCPU threads, the main loop).
HOT_SYSCALLS = ("ioctl", "futex", "ppoll", "read", "write", "writev", "pread64", "pwrite64",
                "preadv", "pwritev", "recvmsg", "sendmsg", "madvise", "mprotect")  # fmt: skip

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
    hot = [ALLOWED_SYSCALLS[name] for name in HOT_SYSCALLS]
    numbers = hot + sorted(set(ALLOWED_SYSCALLS.values()) - set(hot))
    body = [
        _insn(_LD_ABS, _ARCH),
        _insn(_JEQ, _AUDIT_ARCH_X86_64, jt=1),
        _insn(_RET, _RET_KILL_PROCESS),
        _insn(_LD_ABS, _NR),
        _insn(_JGE, _X32_SYSCALL_BIT, jt=len(numbers)),  # x32: to the EPERM after the tests
    ]
    # Each allowed number jumps to the ALLOW right after the EPERM (jumps reach 255 at most).
    for i, nr in enumerate(numbers):
        body.append(_insn(_JEQ, nr, jt=len(numbers) - i))
    body += [_insn(_RET, _RET_ERRNO_EPERM), _insn(_RET, _RET_ALLOW)]
    return b"".join(body)
