"""The real server on a pool whose VM block another link of the host already holds (what the
networks of a killed server or another server leave): the chaos runs' intermittent 502 "The
app is not answering on port 8080" on a VM's first request came from a test server drawing
such a pool. The server must refuse to start and name the link, not run VMs behind a route
the kernel may send elsewhere."""

from __future__ import annotations

import ipaddress
import secrets
import subprocess
from pathlib import Path

import pytest
from tests.framework.chaos_server_harness import chaos_server

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(300)]


def test_the_server_refuses_a_pool_a_leftover_network_holds(tmp_path: Path) -> None:
    pool = ipaddress.IPv4Network(f"10.218.{4 * secrets.randbelow(64)}.0/22")
    leftover, block_host_ip = f"evh9{secrets.token_hex(4)}", pool.network_address + 5
    peer = f"vh9{leftover[4:]}"  # a veth, like a VM's host side (the kernel may lack dummy)
    subprocess.run(["ip", "link", "add", leftover, "type", "veth", "peer", "name", peer],
                   check=True)  # fmt: skip
    try:  # block 1's host side, as another server's first VM veth holds it
        subprocess.run(["ip", "addr", "add", f"{block_host_ip}/30", "dev", leftover], check=True)
        with (
            pytest.raises(RuntimeError, match="server did not start") as refused,
            chaos_server(tmp_path / "data", "--network-pool", str(pool)),
        ):
            pass
        assert f"network pool {pool} is in use on this host" in str(refused.value)
        assert f"{block_host_ip} is on {leftover}" in str(refused.value)
    finally:
        subprocess.run(["ip", "link", "del", leftover], check=False)
