"""The VM network against the real kernel: namespaces, veths, nftables, dnsmasq.

The guests are veth stand-ins and the internet a namespace (``conftest``), except in the one
test that boots a real QEMU guest on the real tap. Every negative probe targets a server that
exists (so success would show a hole), and each test has a positive control, so no test passes
because nothing works.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from tests.framework.network_netns_world import (
    API_PORT,
    CLIENT,
    GUEST_PORT,
    INTERNET_IP,
    INTERNET_LINK_HOST,
    PROBE_TIMEOUT,
    World,
    exists,
    host_probe,
    leftovers,
    new_tag,
    sh,
)

from embervm.errors import NetworkSetupError
from embervm.guest.artifacts import host_tsc_khz
from embervm.network import (
    GATEWAY_MAC,
    CommandResult,
    NetworkManager,
    SubprocessRunner,
    open_tap,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "nft", "dnsmasq")),
        reason="needs root, iproute2, nftables and dnsmasq",
    ),
    pytest.mark.timeout(120),
]


async def test_host_reaches_guest_port_through_vm_address(world: World) -> None:
    net = await world.vm_with_guest("a", egress=False)

    assert await host_probe(net.vm_address, GUEST_PORT) == f"guest-a {net.host_ip}"


async def test_only_the_server_user_reaches_a_vm_from_the_host(world: World) -> None:
    """A13: a connection from another local user would skip the proxy's token and port checks.
    The server is root here; ``nobody`` stands for any other user or service on the host."""
    net = await world.vm_with_guest("a", egress=False)
    port = 18000 + secrets.randbelow(1000)
    await world.serve_on_host("127.0.0.1", port, "host")

    assert await host_probe(net.vm_address, GUEST_PORT) == f"guest-a {net.host_ip}"
    assert await nobody_probe("127.0.0.1", port) == "host 127.0.0.1"  # nobody's client works
    assert await nobody_probe(net.vm_address, GUEST_PORT) is None


async def nobody_probe(host: str, port: int) -> str | None:
    """What a TCP client running as ``nobody`` on the host gets back, or None."""
    out = await sh(
        "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
        CLIENT, "tcp", host, str(port), "-", str(PROBE_TIMEOUT),
    )  # fmt: skip
    status, _, rest = out.stdout.strip().partition(" ")
    return rest if status == "OK" else None


async def test_guest_cannot_reach_host_services_on_any_host_address(world: World) -> None:
    net = await world.vm_with_guest("a", egress=True)
    guest = f"{world.tag}ga"
    port = 18000 + secrets.randbelow(1000)
    host_addresses = [net.host_ip, world.manager.resolver_ip, INTERNET_LINK_HOST]
    for addr in host_addresses:
        await world.serve_on_host(addr, port, "host")

    for addr in host_addresses:
        assert await host_probe(addr, port) is not None  # the services exist
        assert await world.probe(guest, "tcp", addr, port) is None, addr
    await world.serve("tcp", f"{world.tag}i", INTERNET_IP, port, "internet")
    assert await world.probe(guest, "tcp", INTERNET_IP, port) is not None  # egress itself works


async def test_guest_cannot_reach_host_loopback_services(world: World) -> None:
    """127.0.0.1 from the guest is its own loopback; the host's is reachable only if a rule or
    sysctl (route_localnet) let the guest's packets in: try every host address it could use."""
    net = await world.vm_with_guest("a", egress=True)
    guest = f"{world.tag}ga"
    port = 19000 + secrets.randbelow(1000)
    await world.serve_on_host("127.0.0.1", port, "loopback")
    assert await host_probe("127.0.0.1", port) == "loopback 127.0.0.1"

    for addr in ("127.0.0.1", "10.0.2.2", net.host_ip, world.manager.resolver_ip):
        assert await world.probe(guest, "tcp", addr, port) is None, addr


async def test_guest_cannot_reach_control_api_port(world: World) -> None:
    net = await world.vm_with_guest("a", egress=True)
    guest = f"{world.tag}ga"
    for addr in (net.host_ip, INTERNET_LINK_HOST):
        await world.serve_on_host(addr, API_PORT, "api")
        assert await host_probe(addr, API_PORT) is not None
        assert await world.probe(guest, "tcp", addr, API_PORT) is None, addr


async def test_guest_cannot_reach_another_vm(world: World) -> None:
    a = await world.vm_with_guest("a", egress=True)
    b = await world.vm_with_guest("b", egress=True)

    assert await host_probe(b.vm_address, GUEST_PORT) == f"guest-b {b.host_ip}"
    assert await host_probe(a.vm_address, GUEST_PORT) == f"guest-a {a.host_ip}"
    for target in (b.vm_address, b.host_ip):
        assert await world.probe(f"{world.tag}ga", "tcp", target, GUEST_PORT) is None, target
    assert await world.probe(f"{world.tag}gb", "tcp", a.vm_address, GUEST_PORT) is None


