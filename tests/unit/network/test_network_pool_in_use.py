"""A manager refuses to start on a pool another link of the host already uses (issue #11 §6).

Two managers on one pool (another server, or the networks a dead one left) put two connected
routes to the same VM block on two host links; the kernel uses one, so the proxy's connections
to a VM could reach the other network: the chaos runs' intermittent 502 "The app is not
answering on port 8080" on a VM's first request."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.framework.fake_network import FakeRunner
from tests.framework.network_unit_harness import make_rig

from embervm.errors import NetworkSetupError
from embervm.network import CommandResult


def host_addresses(*links: dict[str, Any]) -> FakeRunner:
    """A runner whose ``ip -j -d addr show`` lists ``links``."""
    out = json.dumps(list(links))

    def respond(argv: tuple[str, ...], _input: str | None) -> CommandResult | None:
        if argv[:4] == ("ip", "-j", "-d", "addr"):
            return CommandResult(argv, 0, out, "")
        return None

    return FakeRunner(respond)


def link(name: str, *addresses: str, alias: str = "") -> dict[str, Any]:
    infos = [{"family": "inet", "local": a.split("/")[0], "prefixlen": int(a.split("/")[1])}
             for a in addresses]  # fmt: skip
    return {"ifname": name, "addr_info": infos, **({"ifalias": alias} if alias else {})}


async def test_a_pool_another_manager_uses_is_refused_before_anything_is_set_up(
    tmp_path: Path,
) -> None:
    # The resolver link of a manager with another tag holds the pool's first address.
    r = make_rig(tmp_path, host_addresses(link("eth0", "192.0.2.2/24"),
                                          link("e4edns0", "10.213.0.1/32")))  # fmt: skip
    with pytest.raises(NetworkSetupError, match=r"10\.213\.0\.1 is on e4edns0"):
        await r.manager.start()
    assert r.commands() == ["ip -j -d addr show"]  # no table, no link, no sysctl
    assert not r.resolver.running
    assert r.forwarding() == "0"


async def test_a_vm_link_another_server_left_on_the_pool_is_named_with_its_owner(
    tmp_path: Path,
) -> None:
    leftover = link("evba74ab902e", "10.213.0.5/30", alias="embervm:e4e:mvm-bf76")
    r = make_rig(tmp_path, host_addresses(leftover))
    with pytest.raises(NetworkSetupError, match=r"evba74ab902e \(embervm:e4e:mvm-bf76\)"):
        await r.manager.start()


async def test_its_own_links_and_other_ranges_do_not_stop_a_restart(tmp_path: Path) -> None:
    r = make_rig(tmp_path, host_addresses(
        link("eth0", "192.0.2.2/24", "10.213.1.7/24"),  # outside 10.213.0.0/24
        link("embdns0", "10.213.0.1/32"),  # its own resolver link
        link("ev0123456789", "10.213.0.5/30", alias="embervm:emb:mvm-1"),  # its own VM's
        link("ev9876543210", alias="embervm:e4e:mvm-2"),  # another tag's, no address
    ))  # fmt: skip
    await r.manager.start()
    try:
        assert r.resolver.running
    finally:
        await r.manager.stop()
