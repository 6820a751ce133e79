"""The host agent: turns "this VM should run / be suspended / be gone" into real microVMs.

- ``runtime``: ``LocalHost`` — launch a VM from an image snapshot (restore, never a cold boot),
  suspend it to disk, resume it, terminate it, open a shell, follow its app's logs; every VM
  start acquires its resources on a LIFO cleanup stack; a VMM that dies is noticed and cleaned.
- ``builds``: ``LocalMachineProvider`` — the build pipeline's build and app machines on real
  microVMs, with disk layers frozen by QMP ``blockdev-snapshot-sync``.
- ``_boot``: what both share: VM configs, networks and agent connections.
- ``assembly``: the one place that wires a host's parts from its settings
  (``start_host_parts``; ``open_machine_provider`` for builds alone).

``host`` stands on ``vmm``, ``network`` and ``guest`` and knows nothing of the API.
"""

from embervm.host.assembly import HostParts, open_machine_provider, start_host_parts
from embervm.host.builds import LocalMachineProvider
from embervm.host.runtime import LaunchSpec, LocalHost, VmExitHandler

__all__ = [
    "HostParts",
    "LaunchSpec",
    "LocalHost",
    "LocalMachineProvider",
    "VmExitHandler",
    "open_machine_provider",
    "start_host_parts",
]
