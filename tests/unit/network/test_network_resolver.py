"""The resolver's command line and its readiness check (no process is started)."""

from __future__ import annotations

from pathlib import Path

import embervm.network
from embervm.network._resolver import _proc_udp_has, dnsmasq_argv


def test_dnsmasq_binds_only_the_resolver_address_and_reads_no_system_config() -> None:
    argv = dnsmasq_argv(
        binary="dnsmasq",
        listen_ip="10.213.0.1",
        port=53,
        pid_file=Path("/state/dnsmasq.pid"),
        resolv_file=Path("/etc/resolv.conf"),
        overrides={"example.test": "203.0.113.10"},
        user="nobody",
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
