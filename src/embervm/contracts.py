"""The values that cross core's seams, on the ground floor every layer may import.

Core drives real work through ``typing.Protocol``s (``embervm.core.seams``); the adapters that
implement them live with what they adapt (``embervm.host``: the host backend, hooks, app logs
and the image builder). The values those calls carry are here, so an adapter needs nothing of
core to speak to it (docs/ARCHITECTURE.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

MicrovmState = Literal["PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "TERMINATING", "TERMINATED"]
"""A MicroVM's state, as the model's ``MicrovmState`` enum spells it."""

#: A MicroVM's id: ``mvm-`` and 20 lowercase hex digits (``core.ids`` makes them).
MICROVM_ID_RE = re.compile(r"^mvm-[0-9a-f]{20}$")


@dataclass(frozen=True)
class VmSpec:
    """One VM to launch from an image version's snapshot (RunMicrovm): what a host reads.

    The size is not here: a restore cannot change guest RAM, so the snapshot fixes memory, and
    the host derives vCPUs and the CPU quota from it (``embervm.sizing``). Ingress is the
    proxy's business, the environment was baked into the snapshot at build time.
    """

    microvm_id: str
    snapshot_dir: Path
    egress: bool  # INTERNET_EGRESS
    hooks: Mapping[str, Any] | None  # the image version's model ``Hooks`` (port, microvmHooks)
    run_hook_payload: str | None  # body of the /run hook


@dataclass(frozen=True)
class SuspendOutcome:
    """``completed`` False: the suspend was cancelled and the VM still runs."""

    completed: bool
    snapshot_bytes: int = 0


@dataclass(frozen=True)
class BuildJob:
    """One image version to build. ``request`` holds the version's configuration by model
    member names (baseImageArn, codeArtifact, hooks, environmentVariables, resources,
    egressNetworkConnectors, logging...), ready for ``embervm.imagebuild.spec_from_request``."""

    account_id: str
    image_name: str
    image_arn: str
    version: str
    build_id: str
    request: Mapping[str, Any]
    memory_mib: int


@dataclass(frozen=True)
class BuiltImage:
    snapshot_dir: Path
    memory_mib: int
    memory_snapshot_bytes: int = 0
    disk_snapshot_bytes: int = 0
    code_install_bytes: int = 0


@dataclass(frozen=True)
class PortGrant:
    """Ports a token opens: every port, or inclusive ranges (single ports are 1-wide)."""

    all_ports: bool = False
    ranges: tuple[tuple[int, int], ...] = ()

    def allows(self, port: int) -> bool:
        return self.all_ports or any(lo <= port <= hi for lo, hi in self.ranges)

    @classmethod
    def from_model(cls, specs: Sequence[Mapping[str, Any]]) -> PortGrant:
        """From the model's ``allowedPorts`` (shape rules already checked by the API)."""
        ranges: list[tuple[int, int]] = []
        for spec in specs:
            if "allPorts" in spec:
                return cls(all_ports=True)
            if "port" in spec:
                ranges.append((int(spec["port"]), int(spec["port"])))
            elif "range" in spec:
                ranges.append((int(spec["range"]["startPort"]), int(spec["range"]["endPort"])))
        return cls(ranges=tuple(ranges))


TokenKind = Literal["endpoint", "shell"]
