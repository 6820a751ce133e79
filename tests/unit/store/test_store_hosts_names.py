"""What a host may be called and where it may be dialled, and the reason its VMs end with."""

from __future__ import annotations

import re

import pytest

from embervm.errors import ConfigError
from embervm.store.hosts import check_address, check_host_id, lost_reason


@pytest.mark.parametrize("host_id", ["a", "host-1", "0", "x" * 64, "a--b", "h-"])
def test_host_ids_that_are_accepted(host_id: str) -> None:
    assert check_host_id(host_id) == host_id


@pytest.mark.parametrize(
    "host_id", ["", "-a", "A", "host_1", "host.1", "x" * 65, "h 1", "h1\n", "hé"]
)
def test_host_ids_that_are_refused(host_id: str) -> None:
    with pytest.raises(ConfigError, match="host id"):
        check_host_id(host_id)


@pytest.mark.parametrize(
    "address", ["10.0.0.5:8790", "host-1.example:443", "[::1]:1", "[fd00::5]:65535"]
)
def test_addresses_that_are_accepted(address: str) -> None:
    assert check_address(address) == address


@pytest.mark.parametrize(
    "address",
    ["10.0.0.5", "h:", ":80", "h:0", "h:65536", "h:8o", "::1:80", "[]:80", "h :80", "h:٣"],
)
def test_addresses_that_are_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="ADDR:PORT"):
        check_address(address)


def test_the_lost_reason_is_a_state_reason_the_model_accepts() -> None:
    reason = lost_reason("h-1")
    assert reason == "HostLost:the_host_h-1_stopped_answering"
    assert re.fullmatch(r"[^\s]+", reason)
