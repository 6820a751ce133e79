"""Two managers on one address pool, against the real kernel (issue #11 §6).

The second one's VM on block 1 would get a second connected route to the first one's block 1,
and the kernel sends the proxy's connections down whichever it picks: the chaos runs' 502 on a
VM's first request, when a test server drew a pool whose networks another server had left on
the host. The second manager must refuse to start and leave nothing behind."""

from __future__ import annotations

import ipaddress
import os
import shutil
from pathlib import Path

import pytest
from tests.framework.network_netns_world import API_PORT, World, leftovers, new_tag, sh

from embervm.errors import NetworkSetupError
from embervm.network import NetworkManager

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "dnsmasq")),
        reason="needs root, iproute2, nftables and dnsmasq",
    ),
    pytest.mark.timeout(120),
]


async def test_a_second_manager_on_the_same_pool_refuses_to_start(
    world: World, tmp_path: Path
) -> None:
    first = await world.manager.create(f"{world.tag}-vm-a", egress=False)
    second_tag = new_tag()
    second = NetworkManager(
        tmp_path / "second", pool=world.manager.pool, api_ports=[API_PORT], tag=second_tag
    )
    try:
        with pytest.raises(NetworkSetupError, match=f"pool {world.manager.pool} is in use"):
            await second.start()
    except pytest.fail.Exception:
        await second.stop()  # it started (no check): leave the host as it was
        raise
    assert await leftovers(second_tag, second.table) == []
    block = ipaddress.ip_interface(f"{first.host_ip}/30").network
    routes = (await sh("ip", "-o", "route", "show", "exact", str(block))).stdout.splitlines()
    assert len(routes) == 1, routes  # the block is reached through the first manager's veth only
    assert f"dev {first.host_link} " in routes[0], routes
