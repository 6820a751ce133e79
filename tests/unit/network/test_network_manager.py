"""NetworkManager's orchestration against a recording fake runner (no root, no kernel)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.framework.fake_network import FakeRunner
from tests.framework.network_unit_harness import Rig, make_rig

from embervm.errors import NetworkSetupError
from embervm.network import CommandResult, EgressLimits, NetworkManager


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = make_rig(tmp_path)
    await r.manager.start()
    r.runner.calls.clear()
    yield r
    await r.manager.stop()


async def test_start_installs_table_resolver_and_forwarding_and_stop_undoes_them(
    tmp_path: Path,
) -> None:
    r = make_rig(tmp_path)
    await r.manager.start()
    assert r.runner.calls[0][0] == ("ip", "-j", "-d", "addr", "show")  # the pool is free
    table_input = r.runner.calls[1][1] or ""
    assert r.runner.calls[1][0] == ("nft", "-f", "-")
    assert "table inet embervm {" in table_input
    assert 'iifname != "ev*" oifname != "ev*" drop' in table_input  # forwarding was off
    assert "elements = { 8443, 8700 }" in table_input
    assert r.forwarding() == "1"
    assert r.resolver.running

    await r.manager.stop()
    assert not r.resolver.running
    assert r.forwarding() == "0"
    assert "delete table inet embervm" in (r.runner.calls[-1][1] or "")


async def test_the_server_user_and_the_egress_limits_reach_the_rules(tmp_path: Path) -> None:
    r = make_rig(tmp_path, limits=EgressLimits(connections=7, dns_burst=3))
    await r.manager.start()
    try:
        assert f"meta skuid {os.geteuid()} accept" in (r.runner.calls[1][1] or "")  # A13
        net = await r.manager.create("mvm-1", egress=True)
        netns_rules = next(i or "" for argv, i in r.runner.calls if argv[:4] == (
            "ip", "netns", "exec", net.netns))  # fmt: skip
        assert "ct count over 7 drop" in netns_rules  # B3
        assert "burst 3 packets drop" in netns_rules  # B4
    finally:
        await r.manager.stop()


async def test_create_before_start_is_refused(tmp_path: Path) -> None:
    r = make_rig(tmp_path)
    with pytest.raises(NetworkSetupError, match="start"):
        await r.manager.create("vm", egress=False)


async def test_create_builds_netns_rules_veth_and_tap_in_order(rig: Rig) -> None:
    net = await rig.manager.create("mvm-1", egress=True, tap_uid=1000, tap_gid=1001)

    assert (net.host_ip, net.vm_address, net.tap) == ("10.213.0.5", "10.213.0.6", "tap0")
    assert (net.guest_ip, net.gateway, net.dns) == ("10.0.2.15", "10.0.2.2", "10.0.2.2")
    cmds = rig.commands()
    assert cmds[0] == f"ip netns add {net.netns}"
    # sysctls and the namespace's rules in one process, before any link enters the namespace
    assert cmds[1].startswith(f"ip netns exec {net.netns} sh -c sysctl -q -w net.ipv4.ip_forward=1")
    assert "disable_ipv6=1" in cmds[1]
    assert cmds[1].endswith("&& exec nft -f - embervm-netns-setup")
    assert "table inet" in (rig.runner.calls[1][1] or "")
    assert cmds[2] == "nft -f -"  # host sets learn the VM before its link exists
    assert cmds[3] == f"ip link add {net.host_link} type veth peer name veth0 netns {net.netns}"
    batch = rig.runner.calls[-1][1] or ""
    assert "tuntap add dev tap0 mode tap user 1000 group 1001" in batch
    assert "route add default via 10.213.0.5 dev veth0" in batch
    assert "link set dev tap0 address 52:55:0a:00:02:02" in batch  # same in every VM


async def test_failed_create_undoes_in_reverse_order_and_releases_the_block(
    tmp_path: Path,
) -> None:
    def respond(argv: tuple[str, ...], input: str | None) -> CommandResult | None:
        if input and "tuntap add" in input:
            return CommandResult(argv, 2, "", "RTNETLINK answers: Operation not permitted")
        return None

    r = make_rig(tmp_path, FakeRunner(respond))
    await r.manager.start()
    r.runner.calls.clear()

    with pytest.raises(NetworkSetupError, match=r"ip -n emb-\w+ -batch -.*not permitted"):
        await r.manager.create("mvm-1", egress=True)

    cmds = r.commands()
    failed = next(i for i, (_, inp) in enumerate(r.runner.calls) if inp and "tuntap" in inp)
    undo = cmds[failed + 1 :]
    assert undo[0].startswith("ip link del ev")
    assert undo[1] == "nft -f -"
    assert "delete element" in (r.runner.calls[failed + 2][1] or "")
    assert undo[2].startswith("ip netns del emb-")
    assert r.manager.lookup("mvm-1") is None
    assert list((r.state_dir / "vms").glob("*.json")) == []
    await r.manager.stop()


async def test_create_tears_down_leftovers_of_a_previous_attempt(rig: Rig) -> None:
    net = await rig.manager.create("mvm-1", egress=False)
    (rig.paths.netns_dir / net.netns).touch()
    (rig.paths.sys_net / net.host_link).mkdir()
    rig.runner.calls.clear()

    again = await rig.manager.create("mvm-1", egress=True)

    assert again.vm_address == net.vm_address
    assert again.egress
    assert rig.commands()[:3] == [
        f"ip netns del {net.netns}",
        f"ip link del {net.host_link}",
        f"ip netns add {net.netns}",
    ]


async def test_destroy_is_idempotent_and_frees_the_block(rig: Rig) -> None:
    net = await rig.manager.create("mvm-1", egress=True)
    (rig.paths.netns_dir / net.netns).touch()
    rig.runner.calls.clear()

    await rig.manager.destroy("mvm-1")
    assert rig.commands()[0] == f"ip netns del {net.netns}"
    assert "delete element inet embervm vm_sources" in (rig.runner.calls[-1][1] or "")
    (rig.paths.netns_dir / net.netns).unlink()
    rig.runner.calls.clear()

    await rig.manager.destroy("mvm-1")
    assert rig.commands() == []
    assert rig.manager.lookup("mvm-1") is None
    assert (await rig.manager.create("mvm-2", egress=False)).vm_address == net.vm_address


async def test_stop_keeps_isolation_while_vms_remain(tmp_path: Path) -> None:
    r = make_rig(tmp_path)
    await r.manager.start()
    await r.manager.create("mvm-1", egress=True)
    r.runner.calls.clear()

    await r.manager.stop()

    assert r.commands() == []  # table kept
    assert r.forwarding() == "1"
    again = NetworkManager(
        r.state_dir, pool="10.213.0.0/24", runner=r.runner, resolver=r.resolver, paths=r.paths
    )
    await again.start()
    table = next(inp for argv, inp in r.runner.calls if argv == ("nft", "-f", "-"))
    assert '"ev' in (table or "")  # the surviving VM is back in the sets
    assert again.lookup("mvm-1") is not None
    await again.destroy("mvm-1")
    await again.stop()
    assert r.forwarding() == "0"  # remembered across the restart


async def test_reclaim_removes_dead_vms_namespaces_and_links_only(rig: Rig) -> None:
    live = await rig.manager.create("live", egress=False)
    dead = await rig.manager.create("dead", egress=False)
    for ns in (live.netns, dead.netns, "emb-0000000000", "other-ns"):
        (rig.paths.netns_dir / ns).touch()
    links = [
        {"ifname": live.host_link, "ifalias": "embervm:emb:live"},
        {"ifname": "evstale", "ifalias": "embervm:emb:gone"},
        {"ifname": "evother", "ifalias": "embervm:t1:gone"},
        {"ifname": "eth0"},
    ]

    def respond(argv: tuple[str, ...], input: str | None) -> CommandResult | None:
        if argv[:3] == ("ip", "-j", "link"):
            return CommandResult(argv, 0, json.dumps(links), "")
        if argv[:3] == ("ip", "netns", "del"):
            (rig.paths.netns_dir / argv[3]).unlink()
        return None

    rig.runner.respond = respond
    rig.runner.calls.clear()

    removed = await rig.manager.reclaim_leftovers({"live"})

    assert removed == ["allocation dead", "netns emb-0000000000", "link evstale"]
    cmds = rig.commands()
    assert f"ip netns del {live.netns}" not in cmds
    assert "ip link del evother" not in cmds  # another manager's
    assert "ip netns del other-ns" not in cmds
    assert rig.manager.lookup("live") is not None