async def test_egress_reaches_internet_through_nat(world: World) -> None:
    await world.vm_with_guest("a", egress=True)
    await world.serve("tcp", f"{world.tag}i", INTERNET_IP, 443, "internet")

    reply = await world.probe(f"{world.tag}ga", "tcp", INTERNET_IP, 443)

    assert reply == f"internet {INTERNET_LINK_HOST}"  # masqueraded to the host's address


async def test_outbound_udp_is_dropped_except_dns(world: World) -> None:
    await world.vm_with_guest("a", egress=True)
    guest = f"{world.tag}ga"
    await world.serve("udp", f"{world.tag}i", INTERNET_IP, 5353, "internet-udp")
    assert await world.probe(f"{world.tag}i", "udp", INTERNET_IP, 5353) is not None

    assert await world.probe(guest, "udp", INTERNET_IP, 5353) is None
    assert await world.probe(guest, "dns", "10.0.2.2", 53, "example.test") == INTERNET_IP


async def test_no_egress_and_no_dns_without_the_flag(world: World) -> None:
    await world.vm_with_guest("on", egress=True)
    await world.vm_with_guest("off", egress=False)
    await world.serve("tcp", f"{world.tag}i", INTERNET_IP, 443, "internet")

    assert await world.probe(f"{world.tag}gon", "tcp", INTERNET_IP, 443) is not None
    assert await world.probe(f"{world.tag}goff", "tcp", INTERNET_IP, 443) is None
    assert await world.probe(f"{world.tag}goff", "dns", "10.0.2.2", 53, "example.test") is None


async def test_spoofed_guest_source_is_dropped(world: World) -> None:
    await world.vm_with_guest("a", egress=True)
    guest = f"{world.tag}ga"
    await sh("ip", "-n", guest, "addr", "add", "10.0.2.99/24", "dev", "eth0")
    await world.serve("tcp", f"{world.tag}i", INTERNET_IP, 443, "internet")

    assert await world.probe(guest, "tcp", INTERNET_IP, 443, "10.0.2.15") is not None
    assert await world.probe(guest, "tcp", INTERNET_IP, 443, "10.0.2.99") is None


async def test_ingress_only_from_the_host_side_of_its_own_veth(world: World) -> None:
    net = await world.vm_with_guest("a", egress=True)
    inet = f"{world.tag}i"
    pool = str(world.manager.pool)  # the internet side learns a route into the pool
    await sh("ip", "-n", inet, "route", "add", pool, "via", INTERNET_LINK_HOST)

    assert await host_probe(net.vm_address, GUEST_PORT) is not None
    assert await world.probe(inet, "tcp", net.vm_address, GUEST_PORT) is None


async def test_destroy_and_reclaim_leave_nothing_behind(world: World, tmp_path: Path) -> None:
    a = await world.vm_with_guest("a", egress=True)
    await world.manager.create(f"{world.tag}-vm-b", egress=False)
    await world.manager.create(f"{world.tag}-vm-c", egress=True)

    await world.manager.destroy(a.vm_id)
    await world.manager.destroy(a.vm_id)  # idempotent
    assert not exists(f"/run/netns/{a.netns}")
    assert not exists(f"/sys/class/net/{a.host_link}")
    assert a.host_link not in (await sh("nft", "list", "table", "inet", world.manager.table)).stdout

    # A crash: the server goes away with VMs b and c still allocated, then comes back with
    # only c alive. The old manager's stop() keeps the table because VMs remain.
    await world.manager.stop()
    restarted = NetworkManager(
        world.state_dir, pool=str(world.manager.pool), api_ports=[API_PORT], tag=world.tag
    )
    world.manager = restarted
    await restarted.start()
    c = restarted.lookup(f"{world.tag}-vm-c")
    assert c is not None
    assert c.egress
    removed = await restarted.reclaim_leftovers({c.vm_id})
    assert f"allocation {world.tag}-vm-b" in removed
    assert restarted.lookup(f"{world.tag}-vm-b") is None
    remaining = await leftovers(world.tag, restarted.table)
    assert sorted(r.split()[0] for r in remaining) == ["link", "link", "netns", "table"]
    assert c.host_link in (await sh("nft", "list", "table", "inet", restarted.table)).stdout

    await restarted.reclaim_leftovers(set())
    ruleset = (await sh("nft", "list", "ruleset")).stdout
    assert c.host_link not in ruleset
    assert sorted(r.split()[0] for r in await leftovers(world.tag, restarted.table)) == [
        "link",
        "table",
    ]  # only the host-wide resolver link and table remain until stop()


