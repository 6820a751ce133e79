"""Fakes of the build seam (``embervm.imagebuild.machine``: ``MachineProvider``,
``BuildMachine``, ``AppMachine``), so tests can drive whole builds without VMs.

The fake build VM keeps a dict filesystem per layer; ``exec`` calls a script the test gives
(``ExecScript``), which may read and change that filesystem, return an exit code, print, or hang.
The fake app VM forwards guest ports to real host ports the test chooses (e.g. a tiny HTTP
server on 127.0.0.1 playing the app), so readiness checks run over real sockets.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from embervm.imagebuild.cache import LayerRef
from embervm.imagebuild.machine import AppLaunch, ExecOutcome, OutputSink, SnapshotSizes, TreeEntry
from embervm.imagebuild.ready import http_hook, tcp_probe


@dataclass
class ExecCall:
    argv: list[str]
    env: dict[str, str]
    cwd: str
    user: str | None
    timeout: float


@dataclass
class FakeFile:
    data: bytes
    mode: int
    uid: int = 0
    gid: int = 0


ExecScript = Callable[["FakeBuildMachine", ExecCall, OutputSink], "int | None"]
"""Returns an exit code, or None to hang (until the machine is shut down)."""


def default_exec(machine: FakeBuildMachine, call: ExecCall, out: OutputSink) -> int | None:
    """Exit 0 for everything, printing the command (``mkdir -p`` creates the folder)."""
    if call.argv[:2] == ["mkdir", "-p"]:
        machine.dirs.add(call.argv[2])
    out("stdout", f"ran {call.argv[-1]}\n".encode())
    return 0


class FakeBuildMachine:
    def __init__(self, provider: FakeMachineProvider, layer: LayerRef) -> None:
        self.provider = provider
        self.files: dict[str, FakeFile] = dict(provider.layer_files.get(layer.id, {}))
        self.dirs: set[str] = set(provider.layer_dirs.get(layer.id, set()))
        self.calls: list[ExecCall] = []
        self.written = 0
        self.shut_down = False

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str],
        cwd: str,
        user: str | None,
        timeout: float,  # noqa: ASYNC109
        on_output: OutputSink,
    ) -> ExecOutcome:
        call = ExecCall(list(argv), dict(env), cwd, user, timeout)
        self.calls.append(call)
        self.provider.exec_calls.append(call)
        code = self.provider.exec_script(self, call, on_output)
        if code is None:  # hung: only the caller's cancellation ends it
            await asyncio.Event().wait()
        return ExecOutcome(code or 0)

    async def put_file(
        self, path: str, data: bytes, *, mode: int, uid: int = 0, gid: int = 0
    ) -> None:
        self.files[path] = FakeFile(data, mode, uid, gid)
        self.written += len(data)

    async def put_tree(self, entries: Sequence[TreeEntry]) -> None:
        for entry in entries:
            if entry.is_dir:
                self.dirs.add(entry.path)
                continue
            data = entry.data
            if data is None:
                data = await asyncio.to_thread(Path(str(entry.source)).read_bytes)
            self.files[entry.path] = FakeFile(data, entry.mode, entry.uid, entry.gid)
            self.written += len(data)

    async def commit_layer(self) -> LayerRef:
        self.provider.counter += 1
        ref = LayerRef(f"layer-{self.provider.counter}", self.written)
        self.provider.layer_files[ref.id] = dict(self.files)
        self.provider.layer_dirs[ref.id] = set(self.dirs)
        self.written = 0
        return ref

    async def shutdown(self) -> None:
        self.shut_down = True


class FakeAppMachine(FakeBuildMachine):
    def __init__(self, provider: FakeMachineProvider, layer_id: str, restored: bool) -> None:
        super().__init__(provider, LayerRef(layer_id, 0))
        self.layer_id = layer_id
        self.restored = restored
        self.launch: AppLaunch | None = None

    async def commit_layer(self) -> LayerRef:
        ref = await super().commit_layer()
        self.layer_id = ref.id  # the snapshot is of the newest layer
        return ref

    async def start_app(self, launch: AppLaunch, *, on_output: OutputSink) -> None:
        self.launch = launch
        on_output("stdout", b"app starting\n")

    def address(self, port: int) -> tuple[str, int]:
        return "127.0.0.1", self.provider.port_map.get(port, port)

    async def call_hook(self, port: int, hook: str, *, timeout: float) -> int | None:  # noqa: ASYNC109
        return await http_hook(self.address(port), hook, timeout)

    async def probe_port(self, port: int, *, timeout: float) -> bool:  # noqa: ASYNC109
        return await tcp_probe(self.address(port), timeout)

    async def wait_idle(self, *, timeout: float) -> bool:  # noqa: ASYNC109
        return True

    async def app_exit_code(self) -> int | None:
        return self.provider.app_exit_code

    async def snapshot(self, dest_dir: Path) -> SnapshotSizes:
        manifest = {"layer": self.layer_id, "memory": self.provider.memory_bytes}
        await asyncio.to_thread(_write_manifest, dest_dir, json.dumps(manifest))
        return SnapshotSizes(self.provider.memory_bytes, self.provider.disk_bytes)


@dataclass
class FakeMachineProvider:
    exec_script: ExecScript = default_exec
    port_map: dict[int, int] = field(default_factory=dict)
    app_exit_code: int | None = None
    memory_bytes: int = 64 * 1024 * 1024
    disk_bytes: int = 8 * 1024 * 1024
    counter: int = 0
    layer_files: dict[str, dict[str, FakeFile]] = field(default_factory=dict)
    layer_dirs: dict[str, set[str]] = field(default_factory=dict)
    build_machines: list[FakeBuildMachine] = field(default_factory=list)
    app_machines: list[FakeAppMachine] = field(default_factory=list)
    exec_calls: list[ExecCall] = field(default_factory=list)
    missing_layers: set[str] = field(default_factory=set)

    async def base_layer(self, image: str) -> LayerRef:
        return LayerRef(f"base-{image}", 0)

    async def has_layer(self, layer: LayerRef) -> bool:
        return layer.id not in self.missing_layers

    async def start_build_machine(
        self, layer: LayerRef, *, egress: bool, memory_mib: int
    ) -> FakeBuildMachine:
        machine = FakeBuildMachine(self, layer)
        self.build_machines.append(machine)
        return machine

    async def start_app_machine(
        self, layer: LayerRef, *, egress: bool, memory_mib: int
    ) -> FakeAppMachine:
        app = FakeAppMachine(self, layer.id, restored=False)
        self.app_machines.append(app)
        return app

    async def restore_app_machine(self, snapshot_dir: Path, *, egress: bool) -> FakeAppMachine:
        text = await asyncio.to_thread((snapshot_dir / "manifest.json").read_text)
        manifest = json.loads(text)
        app = FakeAppMachine(self, str(manifest["layer"]), restored=True)
        self.app_machines.append(app)
        return app

    def all_shut_down(self) -> bool:
        return all(m.shut_down for m in self.build_machines) and all(
            a.shut_down for a in self.app_machines
        )


def _write_manifest(dest_dir: Path, text: str) -> None:
    dest_dir.mkdir(parents=True)
    (dest_dir / "manifest.json").write_text(text)


def zip_folder(folder: Path, dest: Path) -> Path:
    """Zip ``folder`` (for tests that build from a directory)."""
    base = Path(tempfile.mkdtemp()) / "ctx"
    archive = shutil.make_archive(str(base), "zip", folder)
    shutil.move(archive, dest)
    shutil.rmtree(base.parent, ignore_errors=True)
    return dest
