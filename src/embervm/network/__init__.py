"""Isolated networking for microVMs: one network namespace per VM, nftables, a resolver.

Layering inside the package (everything Linux-specific is here and goes through
``_commands.CommandRunner``):

- ``_names``: interface/namespace names derived from VM ids (kernel length limits).
- ``_addressing``: the fixed guest network and the per-VM /30 blocks of the pool.
- ``_allocations``: which VM holds which block, persisted atomically.
- ``_rules``: the nftables rule sets as text (pure; unit-tested).
- ``_resolver``: the dnsmasq process guests use for DNS.
- ``_manager``: ``NetworkManager`` ties them together.
- ``_tapfd``: ``open_tap`` hands a VMM the tap as a file descriptor (no root, no netns).

docs/NETWORK.md describes the addressing and every rule, and why.
"""

from ._addressing import BLOCKED_IPV4, GATEWAY_IP, GATEWAY_MAC, GUEST_IP, GUEST_MAC, GUEST_PREFIX
from ._commands import CommandResult, CommandRunner, SubprocessRunner
from ._manager import HostPaths, NetworkManager, VmNetwork
from ._rules import EgressLimits
from ._tapfd import open_tap

__all__ = [
    "BLOCKED_IPV4",
    "GATEWAY_IP",
    "GATEWAY_MAC",
    "GUEST_IP",
    "GUEST_MAC",
    "GUEST_PREFIX",
    "CommandResult",
    "CommandRunner",
    "EgressLimits",
    "HostPaths",
    "NetworkManager",
    "SubprocessRunner",
    "VmNetwork",
    "open_tap",
]