async def test_create_converges_after_a_half_done_create(world: World) -> None:
    vm_id = f"{world.tag}-vm-a"
    first = await world.manager.create(vm_id, egress=False)
    await sh("ip", "-n", first.netns, "link", "del", first.tap)  # as if create had died

    again = await world.manager.create(vm_id, egress=True)

    assert again.vm_address == first.vm_address
    links = (await sh("ip", "-n", again.netns, "-o", "link", "show")).stdout
    assert f" {again.tap}:" in links
    rules = (await sh("ip", "netns", "exec", again.netns, "nft", "list", "ruleset")).stdout
    assert "dport 53" in rules  # rebuilt with egress
    egress_links = ("nft", "list", "set", "inet", world.manager.table, "egress_links")
    assert again.host_link in (await sh(*egress_links)).stdout

    await world.manager.create(vm_id, egress=False)
    assert again.host_link not in (await sh(*egress_links)).stdout


class FailingRunner(SubprocessRunner):
    """The real runner, except that the tap creation fails, to exercise the LIFO cleanup."""

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        time_limit: float = 10.0,
    ) -> CommandResult:
        if input and "tuntap add" in input:
            argv = ["ip", "-n", "nonexistent-embervm-ns", "link", "show"]
        return await super().run(argv, input=input, check=check, time_limit=time_limit)


async def test_failed_create_undoes_what_it_did(world: World) -> None:
    tag = new_tag()
    manager = NetworkManager(
        world.state_dir / "failing", pool="10.215.250.0/26", tag=tag, runner=FailingRunner()
    )
    await manager.start()
    try:
        with pytest.raises(NetworkSetupError, match="nonexistent-embervm-ns"):
            await manager.create(f"{tag}-vm-x", egress=True)
        assert manager.lookup(f"{tag}-vm-x") is None
        # Only the host-wide pieces remain, and stop() removes them.
        assert [r.split()[0] for r in await leftovers(tag, manager.table)] == ["link", "table"]
    finally:
        await manager.stop()
    assert await leftovers(tag, manager.table) == []


