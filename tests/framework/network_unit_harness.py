"""The rig of the network manager's unit tests: a ``NetworkManager`` over the recording
``FakeRunner`` (``tests.framework.fake_network``), a fake resolver and host paths in a tmp dir
(no root, no kernel)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tests.framework.fake_network import FakeRunner

from embervm.network import EgressLimits, NetworkManager
from embervm.network._manager import HostPaths


@dataclass
class FakeResolver:
    running: bool = False

    async def start(self) -> None:
        self.running = True

    async def stop(self) -> None:
        self.running = False


@dataclass
class Rig:
    manager: NetworkManager
    runner: FakeRunner
    resolver: FakeResolver
    paths: HostPaths
    state_dir: Path

    def commands(self) -> list[str]:
        return [" ".join(argv) for argv, _ in self.runner.calls]

    def forwarding(self) -> str:
        return (self.paths.proc_sys_net / "ipv4" / "ip_forward").read_text()


def make_rig(
    tmp_path: Path, runner: FakeRunner | None = None, limits: EgressLimits | None = None
) -> Rig:
    paths = HostPaths(tmp_path / "netns", tmp_path / "sysnet", tmp_path / "procnet")
    paths.netns_dir.mkdir()
    paths.sys_net.mkdir()
    (paths.proc_sys_net / "ipv4").mkdir(parents=True)
    (paths.proc_sys_net / "ipv4" / "ip_forward").write_text("0")
    runner = runner or FakeRunner()
    resolver = FakeResolver()
    manager = NetworkManager(
        tmp_path / "state",
        pool="10.213.0.0/24",
        api_ports=[8700],
        protected_ports=[8443],
        runner=runner,
        resolver=resolver,
        paths=paths,
        egress_limits=limits,
    )
    return Rig(manager, runner, resolver, paths, tmp_path / "state")
