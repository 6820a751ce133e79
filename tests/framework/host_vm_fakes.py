"""Fakes behind the host's seams for its unit tests: ``vmm.Vmm`` / ``vmm.VmProcess``, the
``NetworkManager`` calls the host makes, and the ``guest.GuestAgent`` calls it makes.

Small and local on purpose (imported as ``tests.framework.host_vm_fakes``); nothing here starts a
process or touches the network. Each fake records what was asked of it. ``HostRig`` puts
them together behind a ``LocalHost``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from embervm.errors import GuestError, SnapshotError, VmmError
from embervm.guest.artifacts import GuestArtifacts
from embervm.guest.client import ExecResult, LogLine
from embervm.host import runtime
from embervm.host._boot import BootInputs, vm_dir_name
from embervm.host.runtime import LocalHost
from embervm.network import VmNetwork
from embervm.vmm import VmConfig
from embervm.vmm.process import VmExit
from embervm.vmm.snapshot import FileEntry, SnapshotKind, SnapshotManifest


def manifest(
    memory_mib: int = 512,
    *,
    kind: SnapshotKind = "delta",
    files: dict[str, int] | None = None,
) -> SnapshotManifest:
    """A manifest with files of the given sizes."""
    sizes = files if files is not None else {"device.state": 100, "memory": 4096}
    return SnapshotManifest(
        kind=kind,
        vm_id="vm",
        memory_mib=memory_mib,
        vcpus=1,
        accel="tcg",
        qemu_version="9.0",
        kernel_release="6.1",
        kernel="/k",
        initrd="/i",
        cmdline="",
        files={name: FileEntry(size) for name, size in sizes.items()},
    )


class FakeProcess:
    """A VMM process. ``crash(reason)`` makes it exit as if nobody asked."""

    def __init__(self, cfg: VmConfig, pid: int) -> None:
        self.cfg = cfg
        self.pid = pid
        self._returncode: int | None = None
        self._exit: asyncio.Future[VmExit] = asyncio.get_running_loop().create_future()
        self.calls: list[str] = []
        self.state = "running"
        self.snapshot_error: BaseException | None = None
        self.snapshot_manifest = manifest(cfg.memory_mib)
        self.stop_error: BaseException | None = None
        self.snapshot_gate: asyncio.Event | None = None
        self.snapshot_started = asyncio.Event()

    @property
    def returncode(self) -> int | None:
        return self._returncode

    def _end(self, code: int, reason: str, *, expected: bool) -> None:
        self._returncode = code
        if not self._exit.done():
            self._exit.set_result(VmExit(code, reason, expected))

    def crash(self, reason: str = "killed by signal 9") -> None:
        self._end(-9, reason, expected=False)

    async def status(self) -> str:
        return self.state

    async def pause(self) -> None:
        self.calls.append("pause")

    async def cont(self) -> None:
        self.calls.append("cont")
        self.state = "running"

    async def snapshot(self, dest_dir: Path, *, resume: bool = False) -> SnapshotManifest:
        self.calls.append(f"snapshot {dest_dir}")
        self.snapshot_started.set()
        if self.snapshot_gate is not None:
            await self.snapshot_gate.wait()
        if self.snapshot_error is not None:
            raise self.snapshot_error
        self._end(0, "snapshotted", expected=True)
        return self.snapshot_manifest

    async def stop(self, timeout: float = 5.0) -> int:  # noqa: ASYNC109
        self.calls.append("stop")
        if self.stop_error is not None:
            raise self.stop_error
        self._end(0, "stopped", expected=True)
        return 0

    async def kill(self) -> None:
        self.calls.append("kill")
        self._end(-9, "killed", expected=True)

    async def wait(self) -> int:
        return (await self._exit).returncode

    async def wait_exit(self) -> VmExit:
        return await self._exit

    async def detach(self) -> None:
        self.calls.append("detach")

    async def cancel_migration(self) -> None:
        self.calls.append("cancel_migration")

    async def switch_disk_overlay(self, new: Path) -> None:
        self.calls.append(f"switch {new}")


class FakeVmm:
    """``boot``, ``restore`` and ``attach`` make ``FakeProcess``es; ``fail`` names the calls
    that raise ``VmmError`` instead."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.processes: list[FakeProcess] = []
        self.fail: set[str] = set()
        self._next_pid = 1000

    def _process(self, what: str, cfg: VmConfig, pid: int | None = None) -> FakeProcess:
        if what in self.fail:
            raise VmmError(f"{what} failed")
        self._next_pid += 1
        process = FakeProcess(cfg, pid if pid is not None else self._next_pid)
        self.processes.append(process)
        return process

    async def boot(self, cfg: VmConfig) -> FakeProcess:
        self.calls.append(("boot", cfg))
        return self._process("boot", cfg)

    async def restore(
        self, cfg: VmConfig, snapshot_dir: Path, *, consume: bool = False
    ) -> FakeProcess:
        self.calls.append(("restore", cfg, snapshot_dir, consume))
        return self._process("restore", cfg)

    async def attach(self, cfg: VmConfig, pid: int) -> FakeProcess:
        self.calls.append(("attach", cfg, pid))
        return self._process("attach", cfg, pid)


