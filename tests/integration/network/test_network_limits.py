"""Per-VM limits on what an egress guest may start, and what the resolver tells it (B3, B4).

The guest is the veth stand-in of ``conftest`` (the rules match device names, so it goes
through what a QEMU guest on the tap would). The rates are per minute and each test stays far
below one, so a limit shows only its burst: the counts below do not depend on timing.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.framework.network_netns_world import INTERNET_IP, World, open_world, sh

from embervm.network import EgressLimits

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "dnsmasq")),
        reason="needs root, iproute2, nftables and dnsmasq",
    ),
    pytest.mark.timeout(120),
]

HOLD_PORT = 7000
ATTEMPT_TIMEOUT = "0.3"  # below TCP's first SYN retransmission (1 s): one SYN per attempt

CONNECT = """
import socket, sys
host, port, count, timeout, tries = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    float(sys.argv[4]), int(sys.argv[5])
held = []
for _ in range(count):
    for _ in range(tries):
        try:
            held.append(socket.create_connection((host, port), timeout=timeout))
            break
        except OSError:
            pass
print(len(held), flush=True)
for s in held:  # close and wait for the server's close: the flows end before this exits
    s.shutdown(socket.SHUT_WR); s.settimeout(5); s.recv(1); s.close()
"""

DNS_QUERIES = """
import socket, struct, sys
server, name, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\\0\\0\\1\\0\\1"
answered = 0
for i in range(count):  # one socket: after the first answer the flow is established
    s.sendto(struct.pack(">HHHHHH", i, 0x100, 1, 0, 0, 0) + question, (server, 53))
    try:
        while struct.unpack(">H", s.recv(512)[:2])[0] != i:
            pass
        answered += 1
    except OSError:
        pass
print(answered, flush=True)
"""


async def run_in_guest(world: World, script: str, *args: object) -> int:
    out = await sh(
        "ip", "netns", "exec", f"{world.tag}ga", sys.executable, "-c", script,
        *(str(a) for a in args),
    )  # fmt: skip
    return int(out.stdout.strip())


async def test_a_guest_holds_at_most_its_connection_limit(tmp_path: Path) -> None:
    """B3: beyond ``connections`` open flows a guest's new ones are dropped, so one guest
    cannot fill the host's conntrack table; closed flows free their places."""
    async with open_world(tmp_path, egress_limits=EgressLimits(connections=4)) as world:
        await world.vm_with_guest("a", egress=True)
        await world.serve("hold", f"{world.tag}i", INTERNET_IP, HOLD_PORT, "internet")

        held = await run_in_guest(world, CONNECT, INTERNET_IP, HOLD_PORT, 7, ATTEMPT_TIMEOUT, 1)
        assert held == 4
        # The four closed (the script waited for that): four new ones fit again.
        again = await run_in_guest(world, CONNECT, INTERNET_IP, HOLD_PORT, 4, ATTEMPT_TIMEOUT, 5)
        assert again == 4


async def test_a_guest_opens_new_connections_at_most_at_its_rate(tmp_path: Path) -> None:
    """B3: a flood or a scan of new connections is cut to the rate after the burst."""
    limits = EgressLimits(new_per_minute=1, new_burst=3)
    async with open_world(tmp_path, egress_limits=limits) as world:
        await world.vm_with_guest("a", egress=True)
        await world.serve("hold", f"{world.tag}i", INTERNET_IP, HOLD_PORT, "internet")

        opened = await run_in_guest(world, CONNECT, INTERNET_IP, HOLD_PORT, 8, ATTEMPT_TIMEOUT, 1)
        assert opened == 3


async def test_a_guest_asks_the_resolver_at_most_at_its_rate(tmp_path: Path) -> None:
    """B4: every query counts, also those on one socket whose flow is already established."""
    limits = EgressLimits(dns_per_minute=1, dns_burst=5)
    async with open_world(tmp_path, egress_limits=limits) as world:
        await world.vm_with_guest("a", egress=True)

        answered = await run_in_guest(
            world, DNS_QUERIES, "10.0.2.2", "example.test", 9, ATTEMPT_TIMEOUT
        )
        assert answered == 5


UNREACHABLE_ANSWERS = (
    "192-168-1-5", "10-1-2-3", "172-16-0-9", "127-0-0-1", "169-254-169-254",
    "100-64-1-1", "198-18-0-1", "0-0-0-0",
)  # fmt: skip
"""Addresses the host's resolver may know (LAN, VPN, metadata, loopback) that no guest
reaches; dnsmasq turns each into NXDOMAIN, which the probe reports as NOANSWER."""


@pytest.fixture
def upstream_list() -> Iterator[Path]:
    """A resolv.conf naming the stand-in internet's DNS server, where dnsmasq (``nobody``)
    can read it: pytest's tmp_path is root's alone."""
    folder = Path(tempfile.mkdtemp(prefix="embervm-upstream-"))
    try:
        folder.chmod(0o755)
        (folder / "resolv.conf").write_text(f"nameserver {INTERNET_IP}\n")
        yield folder / "resolv.conf"
    finally:
        shutil.rmtree(folder)


async def test_the_resolver_tells_a_guest_no_host_local_names(
    tmp_path: Path, upstream_list: Path
) -> None:
    """B4: the upstream here answers every name; the resolver passes on only public answers,
    never forwards localhost or plain names."""
    async with open_world(tmp_path, resolv_file=upstream_list) as world:
        await world.vm_with_guest("a", egress=True)
        await world.serve("dns", f"{world.tag}i", INTERNET_IP, 53, "upstream")

        async def ask(name: str) -> str | None:
            return await world.probe(f"{world.tag}ga", "dns", "10.0.2.2", 53, name)

        assert await ask("ip-8-8-4-4.example.com") == "8.8.4.4"  # public answers pass
        # so do the documentation ranges, which guests reach (registries may live there)
        assert await ask("ip-203-0-113-80.example.com") == "203.0.113.80"
        for unreachable in UNREACHABLE_ANSWERS:
            assert await ask(f"ip-{unreachable}.corp.example.com") == "NOANSWER", unreachable
        assert await ask("ip-8-8-4-4.localhost") == "NOANSWER"  # never forwarded
        assert await ask("ip-8-8-4-4") == "NOANSWER"  # a plain name, never forwarded
