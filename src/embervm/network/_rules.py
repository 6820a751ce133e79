"""The nftables rule sets, rendered as text for ``nft -f -``.

Two tables do the work (docs/NETWORK.md explains each rule):

- **Host table** (``inet embervm``, one per host): what may leave a VM's veth on the host side.
  Nothing from a VM reaches any host address (input) except the resolver's DNS port, and only for
  VMs with egress; forwarded traffic from a VM must carry its own address, must not go to a
  blocked range or a protected port, and must be TCP; it is masqueraded out of the host. Only
  sockets of the server's user open connections *to* a VM (output): any other local process
  would skip the proxy's token check.
  Per-VM state lives in sets (links, egress links, link+source pairs), so adding or removing a
  VM is an element change, not a rule change.
- **Namespace table** (``inet embervm`` inside each VM namespace): DNAT from the namespace side
  of the veth to the guest (ingress, only from the host side of the same veth), SNAT of the
  guest to the namespace address (egress), DNS redirect to the resolver, anti-spoofing on the
  tap, and the same blocked ranges again (defence in depth: it vanishes with the namespace);
  for egress guests also the per-VM limits (``EgressLimits``): they sit where a guest's packet
  is first seen, so a dropped one leaves no conntrack entry in the namespace or on the host.

Every rendering is a single transaction: it starts by creating and deleting the table, so
applying it twice yields the same rules.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from embervm.errors import ConfigError

from ._addressing import BLOCKED_IPV4, GATEWAY_IP, GUEST_IP
from ._names import HOST_LINK_PREFIX


@dataclass(frozen=True)
class EgressLimits:
    """What one ``INTERNET_EGRESS`` guest may start, per VM (audit B3, B4).

    The defaults leave room for package installs and page loads (tens of connections at once)
    while a flood or a scan from the host's address is cut to a trickle, and no guest holds
    more than a sliver of the host's conntrack table (262,144 entries here; often 65,536).
    """

    connections: int = 1024
    """Flows the guest may have tracked at once: TCP until it closes (TIME_WAIT no longer
    counts), DNS until conntrack forgets it (30 s). New flows beyond are dropped."""
    new_per_minute: int = 1200
    """New flows (TCP and DNS) a minute, sustained (20 a second); ``new_burst`` may come at
    once. A minute, not a second, is the unit so that a test can see the burst alone."""
    new_burst: int = 100
    dns_per_minute: int = 1200
    """Packets to the resolver a minute, every packet and not only new flows, so a guest
    reusing one socket is bounded too; ``dns_burst`` may come at once."""
    dns_burst: int = 100

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ConfigError(f"egress limit {name} must be at least 1, not {value}")


@dataclass(frozen=True)
class HostVmEntry:
    """What the host table knows about one VM."""

    host_link: str
    vm_address: str
    egress: bool


def _elements(items: Iterable[str]) -> str:
    listed = sorted(set(items))
    return f"elements = {{ {', '.join(listed)} }}" if listed else ""


def _quote(name: str) -> str:
    return f'"{name}"'


def _set(name: str, type_: str, items: Iterable[str], *, interval: bool = False) -> list[str]:
    lines = [f"\tset {name} {{", f"\t\ttype {type_}"]
    if interval:
        lines += ["\t\tflags interval", "\t\tauto-merge"]
    elems = _elements(items)
    if elems:
        lines.append(f"\t\t{elems}")
    lines.append("\t}")
    return lines


def render_host_table(
    table: str,
    *,
    pool: str,
    resolver_ip: str,
    resolver_port: int,
    protected_ports: Sequence[int],
    vms: Sequence[HostVmEntry],
    isolate_forwarding: bool,
    server_uid: int,
) -> str:
    """The whole host table, with the VMs that exist now in its sets.

    ``isolate_forwarding``: the manager switched IPv4 forwarding on, so traffic that does not
    involve a VM is dropped in the forward hook, as it was before forwarding was switched on.
    ``server_uid``: the only user whose sockets may open a connection to a VM from the host
    (the server's: the proxy, hooks and readiness probes run in its process).
    """
    blocked = [*BLOCKED_IPV4, pool]
    lines = [
        f"table inet {table} {{}}",
        f"delete table inet {table}",
        f"table inet {table} {{",
        *_set("vm_links", "ifname", (_quote(v.host_link) for v in vms)),
        *_set("egress_links", "ifname", (_quote(v.host_link) for v in vms if v.egress)),
        *_set(
            "vm_sources",
            "ifname . ipv4_addr",
            (f"{_quote(v.host_link)} . {v.vm_address}" for v in vms),
        ),
        *_set("blocked4", "ipv4_addr", blocked, interval=True),
        *_set("protected_ports", "inet_service", (str(p) for p in protected_ports)),
        "\tchain input {",
        "\t\ttype filter hook input priority filter - 10; policy accept;",
        "\t\tiifname @vm_links jump vm_input",
        "\t}",
        "\tchain vm_input {",
        "\t\tmeta nfproto ipv6 drop",
        "\t\tiifname . ip saddr != @vm_sources drop",
        "\t\tct state established,related accept",
        "\t\ttcp dport @protected_ports drop",
        f"\t\tiifname @egress_links ip daddr {resolver_ip} udp dport {resolver_port} accept",
        f"\t\tiifname @egress_links ip daddr {resolver_ip} tcp dport {resolver_port} accept",
        "\t\tdrop",
        "\t}",
        "\tchain output {",
        "\t\ttype filter hook output priority filter - 10; policy accept;",
        "\t\toifname @vm_links jump vm_output",
        "\t}",
        "\tchain vm_output {",
        "\t\tct state established,related accept",
        f"\t\tmeta skuid {server_uid} accept",
        "\t\tdrop",
        "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter - 10; policy accept;",
        "\t\tiifname @vm_links jump vm_forward",
        "\t\toifname @vm_links jump to_vm_forward",
    ]
    if isolate_forwarding:
        # Traffic between two non-VM links was not forwarded before; keep it so. ``ev*``
        # rather than @vm_links, so that two managers (tags) on one host don't drop each other.
        lines.append(f'\t\tiifname != "{HOST_LINK_PREFIX}*" oifname != "{HOST_LINK_PREFIX}*" drop')
    lines += [
        "\t}",
        "\tchain vm_forward {",
        "\t\tmeta nfproto ipv6 drop",
        "\t\tiifname . ip saddr != @vm_sources drop",
        "\t\tiifname != @egress_links drop",
        "\t\tct state invalid drop",
        "\t\tip daddr @blocked4 drop",
        "\t\tmeta l4proto tcp accept",
        "\t\tdrop",
        "\t}",
        "\tchain to_vm_forward {",
        "\t\tct state established,related accept",
        "\t\tdrop",
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        "\t\tiifname @egress_links oifname != @vm_links masquerade",
        "\t}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def render_host_vm_elements(table: str, vm: HostVmEntry, *, add: bool) -> str:
    """Add a VM to the host table's sets, or remove it. Removal tolerates absent elements: it
    adds each element first (a no-op when present), then deletes it. Adding a VM without egress
    removes it from ``egress_links`` the same way, in case an earlier create had egress."""
    link = _quote(vm.host_link)
    members = [
        ("vm_links", link, add),
        ("vm_sources", f"{link} . {vm.vm_address}", add),
        ("egress_links", link, add and vm.egress),
    ]
    lines = []
    for name, elem, keep in members:
        lines.append(f"add element inet {table} {name} {{ {elem} }}")
        if not keep:
            lines.append(f"delete element inet {table} {name} {{ {elem} }}")
    return "\n".join(lines) + "\n"


NETNS_TABLE = "embervm"


def render_netns_table(
    *,
    tap: str,
    netns_link: str,
    host_ip: str,
    vm_address: str,
    resolver_ip: str,
    resolver_port: int,
    egress: bool,
    limits: EgressLimits,
) -> str:
    """The table inside one VM's namespace (``limits`` apply only with ``egress``)."""
    t = NETNS_TABLE
    tap_q, link_q = _quote(tap), _quote(netns_link)
    out = f"iifname {tap_q} oifname {link_q}"
    dns_dnat = [
        f"\t\tiifname {tap_q} ip daddr {GATEWAY_IP} {proto} dport 53 "
        f"dnat ip to {resolver_ip}:{resolver_port}"
        for proto in ("udp", "tcp")
    ]
    dns_accept = [
        f"\t\t{out} ip daddr {resolver_ip} {proto} dport {resolver_port} accept"
        for proto in ("udp", "tcp")
    ]
    lines = [
        f"table inet {t} {{}}",
        f"delete table inet {t}",
        f"table inet {t} {{",
        *_set("blocked4", "ipv4_addr", BLOCKED_IPV4, interval=True),
        "\tchain antispoof {",
        "\t\ttype filter hook prerouting priority raw; policy accept;",
        f"\t\tiifname {tap_q} meta nfproto ipv6 drop",
        f"\t\tiifname {tap_q} ip saddr != {GUEST_IP} drop",
        f"\t\tiifname {link_q} meta nfproto ipv6 drop",
        "\t}",
        "\tchain prerouting {",
        "\t\ttype nat hook prerouting priority dstnat; policy accept;",
        f"\t\tiifname {link_q} ip saddr {host_ip} ip daddr {vm_address} dnat ip to {GUEST_IP}",
        *(dns_dnat if egress else []),
        "\t}",
        "\tchain postrouting {",
        "\t\ttype nat hook postrouting priority srcnat; policy accept;",
        f"\t\toifname {link_q} ip saddr {GUEST_IP} snat ip to {vm_address}",
        "\t}",
        "\tchain input {",
        "\t\ttype filter hook input priority filter; policy drop;",
        '\t\tiifname "lo" accept',
        "\t\tct state established,related accept",
        f"\t\tiifname {tap_q} ip daddr {GATEWAY_IP} icmp type echo-request accept",
        "\t}",
        "\tchain forward {",
        "\t\ttype filter hook forward priority filter; policy drop;",
        "\t\tct state invalid drop",
    ]
    if egress:  # before the established accept: a query on an open flow counts too
        lines.append(
            f"\t\t{out} ip daddr {resolver_ip} meta l4proto {{ tcp, udp }} th dport "
            f"{resolver_port} limit rate over {limits.dns_per_minute}/minute "
            f"burst {limits.dns_burst} packets drop"
        )
    lines += [
        "\t\tct state established,related accept",
        f"\t\tiifname {link_q} oifname {tap_q} ip saddr {host_ip} ip daddr {GUEST_IP} "
        "ct status dnat accept",
    ]
    if egress:  # only new flows get here: established ones were accepted above
        lines += [
            f"\t\t{out} limit rate over {limits.new_per_minute}/minute "
            f"burst {limits.new_burst} packets drop",
            f"\t\t{out} ct count over {limits.connections} drop",
            *dns_accept,
            f"\t\t{out} ip daddr @blocked4 drop",
            f"\t\t{out} meta l4proto tcp accept",
        ]
    lines += ["\t}", "}"]
    return "\n".join(lines) + "\n"
