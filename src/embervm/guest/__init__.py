"""The guest side of a VM: what it boots from, and how the host talks to it.

- ``artifacts``: builds and caches the kernel, the initramfs (which carries the agent) and the
  ``debian12`` base disk.
- ``mirrors``: the Debian mirrors the base disk is built from (the host's apt sources, an
  override, or deb.debian.org).
- ``agent``: the stdlib-only program that runs as PID 1 inside the guest (``python3 -m
  embervm_agent``); ``agent.protocol`` is the framing both sides share.
- ``client``: ``AgentClient``, the host side of the protocol (see ``docs/GUEST_PROTOCOL.md``).
"""

from embervm.guest.api import GuestAgent
from embervm.guest.artifacts import (
    BootArtifacts,
    GuestArtifacts,
    ensure_base_disk,
    ensure_boot_artifacts,
    ensure_guest_artifacts,
    host_tsc_khz,
    kernel_cmdline,
)
from embervm.guest.client import (
    AgentClient,
    AppSpec,
    ExecResult,
    HttpResponse,
    LogLine,
    PtySession,
)

__all__ = [
    "AgentClient",
    "AppSpec",
    "BootArtifacts",
    "ExecResult",
    "GuestAgent",
    "GuestArtifacts",
    "HttpResponse",
    "LogLine",
    "PtySession",
    "ensure_base_disk",
    "ensure_boot_artifacts",
    "ensure_guest_artifacts",
    "host_tsc_khz",
    "kernel_cmdline",
]
