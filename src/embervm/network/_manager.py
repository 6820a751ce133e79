"""``NetworkManager``: the host-wide set-up and one isolated network per VM.

Per VM (names from ``_names``, addresses from ``_addressing``)::

    host netns                         VM netns emb-<short>                 guest (QEMU)
    ev<short> 10.213.x.1/30 ──veth── veth0 10.213.x.2/30   tap0 10.0.2.2/24 ── eth0 10.0.2.15
                                       DNAT x.2 -> 10.0.2.15 (ingress)
                                       SNAT 10.0.2.15 -> x.2  (egress)

``create`` records the allocation first, then builds the pieces in an order that never leaves a
VM link outside the host table's sets, with a LIFO cleanup stack that undoes a partial create.
``create`` on a VM that already has (part of) a network tears it down first, so retrying after a
crash converges. ``destroy`` is idempotent; ``reclaim_leftovers`` finds what a crash left by the
allocation files, the namespace names and the host links' aliases.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from embervm.errors import NetworkSetupError

from ._addressing import (
    BLOCKED_IPV4,
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    GUEST_PREFIX,
    Pool,
)
from ._allocations import Allocation, AllocationStore, write_json_atomic
from ._commands import CommandRunner, SubprocessRunner
from ._names import (
    DEFAULT_TAG,
    VmNames,
    check_tag,
    link_alias_prefix,
    netns_prefix,
    resolver_link,
    table_name,
)
from ._resolver import Resolver
from ._rules import (
    EgressLimits,
    HostVmEntry,
    render_host_table,
    render_host_vm_elements,
    render_netns_table,
)


@dataclass(frozen=True)
class HostPaths:
    """Where the kernel shows namespaces, links and sysctls (tests point these elsewhere)."""

    netns_dir: Path = Path("/run/netns")
    sys_net: Path = Path("/sys/class/net")
    proc_sys_net: Path = Path("/proc/sys/net")


class ResolverProcess(Protocol):
    """The DNS resolver's process (``_resolver.Resolver``; a fake in unit tests)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


@dataclass(frozen=True)
class VmNetwork:
    """Everything the VMM and the proxy need to know about one VM's network."""

    vm_id: str
    netns: str
    """Network namespace to run QEMU in (``ip netns exec <netns> ...``)."""
    tap: str
    """Tap device inside ``netns`` for QEMU's ``-netdev tap,ifname=<tap>``."""
    host_link: str
    host_ip: str
    """Host side of the veth: the source address of the proxy's connections."""
    vm_address: str
    """Connect here (any port) to reach the guest's same port."""
    egress: bool
    guest_ip: str = GUEST_IP
    guest_prefix: int = GUEST_PREFIX
    gateway: str = GATEWAY_IP
    dns: str = GATEWAY_IP
    """The guest's resolver; it answers only when ``egress`` is on."""
    guest_mac: str = GUEST_MAC
    gateway_mac: str = GATEWAY_MAC

    @property
    def netns_path(self) -> Path:
        """For ``nsenter --net=<path>`` or ``setns(2)``."""
        return HostPaths.netns_dir / self.netns


#: Run in the VM's namespace: its sysctls, then its nftables rules from stdin.
_NETNS_SETUP = (
    "sysctl -q -w net.ipv4.ip_forward=1 net.ipv6.conf.all.disable_ipv6=1"
    " net.ipv6.conf.default.disable_ipv6=1 && exec nft -f -"
)


