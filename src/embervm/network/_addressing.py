"""Addresses: the fixed guest side and the per-VM blocks carved out of the pool.

Inside every VM namespace the guest sees the same network (10.0.2.15/24, gateway and DNS
10.0.2.2), so a snapshot taken anywhere restores anywhere. What differs per VM is a /30 of the
pool, on the veth pair between the host and the VM's namespace:

    block i = pool.network + 4*i      (i >= 1; block 0 is reserved)
      + 1   host side of the veth      (the proxy's source address)
      + 2   namespace side             (``vm_address``: DNAT to 10.0.2.15)

Block 0's first address is the resolver's (dnsmasq on a dummy interface on the host).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from embervm.errors import ConfigError

GUEST_IP = "10.0.2.15"
GATEWAY_IP = "10.0.2.2"
GUEST_PREFIX = 24
GUEST_MAC = "52:54:00:12:34:56"
GATEWAY_MAC = "52:55:0a:00:02:02"
"""The tap's MAC, also the same in every namespace: a restored guest's ARP cache still holds
the gateway's MAC from where the snapshot was taken, and a tap drops frames addressed to any
other MAC, so a per-VM random MAC would cut a restored guest off until its ARP entry expired.
(52:55:0a:00:02:02 is what QEMU's slirp uses for 10.0.2.2.)"""
GUEST_NETWORK = ipaddress.IPv4Network("10.0.2.0/24")
BLOCK_SIZE = 4

BLOCKED_IPV4: tuple[str, ...] = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
"""Destinations a guest never reaches: private, shared, loopback, link-local, benchmarking,
multicast and reserved ranges (including the broadcast address). IPv6 is dropped altogether,
which covers ULA (fc00::/7), link-local (fe80::/10) and multicast (ff00::/8)."""


@dataclass(frozen=True)
class Block:
    """One VM's /30 of the pool."""

    index: int
    network: ipaddress.IPv4Network

    @property
    def host_ip(self) -> str:
        return str(self.network.network_address + 1)

    @property
    def vm_address(self) -> str:
        return str(self.network.network_address + 2)

    @property
    def prefixlen(self) -> int:
        return self.network.prefixlen


class Pool:
    """The IPv4 range VM blocks come from."""

    def __init__(self, cidr: str) -> None:
        try:
            net = ipaddress.IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise ConfigError(f"network pool {cidr!r} is not an IPv4 network: {exc}") from exc
        if net.prefixlen > 29:
            raise ConfigError(f"network pool {cidr} is too small; use /29 or larger")
        if net.overlaps(GUEST_NETWORK):
            raise ConfigError(f"network pool {cidr} overlaps the guest network {GUEST_NETWORK}")
        self.network = net

    @property
    def size(self) -> int:
        """How many VM blocks fit (block 0 is the resolver's)."""
        return self.network.num_addresses // BLOCK_SIZE - 1

    @property
    def resolver_ip(self) -> str:
        return str(self.network.network_address + 1)

    def block(self, index: int) -> Block:
        if not 1 <= index <= self.size:
            raise ValueError(f"block {index} is outside pool {self.network}")
        base = self.network.network_address + BLOCK_SIZE * index
        return Block(index, ipaddress.IPv4Network(f"{base}/30"))

    def __str__(self) -> str:
        return str(self.network)
