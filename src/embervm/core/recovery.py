"""What a VM record must say after a server restart, given what the host took back.

A server killed in the middle of a launch, suspend, resume or terminate leaves records in
transitional states. At the next start the host first takes back what it can (running VMMs
re-attached, suspend snapshots adopted, a VMM of a suspend cut short resumed; everything else
killed and removed: ``host.runtime``), then ``Supervisor.recover`` moves each record to the one
stable state that matches: ``after_restart`` is that rule, with no I/O.

    host runs the VM       → RUNNING     (a resume that got through, a suspend that did not)
    host holds a snapshot  → SUSPENDED   (a suspend that committed, a resume that never ran)
    host holds nothing     → TERMINATED  (HostRestarted: a launch cut short, a lost VM)
    TERMINATING            → the terminate runs again (``Supervisor._terminate``)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from embervm.contracts import MicrovmState
from embervm.core.ids import state_reason
from embervm.store import MicrovmRecord


@dataclass(frozen=True)
class Reconciled:
    """The record's new state and values; ``metered`` when its running time ends here."""

    state: MicrovmState
    values: dict[str, Any] = field(default_factory=dict)
    metered: bool = False


def after_restart(
    vm: MicrovmRecord, *, running: bool, suspended: bool, address: str | None, now: datetime
) -> Reconciled | None:
    """The stable state for ``vm`` (not TERMINATING), or None when it already says the truth."""
    if running:
        if vm.state == "RUNNING":
            return None
        return Reconciled(
            "RUNNING",
            {
                "running_since": vm.running_since or now,
                "last_activity_at": now,
                "suspended_at": None,
                "address": address,
                "state_reason": None,
            },
        )
    if suspended:
        if vm.state == "SUSPENDED":
            return None
        values = {"suspended_at": vm.suspended_at or now, "running_since": None}
        return Reconciled("SUSPENDED", values, metered=vm.running_since is not None)
    lost = "its suspend snapshot" if vm.state == "SUSPENDED" else "the VM"
    return Reconciled(
        "TERMINATED",
        {
            "state_reason": state_reason("HostRestarted", f"{lost} was lost in a server restart"),
            "terminated_at": now,
            "running_since": None,
            "address": None,
        },
        metered=vm.running_since is not None,
    )
