"""The resolver's command line and its readiness check (no process is started)."""

from __future__ import annotations

from pathlib import Path

import embervm.network
from embervm.network._resolver import _proc_udp_has, dnsmasq_argv, upstream_resolv_file


def test_dnsmasq_binds_only_the_resolver_address_and_reads_no_system_config() -> None:
    argv = dnsmasq_argv(
        binary="dnsmasq",
        listen_ip="10.213.0.1",
        port=53,
        pid_file=Path("/state/dnsmasq.pid"),
        resolv_file=Path("/etc/resolv.conf"),
        overrides={"example.test": "203.0.113.10"},
        user="nobody",
        unreachable=["10.0.0.0/8"],
    )
    assert argv[0] == "dnsmasq"
    for flag in (
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=10.213.0.1",
        "--resolv-file=/etc/resolv.conf",
        "--user=nobody",
        "--address=/example.test/203.0.113.10",
    ):
        assert flag in argv
    assert not [a for a in argv if a.startswith(("--interface", "--dhcp"))]


def test_dnsmasq_answers_no_host_local_names() -> None:
    """B4: localhost names are never forwarded, plain names neither, and upstream answers in
    a range no guest reaches (private, shared, loopback, link-local...) become NXDOMAIN."""
    argv = dnsmasq_argv(
        binary="dnsmasq", listen_ip="10.213.0.1", port=53, pid_file=Path("/p"),
        resolv_file=Path("/r"), overrides={}, user="nobody",
        unreachable=["100.64.0.0/10", "10.213.0.0/16"],
    )  # fmt: skip
    for flag in ("--local=/localhost/", "--domain-needed", "--no-hosts",
                 "--bogus-nxdomain=100.64.0.0/10", "--bogus-nxdomain=10.213.0.0/16"):  # fmt: skip
        assert flag in argv
    assert "--rebind-localhost-ok" not in argv
    # dnsmasq's rebind check counts the documentation ranges (203.0.113/24...) as private:
    # guests reach them, and some networks resolve the package registries there
    assert "--stop-dns-rebind" not in argv


def test_a_loopback_stub_is_bypassed_for_the_servers_behind_it(tmp_path: Path) -> None:
    """B4: systemd-resolved's stub answers /etc/hosts, the host name and LAN names."""
    host, resolved = tmp_path / "resolv.conf", tmp_path / "resolved.conf"
    resolved.write_text("nameserver 192.0.2.53\n")
    host.write_text("# stub\nnameserver 127.0.0.53\noptions edns0 trust-ad\nsearch lan\n")
    assert upstream_resolv_file(host, resolved) == resolved
    host.write_text("nameserver 127.0.0.53\nnameserver ::1\n")
    assert upstream_resolv_file(host, resolved) == resolved


def test_the_host_list_is_kept_when_it_names_a_real_server_or_no_stub_list_exists(
    tmp_path: Path,
) -> None:
    host, resolved = tmp_path / "resolv.conf", tmp_path / "resolved.conf"
    host.write_text("nameserver 127.0.0.53\n")
    assert upstream_resolv_file(host, resolved) == host  # no resolved list to use instead
    resolved.write_text("nameserver 192.0.2.53\n")
    host.write_text("nameserver 127.0.0.53\nnameserver 10.255.255.53\n")
    assert upstream_resolv_file(host, resolved) == host
    host.write_text("")
    assert upstream_resolv_file(host, resolved) == host
    assert upstream_resolv_file(tmp_path / "absent", resolved) == tmp_path / "absent"


UDP_TABLE = """\
   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
  412: 0100D50A:0035 00000000:0000 07 00000000:00000000 00:00000000 00000000   999        0 1 2
"""


def test_udp_bind_check_reads_the_kernel_notation(tmp_path: Path) -> None:
    table = tmp_path / "udp"
    table.write_text(UDP_TABLE)
    assert _proc_udp_has("10.213.0.1", 53, table)
    assert not _proc_udp_has("10.213.0.1", 5353, table)
    assert not _proc_udp_has("10.213.1.1", 53, table)
    assert not _proc_udp_has("10.213.0.1", 53, tmp_path / "absent")


def test_package_exports_exactly_its_public_api() -> None:
    assert sorted(embervm.network.__all__) == sorted(
        name
        for name in dir(embervm.network)
        if not name.startswith("_")
        and name.isidentifier()
        and name not in {"annotations", "testing"}
    )
