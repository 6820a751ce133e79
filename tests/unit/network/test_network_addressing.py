"""Per-VM blocks of the pool and the fixed guest network."""

from __future__ import annotations

import ipaddress

import pytest

from embervm.errors import ConfigError
from embervm.network._addressing import GATEWAY_IP, GUEST_IP, GUEST_NETWORK, Pool


def test_blocks_are_disjoint_slash30s_after_the_reserved_first() -> None:
    pool = Pool("10.213.0.0/16")
    assert pool.size == 65536 // 4 - 1
    assert pool.resolver_ip == "10.213.0.1"
    first, second = pool.block(1), pool.block(2)
    assert (first.host_ip, first.vm_address) == ("10.213.0.5", "10.213.0.6")
    assert (second.host_ip, second.vm_address) == ("10.213.0.9", "10.213.0.10")
    assert first.prefixlen == 30
    assert not first.network.overlaps(second.network)
    last = pool.block(pool.size)
    assert last.network.broadcast_address == pool.network.broadcast_address


@pytest.mark.parametrize("index", [0, -1, 16384])
def test_blocks_outside_the_pool_are_refused(index: int) -> None:
    with pytest.raises(ValueError, match="outside"):
        Pool("10.213.0.0/16").block(index)


@pytest.mark.parametrize("cidr", ["10.213.0.1/16", "10.213.0.0/30", "10.0.0.0/8", "fd00::/64", "x"])
def test_bad_pools_are_refused(cidr: str) -> None:
    with pytest.raises(ConfigError):
        Pool(cidr)


def test_guest_network_is_the_same_everywhere() -> None:
    assert ipaddress.ip_address(GUEST_IP) in GUEST_NETWORK
    assert ipaddress.ip_address(GATEWAY_IP) in GUEST_NETWORK
    assert (GUEST_IP, GATEWAY_IP) == ("10.0.2.15", "10.0.2.2")
