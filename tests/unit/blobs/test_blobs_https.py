"""https:// artifacts are fetched from public addresses only: the guests' blocked ranges, other
non-global addresses and the host's own are refused before any connection, with one answer
whether the name did not resolve or resolved to a refused address."""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

import pytest

from embervm.blobs import fetch_code_artifact
from embervm.blobs._https import is_fetchable, is_own_address, parse_networks
from embervm.errors import BuildFailure

REFUSED = [
    "0.0.0.0",
    "10.1.2.3",
    "100.64.0.1",  # shared (carrier-grade NAT)
    "127.0.0.1",
    "169.254.169.254",  # cloud metadata
    "172.16.0.1",
    "192.0.0.8",
    "192.168.1.1",
    "198.18.0.1",
    "192.0.2.1",  # documentation: not global
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
    "::",
    "::1",
    "fe80::1",
    "fc00::1",
    "ff02::1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
]


@pytest.mark.parametrize("address", REFUSED)
def test_private_and_special_addresses_are_refused(address: str) -> None:
    assert not is_fetchable(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "2606:4700:4700::1111"])
def test_public_addresses_are_fetchable(address: str) -> None:
    assert is_fetchable(ipaddress.ip_address(address))


def test_allowed_networks_open_only_themselves() -> None:
    allowed = parse_networks(["10.1.0.0/16", "fd00::/8"])
    assert is_fetchable(ipaddress.ip_address("10.1.2.3"), allowed)
    assert is_fetchable(ipaddress.ip_address("fd00::5"), allowed)
    assert not is_fetchable(ipaddress.ip_address("10.2.0.1"), allowed)
    assert not is_fetchable(ipaddress.ip_address("169.254.169.254"), allowed)


def _source_address() -> str | None:
    """This host's address towards the internet (a UDP connect sends nothing)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))
        except OSError:
            return None
        return str(probe.getsockname()[0])


def test_the_hosts_own_addresses_are_recognised() -> None:
    assert is_own_address(ipaddress.ip_address("127.0.0.1"))
    assert not is_own_address(ipaddress.ip_address("192.0.2.1"))
    own = _source_address()
    if own is None:
        pytest.skip("no route: this host has no address towards the internet")
    assert is_own_address(ipaddress.ip_address(own))


@pytest.mark.parametrize(
    "uri",
    [
        "https://127.0.0.1:8443/x.zip",  # the proxy's own listener
        "https://127.0.0.2/x.zip",
        "https://[::1]/x.zip",
        "https://[::ffff:127.0.0.1]/x.zip",
        "https://localhost/x.zip",
    ],
)
async def test_a_private_host_is_refused_before_any_connection(tmp_path: Path, uri: str) -> None:
    """Loopback only (tests talk to nothing else): without the check, each was connected to."""
    with pytest.raises(BuildFailure) as err:
        await fetch_code_artifact(uri, tmp_path / "a.zip", timeout=10)
    assert err.value.reason == (
        f"code artifact {uri!r} could not be fetched: its host did not resolve to a public address"
    )
    assert not (tmp_path / "a.zip").exists()