class FakeNetwork:
    """The ``NetworkManager`` calls of the host: ``create``, ``destroy``, ``lookup``."""

    def __init__(self) -> None:
        self.live: dict[str, VmNetwork] = {}
        self.calls: list[tuple[str, str]] = []
        self._n = 0

    async def create(self, vm_id: str, *, egress: bool) -> VmNetwork:
        self.calls.append(("create", vm_id))
        self._n += 1
        net = VmNetwork(
            vm_id=vm_id,
            netns=f"emb-ns{self._n}",
            tap=f"emb-tap{self._n}",
            host_link=f"emb-h{self._n}",
            host_ip=f"10.213.0.{4 * self._n + 1}",
            vm_address=f"10.213.0.{4 * self._n + 2}",
            egress=egress,
        )
        self.live[vm_id] = net
        return net

    async def destroy(self, vm_id: str) -> None:
        self.calls.append(("destroy", vm_id))
        self.live.pop(vm_id, None)

    def lookup(self, vm_id: str) -> VmNetwork | None:
        return self.live.get(vm_id)


class FakeAgent:
    """The guest agent calls the host makes; ``exit_codes`` answers ``exec`` in turn."""

    def __init__(self, restored: bool = True) -> None:
        self.restored = restored
        self.calls: list[str] = []
        self.closed = False
        self.exit_codes: list[int] = [0]
        self.lines: list[bytes] = []

    async def close(self) -> None:
        self.calls.append("close")
        self.closed = True

    async def quiesce(self, *, auto_thaw: float = 30.0) -> bool:
        self.calls.append("quiesce")
        return True

    async def thaw(self) -> None:
        self.calls.append("thaw")

    async def exec(self, argv: Sequence[str], **kwargs: Any) -> ExecResult:
        self.calls.append("exec " + " ".join(argv))
        code = self.exit_codes.pop(0) if len(self.exit_codes) > 1 else self.exit_codes[0]
        return ExecResult(code, b"", b"", False)

    async def start_app(self, spec: Any) -> dict[str, Any]:
        self.calls.append("start_app")
        return {}

    async def open_pty(self, argv: Any = None, *, cols: int = 80, rows: int = 24) -> Any:
        self.calls.append(f"pty {cols}x{rows}")
        return "pty"

    async def app_logs(self) -> AsyncIterator[LogLine]:
        for i, line in enumerate(self.lines):
            yield LogLine("app", "stdout", line, 0, i)


class AgentConnector:
    """Stands in for ``_boot.connect_agent``: hands out ``FakeAgent``s, or raises."""

    def __init__(self) -> None:
        self.agents: list[FakeAgent] = []
        self.calls: list[tuple[Path, bool]] = []
        self.fail = False

    async def __call__(self, cfg: VmConfig, *, restored: bool) -> FakeAgent:
        self.calls.append((cfg.agent_socket, restored))
        if self.fail:
            raise GuestError("the agent did not answer")
        agent = FakeAgent(restored)
        self.agents.append(agent)
        return agent


VM = "mvm-0123456789abcdef0123"
SNAPSHOT = Path("/images/web/1/snapshot")


class HostRig:
    """A ``LocalHost`` over the fakes; snapshot manifests are faked too (a VM's ``suspend/``
    folder must exist for its manifest to load). ``exits`` is what ``on_exit`` was told."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.vms = root / "vms"
        self.vmm = FakeVmm()
        self.network = FakeNetwork()
        self.agents = AgentConnector()
        self.exits: list[tuple[str, str]] = []
        self.exited = asyncio.Event()
        self.manifests: list[tuple[Path, dict[str, Any]]] = []
        self.snapshot_memory = 512
        monkeypatch.setattr(runtime, "connect_agent", self.agents)
        monkeypatch.setattr(runtime, "load_manifest", self.load_manifest)
        artifacts = GuestArtifacts(root / "k", root / "i", root / "base.raw", "6.1")
        self.host = LocalHost(
            self.vms,
            boot=BootInputs(artifacts),
            network=self.network,  # type: ignore[arg-type]
            vmm=self.vmm,  # type: ignore[arg-type]
            on_exit=self.on_exit,
        )

    def load_manifest(self, path: Path, **kwargs: Any) -> SnapshotManifest:
        self.manifests.append((path, kwargs))
        if path.name == "suspend" and not path.is_dir():
            raise SnapshotError(f"no snapshot at {path}")
        return manifest(self.snapshot_memory)

    async def on_exit(self, vm_id: str, reason: str) -> None:
        self.exits.append((vm_id, reason))
        self.exited.set()

    def workdir(self, vm_id: str = VM) -> Path:
        return self.vms / vm_dir_name(vm_id)

    def process_record(self, vm_id: str = VM) -> Any:
        return json.loads((self.workdir(vm_id) / "process.json").read_text())