async def test_open_tap_gives_an_unprivileged_qemu_the_guest_nic(world: World) -> None:
    net = await world.manager.create(f"{world.tag}-vm-q", egress=False)
    fd = await open_tap(net.netns_path, net.tap)
    try:
        flags = (await sh("ip", "-n", net.netns, "-o", "link", "show", net.tap)).stdout
        assert "NO-CARRIER" not in flags  # something is attached now
        if shutil.which("qemu-system-x86_64") is None:
            return
        qemu = await asyncio.create_subprocess_exec(
            "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
            "qemu-system-x86_64", "-machine", "microvm", "-nodefaults", "-display", "none",
            "-S", "-netdev", f"tap,id=n0,fd={fd}", "-device", "virtio-net-device,netdev=n0",
            "-qmp", "stdio",
            pass_fds=[fd], stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        qmp = b'{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n'
        out, err = await asyncio.wait_for(qemu.communicate(qmp), 60)
        assert qemu.returncode == 0, err.decode()
        assert b"host-qmp-quit" in out
    finally:
        os.close(fd)
    flags = (await sh("ip", "-n", net.netns, "-o", "link", "show", net.tap)).stdout
    assert "NO-CARRIER" in flags


GUEST_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m 2>/dev/null; done
ip link set lo up; ip link set eth0 up
ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
mkdir -p /www; echo hello-from-qemu > /www/index.html; httpd -p 8080 -h /www
echo "EGRESS $(nc -w 3 {internet} 443 </dev/null)" > /dev/console
echo "DNS $(nslookup example.test 10.0.2.2 2>&1 | grep -c {internet})" > /dev/console
echo "HOST $(nc -w 3 {host_ip} {host_port} </dev/null)." > /dev/console
echo "UDP $(nslookup other.test {internet} 2>&1 | grep -c 198.51.100.77)" > /dev/console
echo PROBES-DONE > /dev/console
while true; do sleep 60; done
"""


def probe_initramfs_tree(dest: Path, modules: Path, **values: object) -> Path:
    """busybox, the virtio modules and GUEST_INIT with ``values`` filled in."""
    root = dest / "initramfs"
    for sub in ("bin", "proc", "sys", "dev", "modules", "tmp"):
        (root / sub).mkdir(parents=True)
    shutil.copy("/bin/busybox", root / "bin" / "busybox")
    for module in modules.iterdir():
        shutil.copy(module, root / "modules" / module.name)
    init = root / "init"
    init.write_text(GUEST_INIT.format(**values))
    init.chmod(0o755)
    return root


async def build_probe_initramfs(dest: Path, modules: Path, **values: object) -> Path:
    root = probe_initramfs_tree(dest, modules, **values)
    await sh("sh", "-c", f"cd {root} && find . | cpio -o -H newc --quiet > {dest / 'initrd'}")
    return dest / "initrd"


async def http_get(host: str, port: int) -> str | None:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return data.decode(errors="replace")
    except (OSError, TimeoutError):
        return None


async def test_real_qemu_guest_on_the_tap_gets_the_same_isolation(
    world: World, tmp_path: Path, guest_artifacts: Any
) -> None:
    """The stand-in above is a veth; here a real TCG guest sits on the real tap."""
    if shutil.which("qemu-system-x86_64") is None or shutil.which("cpio") is None:
        pytest.skip("needs qemu-system-x86_64 and cpio")
    net = await world.manager.create(f"{world.tag}-vm-real", egress=True)
    host_port = 18000 + secrets.randbelow(1000)
    await world.serve_on_host(net.host_ip, host_port, "host")
    await world.serve("tcp", f"{world.tag}i", INTERNET_IP, 443, "internet")
    await world.serve("dns", f"{world.tag}i", INTERNET_IP, 53, "internet-dns")
    assert await world.probe(f"{world.tag}i", "dns", INTERNET_IP, 53, "other.test") == (
        "198.51.100.77"
    )  # the outside resolver works; the guest just may not use it
    kernel = Path(guest_artifacts.kernel)
    initrd = await build_probe_initramfs(
        tmp_path, kernel.parent / "modules", internet=INTERNET_IP, host_ip=net.host_ip,
        host_port=host_port,
    )  # fmt: skip
    console = tmp_path / "console.log"
    tsc = host_tsc_khz()
    machine = "microvm,pit=off,pic=off" if tsc else "microvm"
    cmdline = "console=ttyS0 quiet panic=-1 reboot=k mitigations=off rdinit=/init" + (
        f" tsc_early_khz={tsc}" if tsc else ""
    )
    fd = await open_tap(net.netns_path, net.tap)
    try:
        qemu = await asyncio.create_subprocess_exec(
            "qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
            "-M", machine, "-accel", "tcg,thread=single", "-cpu", "max", "-smp", "1",
            "-m", "128M", "-kernel", str(kernel), "-initrd", str(initrd), "-append", cmdline,
            "-serial", f"file:{console}", "-netdev", f"tap,id=n0,fd={fd}",
            "-device", f"virtio-net-device,netdev=n0,mac={net.guest_mac}",
            pass_fds=[fd], stdin=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        os.close(fd)
    world.procs.append(qemu)
    page = None
    for _ in range(120):
        page = await http_get(net.vm_address, GUEST_PORT)
        text = console.read_text(errors="replace") if console.exists() else ""
        if page and "PROBES-DONE" in text:
            break
        await asyncio.sleep(0.5)
    text = console.read_text(errors="replace")
    assert page is not None, text
    assert "hello-from-qemu" in page
    assert f"EGRESS internet {INTERNET_LINK_HOST}" in text
    assert "DNS 1" in text
    assert "HOST ." in text  # the host service answered nothing
    assert "UDP 0" in text


async def test_concurrent_creates_get_distinct_working_networks(world: World) -> None:
    ids = [f"{world.tag}-vm-c{i}" for i in range(8)]
    nets = await asyncio.gather(*(world.manager.create(i, egress=i.endswith("0")) for i in ids))

    assert len({n.vm_address for n in nets}) == len(ids)
    assert len({n.netns for n in nets}) == len(ids)
    for net in nets:
        addrs = (await sh("ip", "-n", net.netns, "-o", "addr", "show", "veth0")).stdout
        assert f"{net.vm_address}/30" in addrs
    sets = (await sh("nft", "list", "set", "inet", world.manager.table, "vm_sources")).stdout
    assert all(n.vm_address in sets for n in nets)

    await asyncio.gather(*(world.manager.destroy(i) for i in ids))
    assert [r for r in await leftovers(world.tag, world.manager.table) if "netns" in r] == []


async def test_every_vm_tap_has_the_same_gateway_mac(world: World) -> None:
    """A restored snapshot brings the guest's ARP cache from the VM it was taken in, and a tap
    drops frames for other MACs: so the gateway MAC must be the same in every VM."""
    for name in ("a", "b"):
        net = await world.manager.create(f"{world.tag}-vm-{name}", egress=False)
        link = (await sh("ip", "-n", net.netns, "-o", "link", "show", net.tap)).stdout
        assert f"link/ether {GATEWAY_MAC} " in link
