"""One host's parts, wired from its settings: the one place that assembles the runtime.

``start_host_parts`` is what runs VMs and builds on a machine, in this order (each shutdown
pushed on the caller's exit stack): guest artifacts (built once, cached by content hash) →
accelerator probe → network (host rules, resolver) → ``LocalHost`` and the build machines →
the adapters of core's seams (``LocalHostBackend`` with the app log files,
``PipelineImageBuilder`` with the build log files) → the disk-layer collector.
``embervm server`` composes core, the API and the proxy over it.

``open_machine_provider`` is the same wiring reduced to builds (the build benchmark, tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from embervm.background import start_background
from embervm.config import Settings
from embervm.guest.artifacts import ensure_guest_artifacts
from embervm.host._boot import BootInputs
from embervm.host.applogs import AppLogFiles
from embervm.host.backend import LocalHostBackend
from embervm.host.builds import LocalMachineProvider
from embervm.host.imagebuilder import BuildLogFiles, PipelineImageBuilder
from embervm.host.layergc import keep_collecting
from embervm.host.runtime import LocalHost, VmExitHandler
from embervm.imagebuild.cache import LocalLayerCache
from embervm.network import NetworkManager
from embervm.vmm.accel import detect_accelerator

Progress = Callable[[str], None]


def _quiet(message: str) -> None:
    del message


async def boot_inputs(settings: Settings, progress: Progress = _quiet) -> BootInputs:
    """The guest artifacts (the first start builds them) and the accelerator they boot on."""
    progress("preparing guest artifacts (the first start builds them: a few minutes)")
    artifacts = await ensure_guest_artifacts(
        settings.artifacts_dir,
        progress=progress,
        debian_mirror=settings.debian_mirror,
        debian_security_mirror=settings.debian_security_mirror,
    )
    accel = await detect_accelerator(settings.run_dir / "accel.json", kernel=artifacts.kernel)
    progress(f"accelerator: {accel}")
    return BootInputs(artifacts, accel)


def network_manager(settings: Settings) -> NetworkManager:
    """This host's VM networks (not started): its pool, its tag, the ports guests never reach."""
    return NetworkManager(
        settings.paths.network,
        pool=settings.network_pool,
        tag=settings.network_tag,
        api_ports=[settings.api_port, settings.proxy_port, settings.proxy_http_port],
    )


@dataclass
class HostParts:
    """A started host: the runtime, its build machines and the adapters core drives."""

    boot: BootInputs
    network: NetworkManager
    runtime: LocalHost
    machines: LocalMachineProvider
    backend: LocalHostBackend
    builder: PipelineImageBuilder
    app_logs: AppLogFiles
    build_logs: BuildLogFiles

    async def take_back(self, running: list[str], parked: list[str]) -> tuple[list[str], int]:
        """After a restart: re-attach the VMs the store says run, keep the suspended ones
        (``LocalHostBackend.recover``), and remove every leftover of a dead run (VM and build
        directories, networks). Returns the ids held again and how many leftovers went."""
        held = await self.backend.recover(running, parked)
        await self.network.reclaim_leftovers(set(held))
        removed = await self.runtime.reclaim_leftovers() + await self.machines.reclaim_leftovers()
        return held, len(removed)


async def start_host_parts(
    settings: Settings,
    stack: contextlib.AsyncExitStack,
    *,
    on_exit: VmExitHandler,
    progress: Progress = _quiet,
) -> HostParts:
    """Start this host's parts; closing ``stack`` stops them (running VMs are detached, not
    stopped: they outlive a restart)."""
    boot = await boot_inputs(settings, progress)
    network = network_manager(settings)
    await network.start()
    stack.push_async_callback(network.stop)
    runtime = LocalHost(settings.vms_dir, boot=boot, network=network, on_exit=on_exit)
    stack.push_async_callback(runtime.detach_all)
    machines = LocalMachineProvider(settings.data_dir, boot=boot, network=network)
    app_logs = AppLogFiles(
        settings.paths.microvm_logs, retention=settings.app_log_retention_days * 86400
    )
    stack.push_async_callback(app_logs.close)
    start_background(stack, app_logs.keep_pruning(), name="app-log-retention")
    start_background(
        stack,
        keep_collecting(
            settings.layers_dir,
            [settings.images_dir, settings.vms_dir],
            LocalLayerCache(settings.build_cache_dir),
            uploads=settings.uploads_dir,
            cache_days=settings.build_cache_days,
        ),
        name="disk-layer-collector",
    )
    return HostParts(
        boot=boot,
        network=network,
        runtime=runtime,
        machines=machines,
        backend=LocalHostBackend(runtime, app_logs),
        builder=PipelineImageBuilder(settings, machines),
        app_logs=app_logs,
        build_logs=BuildLogFiles(settings),
    )


@contextlib.asynccontextmanager
async def open_machine_provider(
    settings: Settings, *, network: NetworkManager | None = None
) -> AsyncIterator[LocalMachineProvider]:
    """Build machines for this host's settings (a network manager started and stopped here
    unless one is passed in)."""
    boot = await boot_inputs(settings)
    async with contextlib.AsyncExitStack() as stack:
        if network is None:
            network = network_manager(settings)
            await network.start()
            stack.push_async_callback(network.stop)
        yield LocalMachineProvider(settings.data_dir, boot=boot, network=network)
