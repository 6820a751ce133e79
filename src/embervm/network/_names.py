"""Names of the kernel objects a VM's network consists of.

Linux limits interface names to 15 characters (``IFNAMSIZ`` - 1), and VM ids are up to 256
characters of anything, so names derive from a short hash of the VM id rather than the id itself.
The hash is stable (same VM, same names, after any restart) and 40 bits wide, so two live VMs
sharing one is vanishingly unlikely; the allocation store refuses it anyway.

The ``tag`` keeps two managers on one host apart (the server and a test run): it prefixes the
namespaces, names the host-wide nftables table and marks the host-side links.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from embervm.errors import ConfigError, NetworkSetupError

IFNAMSIZ = 15
"""Longest interface name the kernel accepts (IFNAMSIZ is 16 including the NUL)."""

DEFAULT_TAG = "emb"
TAP_NAME = "tap0"
"""The guest NIC's device inside every VM namespace; the same everywhere, like the guest address."""
NETNS_LINK_NAME = "veth0"
"""The namespace side of the veth pair."""
SHORT_ID_LEN = 10
HOST_LINK_PREFIX = "ev"
"""Every manager's host-side veths are ``ev<short id>`` (the forward hook relies on it)."""

_TAG_RE = re.compile(r"^[a-z][a-z0-9]{0,3}$")
_VM_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@+=-]{0,199}$")


def check_vm_id(vm_id: str) -> str:
    """VM ids end up in a link alias written through ``ip -batch``: no spaces, quotes or
    newlines, at most 200 characters (ids and ARNs fit)."""
    if not _VM_ID_RE.match(vm_id):
        raise NetworkSetupError(f"VM id {vm_id[:60]!r} is not usable for network names")
    return vm_id


def check_tag(tag: str) -> str:
    """Validate a manager tag: 1-4 lowercase letters/digits, starting with a letter."""
    if not _TAG_RE.match(tag):
        raise ConfigError(f"network tag {tag!r} must be 1-4 lowercase letters or digits")
    return tag


def short_id(vm_id: str) -> str:
    """A stable 10-hex-digit digest of a VM id, used in every name derived from it."""
    return hashlib.blake2b(vm_id.encode(), digest_size=SHORT_ID_LEN // 2).hexdigest()


def table_name(tag: str) -> str:
    """The host-wide nftables table (family inet): ``embervm`` for the default tag."""
    return "embervm" if tag == DEFAULT_TAG else f"embervm_{tag}"


def resolver_link(tag: str) -> str:
    """The dummy interface that carries the resolver's address on the host."""
    return f"{tag}dns0"


def netns_prefix(tag: str) -> str:
    return f"{tag}-"


def link_alias_prefix(tag: str) -> str:
    """Host-side veths carry ``embervm:<tag>:<vm id>`` as their alias, so leftovers are findable."""
    return f"embervm:{tag}:"


@dataclass(frozen=True)
class VmNames:
    """All names belonging to one VM's network."""

    vm_id: str
    short: str
    netns: str
    host_link: str
    netns_link: str
    tap: str
    alias: str

    @classmethod
    def derive(cls, vm_id: str, tag: str = DEFAULT_TAG) -> VmNames:
        short = short_id(check_vm_id(vm_id))
        return cls(
            vm_id=vm_id,
            short=short,
            netns=f"{netns_prefix(tag)}{short}",
            host_link=f"{HOST_LINK_PREFIX}{short}",
            netns_link=NETNS_LINK_NAME,
            tap=TAP_NAME,
            alias=f"{link_alias_prefix(tag)}{vm_id}",
        )