async def _all(*steps: Awaitable[object]) -> None:
    """Run independent steps at once; the first failure is raised after all have ended (so
    nothing still runs while the caller undoes)."""
    results = await asyncio.gather(*steps, return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result


def _write_sysctl(path: Path, value: str) -> None:
    """Set a sysctl of the host namespace; absent keys (IPv6 disabled at boot) are fine."""
    with contextlib.suppress(FileNotFoundError):
        path.write_text(value)


def _list_netns(netns_dir: Path, prefix: str) -> list[str]:
    """Named network namespaces starting with ``prefix``."""
    try:
        return sorted(e for e in os.listdir(netns_dir) if e.startswith(prefix))
    except FileNotFoundError:
        return []


class NetworkManager:
    """Host-wide network set-up and per-VM isolated networks (see module docstring)."""

    def __init__(
        self,
        state_dir: Path,
        *,
        pool: str = "10.213.0.0/16",
        api_ports: Iterable[int] = (),
        protected_ports: Iterable[int] = (),
        tag: str = DEFAULT_TAG,
        resolver_port: int = 53,
        resolv_file: Path | None = None,
        dns_overrides: Mapping[str, str] | None = None,
        egress_limits: EgressLimits | None = None,
        runner: CommandRunner | None = None,
        resolver: ResolverProcess | None = None,
        paths: HostPaths | None = None,
    ) -> None:
        """``api_ports``/``protected_ports``: host TCP ports no guest may reach on any address
        (the guest reaches no host port anyway; these are named for defence in depth).
        ``tag`` separates managers sharing a host (tests); ``dns_overrides`` maps names to
        fixed addresses in the resolver (tests); ``egress_limits`` bound what each egress guest
        may start (default ``EgressLimits()``)."""
        self._state_dir = state_dir
        self._pool = Pool(pool)
        self._ports = sorted({*api_ports, *protected_ports})
        self._tag = check_tag(tag)
        self._table = table_name(tag)
        self._dns_link = resolver_link(tag)
        self._resolver_port = resolver_port
        self._egress_limits = egress_limits or EgressLimits()
        self._runner: CommandRunner = runner or SubprocessRunner()
        self._store = AllocationStore(state_dir, self._pool)
        self._resolver: ResolverProcess = resolver or Resolver(
            state_dir,
            listen_ip=self._pool.resolver_ip,
            port=resolver_port,
            resolv_file=resolv_file,
            overrides=dns_overrides,
            unreachable=(*BLOCKED_IPV4, str(self._pool)),
        )
        self._paths = paths or HostPaths()
        self._host_state = state_dir / "host.json"
        self._vm_locks: dict[str, asyncio.Lock] = {}
        self._started = False

    @property
    def pool(self) -> str:
        """The IPv4 range VM blocks come from."""
        return str(self._pool)

    @property
    def resolver_ip(self) -> str:
        return self._pool.resolver_ip

    @property
    def table(self) -> str:
        """Name of the host-wide nftables table (family ``inet``)."""
        return self._table

    # ---- host-wide ---------------------------------------------------------------------

    async def start(self) -> None:
        """Host table, resolver address and process, IPv4 forwarding. Idempotent; after a
        restart it re-adopts the VMs whose allocations survive."""
        await self._refuse_a_pool_in_use()
        self._state_dir.mkdir(parents=True, exist_ok=True)
        self._store.open()
        try:
            forwarding_before = self._forwarding_before()
            await self._apply_host_table(isolate_forwarding=forwarding_before == "0")
            await self._ensure_resolver_link()
            _write_sysctl(self._paths.proc_sys_net / "ipv4" / "ip_forward", "1")
            await self._resolver.start()
        except BaseException:
            with contextlib.suppress(Exception):
                await self.stop()
            raise
        self._started = True

    async def _refuse_a_pool_in_use(self) -> None:
        """Fail when a host link that is not this manager's holds an address of the pool.

        Each VM block gets a connected route (``pool + 4i /30``) on its host veth; a second
        link carrying an address of the same block (another server's network, or what a dead
        one left) adds a second route to the same /30, the kernel picks one of them, and the
        proxy's connections to the VM go to the other network: 502 "the app is not answering"
        with nothing wrong on this side. Another manager on the same pool always shows, by
        its resolver link (the pool's first address) if not by a VM link."""
        out = await self._runner.run(["ip", "-j", "-d", "addr", "show"])
        alias_prefix = link_alias_prefix(self._tag)
        for link in json.loads(out.stdout or "[]"):
            name, alias = str(link.get("ifname", "")), str(link.get("ifalias", ""))
            if name == self._dns_link or alias.startswith(alias_prefix):
                continue
            for addr in link.get("addr_info", []):
                if addr.get("family") == "inet" and self._holds(str(addr["local"])):
                    owner = f" ({alias})" if alias else ""
                    raise NetworkSetupError(
                        f"network pool {self._pool} is in use on this host: {addr['local']} is on "
                        f"{name}{owner}; choose another pool (--network-pool) or remove that link"
                    )

    def _holds(self, address: str) -> bool:
        return ipaddress.IPv4Address(address) in self._pool.network

    def _forwarding_before(self) -> str:
        """IPv4 forwarding as it was before any manager on this state dir switched it on."""
        try:
            return str(json.loads(self._host_state.read_text())["ip_forward_before"])
        except (OSError, ValueError, KeyError):
            pass
        current = (self._paths.proc_sys_net / "ipv4" / "ip_forward").read_text().strip()
        write_json_atomic(self._host_state, {"ip_forward_before": current})
        return current

    async def _apply_host_table(self, *, isolate_forwarding: bool) -> None:
        entries = [self._entry(a) for a in self._store.all()]
        text = render_host_table(
            self._table,
            pool=str(self._pool),
            resolver_ip=self._pool.resolver_ip,
            resolver_port=self._resolver_port,
            protected_ports=self._ports,
            vms=entries,
            isolate_forwarding=isolate_forwarding,
            server_uid=os.geteuid(),
        )
        await self._runner.run(["nft", "-f", "-"], input=text)

    async def _ensure_resolver_link(self) -> None:
        link = self._dns_link
        if not (self._paths.sys_net / link).exists():
            # A dummy device if the kernel has one, else a bridge without ports: either only
            # carries a local address.
            made = await self._runner.run(["ip", "link", "add", link, "type", "dummy"], check=False)
            if made.returncode != 0:
                await self._runner.run(["ip", "link", "add", link, "type", "bridge"])
        _write_sysctl(self._paths.proc_sys_net / "ipv6" / "conf" / link / "disable_ipv6", "1")
        await self._runner.run(
            ["ip", "-batch", "-"],
            input=f"addr replace {self._pool.resolver_ip}/32 dev {link}\nlink set {link} up\n",
        )

    async def stop(self) -> None:
        """Stop the resolver. With no VM networks left, also remove the host table and the
        resolver link and restore IPv4 forwarding; otherwise keep them, so that VMs outliving
        the server (it reattaches after a restart) stay isolated."""
        await self._resolver.stop()
        self._store.open()
        if not self._store.all():
            await self._runner.run(
                ["nft", "-f", "-"],
                input=f"table inet {self._table} {{}}\ndelete table inet {self._table}\n",
            )
            if (self._paths.sys_net / self._dns_link).exists():
                await self._runner.run(["ip", "link", "del", self._dns_link])
            try:
                before = str(json.loads(self._host_state.read_text())["ip_forward_before"])
            except (OSError, ValueError, KeyError):
                before = None
            if before == "0":
                _write_sysctl(self._paths.proc_sys_net / "ipv4" / "ip_forward", "0")
            with contextlib.suppress(FileNotFoundError):
                self._host_state.unlink()
        self._store.close()
        self._started = False

    # ---- per VM ------------------------------------------------------------------------

    def _entry(self, alloc: Allocation) -> HostVmEntry:
        names = VmNames.derive(alloc.vm_id, self._tag)
        return HostVmEntry(names.host_link, self._pool.block(alloc.block).vm_address, alloc.egress)

    def _network(self, alloc: Allocation) -> VmNetwork:
        names = VmNames.derive(alloc.vm_id, self._tag)
        block = self._pool.block(alloc.block)
        return VmNetwork(
            vm_id=alloc.vm_id,
            netns=names.netns,
            tap=names.tap,
            host_link=names.host_link,
            host_ip=block.host_ip,
            vm_address=block.vm_address,
            egress=alloc.egress,
        )

    def lookup(self, vm_id: str) -> VmNetwork | None:
        """The VM's network as allocated (e.g. to reattach after a restart), or None."""
        self._store.open()
        alloc = self._store.get(vm_id)
        return self._network(alloc) if alloc else None

    def _vm_lock(self, vm_id: str) -> asyncio.Lock:
        return self._vm_locks.setdefault(vm_id, asyncio.Lock())

    async def create(
        self,
        vm_id: str,
        *,
        egress: bool,
        tap_uid: int | None = None,
        tap_gid: int | None = None,
    ) -> VmNetwork:
        """Build the VM's namespace, tap, veth and rules; ``tap_uid``/``tap_gid`` own the tap
        so an unprivileged QEMU can open it. Re-running it rebuilds from scratch."""
        if not self._started:
            raise NetworkSetupError("NetworkManager.start() must run before create()")
        async with self._vm_lock(vm_id):
            alloc = await self._store.allocate(vm_id, egress=egress)
            net = self._network(alloc)
            names = VmNames.derive(vm_id, self._tag)
            await self._teardown(names)
            async with contextlib.AsyncExitStack() as undo:
                undo.push_async_callback(self._store.release, vm_id)
                await self._build(net, names, undo, tap_uid=tap_uid, tap_gid=tap_gid)
                undo.pop_all()
            return net

    async def _build(
        self,
        net: VmNetwork,
        names: VmNames,
        undo: contextlib.AsyncExitStack,
        *,
        tap_uid: int | None,
        tap_gid: int | None,
    ) -> None:
        run = self._runner.run
        ns = net.netns
        entry = HostVmEntry(net.host_link, net.vm_address, net.egress)

        def later(fn: Callable[[], Awaitable[object]]) -> None:
            undo.push_async_callback(fn)

        netns_rules = render_netns_table(
            tap=net.tap,
            netns_link=names.netns_link,
            host_ip=net.host_ip,
            vm_address=net.vm_address,
            resolver_ip=self._pool.resolver_ip,
            resolver_port=self._resolver_port,
            egress=net.egress,
            limits=self._egress_limits,
        )

        async def make_netns() -> None:
            await run(["ip", "netns", "add", ns])
            # Sysctls and the namespace's rules in one process (each spawn costs ~5-15 ms).
            await run([
                "ip", "netns", "exec", ns, "sh", "-c", _NETNS_SETUP, "embervm-netns-setup",
            ], input=netns_rules)  # fmt: skip

        # The undo steps tolerate absence, so they are pushed before the steps run: the two
        # independent first steps run at once and either may be the one that fails.
        later(lambda: run(["ip", "netns", "del", ns], check=False))
        later(lambda: self._forget_elements(entry))
        # The host table's sets learn the link before it exists, let alone carries traffic.
        await _all(
            make_netns(),
            run(["nft", "-f", "-"], input=render_host_vm_elements(self._table, entry, add=True)),
        )
        link = net.host_link
        later(lambda: run(["ip", "link", "del", link], check=False))
        await run([
            "ip", "link", "add", link, "type", "veth", "peer", "name", names.netns_link,
            "netns", ns,
        ])  # fmt: skip
        _write_sysctl(self._paths.proc_sys_net / "ipv6" / "conf" / link / "disable_ipv6", "1")
        owner = (f" user {tap_uid}" if tap_uid is not None else "") + (
            f" group {tap_gid}" if tap_gid is not None else ""
        )
        await _all(
            run(
                ["ip", "-batch", "-"],
                input=(
                    f'link set dev {link} alias "{names.alias}"\n'
                    f"addr add {net.host_ip}/30 dev {link}\n"
                    f"link set dev {link} up\n"
                ),
            ),
            run(
                ["ip", "-n", ns, "-batch", "-"],
                input=(
                    f"link set lo up\n"
                    f"addr add {net.vm_address}/30 dev {names.netns_link}\n"
                    f"link set {names.netns_link} up\n"
                    f"route add default via {net.host_ip} dev {names.netns_link}\n"
                    f"tuntap add dev {net.tap} mode tap{owner}\n"
                    f"link set dev {net.tap} address {GATEWAY_MAC}\n"
                    f"addr add {net.gateway}/{net.guest_prefix} dev {net.tap}\n"
                    f"link set {net.tap} up\n"
                ),
            ),
        )

    async def _forget_elements(self, entry: HostVmEntry) -> None:
        await self._runner.run(
            ["nft", "-f", "-"],
            input=render_host_vm_elements(self._table, entry, add=False),
            check=False,
        )

    async def _teardown(self, names: VmNames, entry: HostVmEntry | None = None) -> None:
        """Remove whatever exists of a VM's network (each step tolerates absence)."""
        if (self._paths.netns_dir / names.netns).exists():
            await self._runner.run(["ip", "netns", "del", names.netns])
        if (self._paths.sys_net / names.host_link).exists():
            await self._runner.run(["ip", "link", "del", names.host_link], check=False)
        if entry is not None:
            await self._forget_elements(entry)

    async def destroy(self, vm_id: str) -> None:
        """Remove the VM's namespace, veth, host set entries and allocation (idempotent).
        The VMM must have exited: a process inside keeps the namespace alive."""
        async with self._vm_lock(vm_id):
            self._store.open()
            alloc = self._store.get(vm_id)
            names = VmNames.derive(vm_id, self._tag)
            await self._teardown(names, self._entry(alloc) if alloc else None)
            await self._store.release(vm_id)
        self._vm_locks.pop(vm_id, None)

    async def reclaim_leftovers(self, live_vm_ids: set[str]) -> list[str]:
        """Delete the networks of VMs not in ``live_vm_ids`` (start-up after a crash): their
        allocations, namespaces with this manager's prefix, and host links with its alias.
        Returns what was removed, for the log."""
        self._store.open()
        removed: list[str] = []
        for alloc in self._store.all():
            if alloc.vm_id not in live_vm_ids:
                await self.destroy(alloc.vm_id)
                removed.append(f"allocation {alloc.vm_id}")
        live = {VmNames.derive(v, self._tag) for v in live_vm_ids}
        live_netns = {n.netns for n in live}
        for entry in _list_netns(self._paths.netns_dir, netns_prefix(self._tag)):
            if entry not in live_netns:
                await self._runner.run(["ip", "netns", "del", entry], check=False)
                removed.append(f"netns {entry}")
        alias_prefix = link_alias_prefix(self._tag)
        out = await self._runner.run(["ip", "-j", "link", "show"])
        for link in json.loads(out.stdout or "[]"):
            alias = str(link.get("ifalias", ""))
            if alias.startswith(alias_prefix) and alias[len(alias_prefix) :] not in live_vm_ids:
                await self._runner.run(["ip", "link", "del", str(link["ifname"])], check=False)
                removed.append(f"link {link['ifname']}")
        return removed
