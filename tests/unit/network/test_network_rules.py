"""The rendered nftables text says what docs/NETWORK.md promises."""

from __future__ import annotations

import pytest

from embervm.errors import ConfigError
from embervm.network._rules import (
    EgressLimits,
    HostVmEntry,
    render_host_table,
    render_host_vm_elements,
    render_netns_table,
)

A = HostVmEntry("ev0123456789", "10.213.0.6", egress=True)
B = HostVmEntry("evabcdefabcd", "10.213.0.10", egress=False)


def host(**kw: object) -> str:
    args: dict[str, object] = {
        "pool": "10.213.0.0/16",
        "resolver_ip": "10.213.0.1",
        "resolver_port": 53,
        "protected_ports": [8700, 8443],
        "vms": [A, B],
        "isolate_forwarding": False,
        "server_uid": 0,
    }
    args.update(kw)
    return render_host_table("embervm", **args)  # type: ignore[arg-type]


def netns(egress: bool, limits: EgressLimits | None = None) -> str:
    return render_netns_table(
        tap="tap0",
        netns_link="veth0",
        host_ip="10.213.0.5",
        vm_address="10.213.0.6",
        resolver_ip="10.213.0.1",
        resolver_port=53,
        egress=egress,
        limits=limits or EgressLimits(),
    )


def chain(text: str, name: str) -> list[str]:
    """The rule lines of one chain."""
    lines = text.splitlines()
    start = lines.index(f"\tchain {name} {{")
    end = lines.index("\t}", start)
    return [line.strip() for line in lines[start + 1 : end]]


def test_host_table_replaces_itself_atomically() -> None:
    lines = host().splitlines()
    assert lines[:3] == [
        "table inet embervm {}",
        "delete table inet embervm",
        "table inet embervm {",
    ]


def test_host_sets_hold_each_vm_and_only_egress_vms_in_egress_links() -> None:
    text = host()
    assert 'elements = { "ev0123456789", "evabcdefabcd" }' in text
    assert 'elements = { "ev0123456789" }' in text
    assert '"ev0123456789" . 10.213.0.6, "evabcdefabcd" . 10.213.0.10' in text
    assert "elements = { 8443, 8700 }" in text


def test_host_input_from_vms_drops_everything_but_dns_to_the_resolver() -> None:
    rules = chain(host(), "vm_input")
    assert rules[0] == "meta nfproto ipv6 drop"
    assert "iifname . ip saddr != @vm_sources drop" in rules
    assert "tcp dport @protected_ports drop" in rules
    assert "iifname @egress_links ip daddr 10.213.0.1 udp dport 53 accept" in rules
    assert rules[-1] == "drop"
    assert [r for r in rules if r.endswith("accept")] == [
        "ct state established,related accept",
        "iifname @egress_links ip daddr 10.213.0.1 udp dport 53 accept",
        "iifname @egress_links ip daddr 10.213.0.1 tcp dport 53 accept",
    ]


def test_host_forward_allows_only_tcp_to_unblocked_addresses_from_egress_vms() -> None:
    rules = chain(host(), "vm_forward")
    assert rules.index("iifname != @egress_links drop") < rules.index("meta l4proto tcp accept")
    assert rules.index("ip daddr @blocked4 drop") < rules.index("meta l4proto tcp accept")
    assert rules[-1] == "drop"
    assert chain(host(), "to_vm_forward") == ["ct state established,related accept", "drop"]


def test_only_the_server_user_opens_connections_from_the_host_to_a_vm() -> None:
    """A13: any other local process would reach the guest's ports without the proxy's token."""
    assert chain(host(), "output")[-1] == "oifname @vm_links jump vm_output"
    assert chain(host(server_uid=991), "vm_output") == [
        "ct state established,related accept",
        "meta skuid 991 accept",
        "drop",
    ]


def test_blocked_ranges_cover_private_link_local_multicast_and_the_pool() -> None:
    text = host(pool="172.31.0.0/16")
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "100.64.0.0/10",
                 "169.254.0.0/16", "224.0.0.0/4", "127.0.0.0/8", "172.31.0.0/16"):  # fmt: skip
        assert cidr in text


def test_forward_isolation_only_when_the_manager_switched_forwarding_on() -> None:
    isolating = 'iifname != "ev*" oifname != "ev*" drop'
    assert isolating in chain(host(isolate_forwarding=True), "forward")
    assert isolating not in host(isolate_forwarding=False)


def test_masquerade_only_for_egress_vms() -> None:
    assert chain(host(), "postrouting")[-1] == (
        "iifname @egress_links oifname != @vm_links masquerade"
    )


