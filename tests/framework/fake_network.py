"""Fakes for ``embervm.network``: a recording fake of its ``CommandRunner`` seam, and a guest
stand-in.

``attach_veth_guest`` replaces a VM's tap with a veth of the same name whose other end sits in
a namespace the test owns and carries the guest's address, MAC and route. The VM namespace's
rules match on the device *name* (``tap0``), so the stand-in goes through exactly the rules a
QEMU guest would; only the link type differs (a tap without QEMU has no carrier).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from embervm.network._addressing import (
    GATEWAY_IP,
    GATEWAY_MAC,
    GUEST_IP,
    GUEST_MAC,
    GUEST_PREFIX,
)
from embervm.network._commands import DEFAULT_TIMEOUT, CommandResult, CommandRunner, failure
from embervm.network._manager import VmNetwork


@dataclass
class FakeRunner:
    """A ``CommandRunner`` that records commands and answers from ``respond`` (default: exit 0).

    ``respond(argv, input)`` returns a ``CommandResult`` or None for success with no output.
    """

    respond: Callable[[tuple[str, ...], str | None], CommandResult | None] | None = None
    calls: list[tuple[tuple[str, ...], str | None]] = field(default_factory=list)

    async def run(
        self,
        argv: Sequence[str],
        *,
        input: str | None = None,
        check: bool = True,
        time_limit: float = DEFAULT_TIMEOUT,
    ) -> CommandResult:
        args = tuple(argv)
        self.calls.append((args, input))
        result = self.respond(args, input) if self.respond else None
        result = result or CommandResult(args, 0, "", "")
        if check and result.returncode != 0:
            raise failure(result)
        return result


async def attach_veth_guest(
    net: VmNetwork, guest_netns: str, runner: CommandRunner, *, guest_dev: str = "eth0"
) -> None:
    """Swap ``net``'s tap for a veth named like it, its peer ``guest_dev`` in ``guest_netns``
    (which the caller created and deletes) configured as the guest: 10.0.2.15/24, gateway
    10.0.2.2, the guest MAC; the tap's stand-in gets the gateway MAC, like the real tap."""
    ns = net.netns
    await runner.run(["ip", "-n", ns, "link", "del", net.tap])
    await runner.run(
        ["ip", "-n", ns, "-batch", "-"],
        input=(
            f"link add {net.tap} address {GATEWAY_MAC} type veth peer name {guest_dev} "
            f"netns {guest_netns}\n"
            f"addr add {GATEWAY_IP}/{GUEST_PREFIX} dev {net.tap}\n"
            f"link set {net.tap} up\n"
        ),
    )
    await runner.run(
        ["ip", "-n", guest_netns, "-batch", "-"],
        input=(
            f"link set {guest_dev} address {GUEST_MAC}\n"
            f"addr add {GUEST_IP}/{GUEST_PREFIX} dev {guest_dev}\n"
            f"link set {guest_dev} up\n"
            "link set lo up\n"
            f"route add default via {GATEWAY_IP} dev {guest_dev}\n"
        ),
    )
