"""The fleet's roles (docs/FLEET.md), composed from the same parts as ``embervm server``.

- ``host``: this machine's VMs and builds (``host.start_host_parts``), a membership in the
  store (``HostMembership``: a lease, an epoch fencing every write), the supervisor adopting the
  work placed here (``keep_adopting``), and the tunnel listener the proxies dial on
  ``--advertise``.
- ``api``: the control API over core in intent mode (``runs_vms=False``: placement and
  compare-and-set, no VM and no build here), the lifecycle timers and the reaper of lost hosts.
- ``proxy``: the endpoint proxy, checking tokens with the keys in the store and reaching each
  VM through its host's tunnel (``TunnelUpstream``); auto-resume writes the intent like the API
  does. The shell (``/shell``) is not reachable through it yet.

Every fleet role needs PostgreSQL (``check_fleet_settings``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from embervm.api import CredentialStore
from embervm.background import start_background
from embervm.config import Settings
from embervm.contracts import BuildJob, BuiltImage, SuspendOutcome, VmSpec
from embervm.core import CoreLimits, Operations, host_memory_budget_mib
from embervm.core.keyring_store import StoreKeyRing
from embervm.core.reaper import keep_reaping
from embervm.core.tokens import TokenAuthority
from embervm.errors import ConfigError, RuntimeFailure
from embervm.host import start_host_parts
from embervm.host.capabilities import host_capabilities, host_cpu_model
from embervm.host.membership import HostMembership
from embervm.host.tunnel import TunnelListener
from embervm.proxy import EndpointProxy
from embervm.proxy.host_dial import split_address
from embervm.proxy.shell import Pty
from embervm.proxy.upstream import TunnelUpstream
from embervm.store import HostFence, Placement, SqlRepository, open_repository
from embervm.store.hosts import check_address, check_host_id
from embervm.vmm import QemuVmm

Progress = Callable[[str], None]


@dataclass
class RunningRole:
    ready_line: str


def check_fleet_settings(settings: Settings) -> None:
    """What a fleet role needs before anything starts; ``ConfigError`` says what is missing."""
    url = settings.database_url or ""
    if not url.startswith("postgresql"):
        raise ConfigError(
            f"--role {settings.role} needs PostgreSQL (--database-url postgresql+asyncpg://…): "
            "SQLite is one machine's store, with no clock and no locks a fleet can share"
        )
    if settings.role == "host":
        if not settings.host_id or not settings.advertise:
            raise ConfigError("--role host needs --host-id NAME and --advertise ADDR:PORT")
        check_host_id(settings.host_id)
        check_address(settings.advertise)


async def _open_store(settings: Settings, stack: contextlib.AsyncExitStack) -> SqlRepository:
    repository = await open_repository(settings.effective_database_url)
    stack.push_async_callback(repository.close)
    return repository


# -- host ------------------------------------------------------------------------------------


async def start_host_role(
    settings: Settings, stack: contextlib.AsyncExitStack, progress: Progress
) -> RunningRole:
    host_id, advertise = settings.host_id, settings.advertise
    if host_id is None or advertise is None:
        raise ConfigError("--role host needs --host-id NAME and --advertise ADDR:PORT")
    repository = await _open_store(settings, stack)
    fleet_key = await repository.fleet_key()
    ops_ref: list[Operations] = []

    async def vm_exited(vm_id: str, reason: str) -> None:
        if ops_ref:
            await ops_ref[0].vm_exited(vm_id, reason)

    parts = await start_host_parts(settings, stack, on_exit=vm_exited, progress=progress)
    mine = await repository.microvms_in_states(
        ("RUNNING", "SUSPENDED", "SUSPENDING", "PENDING"), host_id=host_id
    )
    running = [vm.microvm_id for vm in mine if vm.state == "RUNNING"]
    parked = [
        vm.microvm_id
        for vm in mine
        if vm.state in ("SUSPENDED", "SUSPENDING")
        or (vm.state == "PENDING" and vm.suspended_at is not None)
    ]
    held, removed = await parts.take_back(running, parked)
    if held or removed:
        progress(f"took back {len(held)} VMs of the last run; removed {removed} leftovers")

    async def registered(fence: HostFence) -> None:
        if ops_ref:
            ops_ref[0].supervisor.set_fence(fence)
        held_now = [vm for vm in held if parts.runtime.is_running(vm)]
        await repository.rebind(fence.host_id, fence.epoch, held_now)

    async def lost() -> None:
        await parts.runtime.shutdown()

    membership = HostMembership(
        repository,
        host_id=host_id,
        address=advertise,
        memory_total_mib=host_memory_budget_mib(),
        capabilities=host_capabilities(
            qemu_version=await QemuVmm.for_host().version(),
            accel=parts.boot.accel,
            cpu_model=host_cpu_model(),
        ),
        reserved_mib=parts.runtime.memory_in_use_mib,
        on_lost=lost,
        on_registered=registered,
        pid=os.getpid(),
    )
    record = await membership.register()
    ops = Operations(
        settings=settings,
        repository=repository,
        host=parts.backend,
        builder=parts.builder,
        limits=CoreLimits(host_memory_budget_mib=host_memory_budget_mib()),
        build_logs=parts.build_logs,
        app_logs=parts.app_logs,
        host_id=host_id,
        fence=membership.fence,
        hosts=repository,
    )
    ops_ref.append(ops)
    await ops.supervisor.start()  # recovery of this host's VMs and builds
    stack.push_async_callback(ops.supervisor.stop)
    bind, port = split_address(advertise)
    tunnel = TunnelListener(fleet_key, parts.runtime.address, host=bind.strip("[]"), port=port)
    await tunnel.start()
    stack.push_async_callback(tunnel.stop)
    start_background(stack, membership.keep_beating(), name="host-membership")
    start_background(stack, ops.supervisor.keep_adopting(), name="adopt-work")
    return RunningRole(f"embervm ready host={host_id} epoch={record.epoch} tunnel={advertise}")


# -- api -------------------------------------------------------------------------------------


class _NoVmsHere:
    """The ``HostBackend`` and ``ImageBuilder`` of an API process: it runs no VM and no build
    (``runs_vms=False`` keeps core from asking); anything that still asks is a bug."""

    async def launch(self, vm: VmSpec) -> None:
        raise RuntimeFailure("an API process runs no VM")

    async def suspend(self, microvm_id: str, *, cancel: asyncio.Event) -> SuspendOutcome:
        raise RuntimeFailure("an API process runs no VM")

    async def resume(self, microvm_id: str) -> None:
        raise RuntimeFailure("an API process runs no VM")

    async def terminate(self, microvm_id: str) -> None:
        raise RuntimeFailure("an API process runs no VM")

    def address(self, microvm_id: str) -> str | None:
        return None

    def is_running(self, microvm_id: str) -> bool:
        return False

    def is_suspended(self, microvm_id: str) -> bool:
        return False

    async def build(self, job: BuildJob) -> BuiltImage:
        raise RuntimeFailure("an API process runs no build")

    async def discard(self, image_name: str, version: str | None) -> None:
        return None  # each host drops what it caches of a deleted image (to come)


async def start_api_role(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    serve_api: Callable[[contextlib.AsyncExitStack, Settings, Operations], Awaitable[str]],
) -> RunningRole:
    await asyncio.to_thread(settings.run_dir.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(CredentialStore(settings.credentials_file).ensure)
    repository = await _open_store(settings, stack)
    ops, _ = await _intent_operations(settings, stack, repository, "api")
    start_background(stack, keep_reaping(repository, builds=ops.supervisor.builds), name="reaper")
    api_url = await serve_api(stack, settings, ops)
    return RunningRole(f"embervm ready api={api_url}")


async def _intent_operations(
    settings: Settings, stack: contextlib.AsyncExitStack, repository: SqlRepository, name: str
) -> tuple[Operations, TokenAuthority]:
    """Core as a fleet's API or proxy process runs it: intents only, token keys in the store."""
    ring = await StoreKeyRing.open(repository)
    stack.push_async_callback(ring.close)
    tokens = TokenAuthority(ring)
    nothing_here = _NoVmsHere()
    ops = Operations(
        settings=settings,
        repository=repository,
        host=nothing_here,
        builder=nothing_here,
        tokens=tokens,
        host_id=name,
        runs_vms=False,
        placement=Placement(),
        hosts=repository,
    )
    await ops.start()
    stack.push_async_callback(ops.stop)
    return ops, tokens


# -- proxy -----------------------------------------------------------------------------------


class _NoShellsHere:
    async def open_shell(self, vm_id: str, *, cols: int, rows: int) -> Pty:
        raise RuntimeFailure("the shell is not reachable through a fleet's proxy yet")


async def start_proxy_role(settings: Settings, stack: contextlib.AsyncExitStack) -> RunningRole:
    repository = await _open_store(settings, stack)
    fleet_key = await repository.fleet_key()
    ops, tokens = await _intent_operations(settings, stack, repository, "proxy")

    async def host_addresses() -> dict[str, str]:
        return {h.host_id: h.address for h in await repository.list_hosts() if h.state != "LOST"}

    proxy = EndpointProxy(
        settings,
        lifecycle=ops.lifecycle,
        tokens=tokens,
        shells=_NoShellsHere(),
        upstream=TunnelUpstream(fleet_key, host_addresses),
    )
    await proxy.start()
    stack.push_async_callback(proxy.stop)
    return RunningRole(
        f"embervm ready proxy=https://{settings.listen_host}:{proxy.tls_port} "
        f"proxy_http=http://{settings.listen_host}:{proxy.http_port}"
    )