def test_element_removal_tolerates_absent_elements() -> None:
    text = render_host_vm_elements("embervm", B, add=False)
    for name in ("vm_links", "vm_sources", "egress_links"):
        lines = text.splitlines()
        add = next(i for i, ln in enumerate(lines) if f" {name} " in ln and "add" in ln)
        assert lines[add + 1].startswith(f"delete element inet embervm {name} ")


def test_adding_a_vm_without_egress_takes_it_out_of_egress_links() -> None:
    without = render_host_vm_elements("embervm", B, add=True)
    assert 'delete element inet embervm egress_links { "evabcdefabcd" }' in without
    assert "delete element inet embervm vm_links" not in without
    with_egress = render_host_vm_elements("embervm", A, add=True)
    assert 'add element inet embervm egress_links { "ev0123456789" }' in with_egress
    assert "delete" not in with_egress


def test_netns_ingress_is_dnat_from_the_own_host_veth_only() -> None:
    text = netns(egress=False)
    assert 'iifname "veth0" ip saddr 10.213.0.5 ip daddr 10.213.0.6 dnat ip to 10.0.2.15' in chain(
        text, "prerouting"
    )
    assert (
        'iifname "veth0" oifname "tap0" ip saddr 10.213.0.5 ip daddr 10.0.2.15 '
        "ct status dnat accept" in chain(text, "forward")
    )


def test_netns_without_egress_has_no_dns_and_no_outbound_accept() -> None:
    text = netns(egress=False)
    assert "dport 53" not in text
    forward = chain(text, "forward")
    assert not [r for r in forward if r.startswith('iifname "tap0"') and r.endswith("accept")]


def test_netns_with_egress_redirects_dns_and_allows_only_public_tcp() -> None:
    text = netns(egress=True)
    assert 'iifname "tap0" ip daddr 10.0.2.2 udp dport 53 dnat ip to 10.213.0.1:53' in text
    forward = chain(text, "forward")
    drop = forward.index('iifname "tap0" oifname "veth0" ip daddr @blocked4 drop')
    assert forward.index('iifname "tap0" oifname "veth0" meta l4proto tcp accept') > drop
    assert 'oifname "veth0" ip saddr 10.0.2.15 snat ip to 10.213.0.6' in chain(text, "postrouting")


def test_netns_drops_spoofed_and_ipv6_traffic_from_the_tap() -> None:
    rules = chain(netns(egress=True), "antispoof")
    assert 'iifname "tap0" ip saddr != 10.0.2.15 drop' in rules
    assert 'iifname "tap0" meta nfproto ipv6 drop' in rules
    assert "policy drop;" in "\n".join(chain(netns(egress=True), "input"))


LIMITS = EgressLimits(connections=64, new_per_minute=5, new_burst=9, dns_per_minute=3, dns_burst=7)
OUT = 'iifname "tap0" oifname "veth0"'


def test_egress_guest_new_flows_are_rate_limited_and_counted_before_any_accept() -> None:
    """B3: one guest can neither fill the host's conntrack table nor scan at full speed."""
    forward = chain(netns(egress=True, limits=LIMITS), "forward")
    rate = forward.index(f"{OUT} limit rate over 5/minute burst 9 packets drop")
    count = forward.index(f"{OUT} ct count over 64 drop")
    established = forward.index("ct state established,related accept")
    first_guest_accept = min(
        i for i, r in enumerate(forward) if r.startswith(OUT) and r.endswith("accept")
    )
    assert established < rate < count < first_guest_accept


def test_every_packet_to_the_resolver_is_rate_limited_even_on_an_open_flow() -> None:
    """B4: a guest reusing one UDP socket keeps its flow established; the limit comes first."""
    forward = chain(netns(egress=True, limits=LIMITS), "forward")
    dns_limit = forward.index(
        f"{OUT} ip daddr 10.213.0.1 meta l4proto {{ tcp, udp }} th dport 53 "
        "limit rate over 3/minute burst 7 packets drop"
    )
    assert dns_limit < forward.index("ct state established,related accept")


def test_guests_without_egress_get_no_limits_as_they_start_nothing() -> None:
    text = netns(egress=False)
    assert " limit " not in text
    assert " ct count " not in text


def test_default_limits_are_in_the_rules() -> None:
    forward = chain(netns(egress=True), "forward")
    assert f"{OUT} ct count over 1024 drop" in forward
    assert f"{OUT} limit rate over 1200/minute burst 100 packets drop" in forward


@pytest.mark.parametrize("field", ["connections", "new_per_minute", "dns_burst"])
def test_egress_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        EgressLimits(**{field: 0})
