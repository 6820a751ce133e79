"""Rows as typed, immutable Python values: what ``Repository`` takes and returns.

Timestamps are aware ``datetime`` in UTC. Free-form configuration (the request members of an
image version, connectors, idle policy, hooks) is kept as JSON-able dicts/lists under the
model's member names, so core renders outputs without translating field names twice.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, get_args

from embervm.contracts import MicrovmState

# -- states (the model's enums; repeated here so store needs no botocore) -------------------

MICROVM_STATES: tuple[MicrovmState, ...] = get_args(MicrovmState)
ACTIVE_MICROVM_STATES: tuple[MicrovmState, ...] = (
    "PENDING", "RUNNING", "SUSPENDING", "SUSPENDED", "TERMINATING",
)  # fmt: skip
"""Every state but TERMINATED: the VM still exists somewhere (counts against quotas)."""
MEMORY_HOLDING_STATES: tuple[MicrovmState, ...] = (
    "PENDING",
    "RUNNING",
    "SUSPENDING",
    "TERMINATING",
)
"""States in which the VM holds (or is about to hold) host RAM; a SUSPENDED VM lives on disk."""


@dataclass(frozen=True)
class ImageRecord:
    account_id: str
    name: str
    arn: str
    state: str
    created_at: datetime
    updated_at: datetime
    next_version: int = 1
    latest_active_version: str | None = None
    latest_failed_version: str | None = None
    state_reason: str | None = None
    seq: int | None = None  # assigned by the store; the listing order


@dataclass(frozen=True)
class VersionRecord:
    account_id: str
    image_name: str
    number: int
    state: str  # PENDING | IN_PROGRESS | SUCCESSFUL | FAILED | DELETING | DELETED | DELETE_FAILED
    status: str  # ACTIVE | INACTIVE
    config: dict[str, Any]  # the Create/UpdateMicrovmImage members that define this version
    memory_mib: int
    created_at: datetime
    updated_at: datetime
    state_reason: str | None = None
    snapshot_dir: str | None = None

    @property
    def version(self) -> str:
        return str(self.number)


@dataclass(frozen=True)
class BuildRecord:
    build_id: str
    account_id: str
    image_name: str
    version_number: int
    state: str  # PENDING | IN_PROGRESS | SUCCESSFUL | FAILED
    architecture: str
    chipset: str
    chipset_generation: str
    created_at: datetime
    state_reason: str | None = None
    snapshot_build: dict[str, int] | None = None
    seq: int | None = None
    host_id: str | None = None  # a fleet: the host running (or that ran) the build
    host_epoch: int | None = None


@dataclass(frozen=True)
class MicrovmRecord:
    microvm_id: str
    account_id: str
    image_name: str
    image_arn: str
    image_version: str
    state: MicrovmState
    endpoint: str
    memory_mib: int
    vcpus: int
    maximum_duration_seconds: int
    started_at: datetime
    updated_at: datetime
    expires_at: datetime
    host_id: str
    ingress: list[str] = field(default_factory=list)
    egress: list[str] = field(default_factory=list)
    idle_policy: dict[str, Any] | None = None
    hooks: dict[str, Any] | None = None
    logging: dict[str, Any] | None = None
    run_hook_payload: str | None = None
    execution_role_arn: str | None = None
    snapshot_dir: str | None = None
    state_reason: str | None = None
    address: str | None = None
    terminated_at: datetime | None = None
    last_activity_at: datetime | None = None
    suspended_at: datetime | None = None
    running_since: datetime | None = None
    last_snapshot_bytes: int = 0
    host_epoch: int | None = None  # the epoch of ``host_id`` it was placed with (fleet)
    seq: int | None = None


HostState = Literal["ACTIVE", "DRAINING", "LOST"]
HOST_STATES: tuple[HostState, ...] = get_args(HostState)


@dataclass(frozen=True)
class HostRecord:
    """A host of the fleet (``sql_hosts``). ``epoch`` grows with every registration; the
    timestamps come from the database's clock."""

    host_id: str
    epoch: int
    state: HostState
    address: str  # ADDR:PORT the proxies and APIs dial
    pid: int
    memory_total_mib: int
    memory_reserved_mib: int  # as the host last reported it
    capabilities: dict[str, Any]  # what a snapshot restore must match (QEMU, accelerator, CPU)
    registered_at: datetime
    heartbeat_at: datetime
    lease_expires_at: datetime


@dataclass(frozen=True)
class HostFence:
    """A host's write is applied only while ``host_id`` is at ``epoch`` and not LOST (and, for
    a MicroVM row, only if the VM is placed on that host with that epoch)."""

    host_id: str
    epoch: int


@dataclass(frozen=True)
class UsageRecord:
    """Metering per VM: what a bill would be computed from (docs/ARCHITECTURE.md)."""

    microvm_id: str
    vcpu_seconds: float = 0.0
    gib_seconds: float = 0.0
    snapshot_bytes_written: int = 0
    snapshot_bytes_read: int = 0


@dataclass(frozen=True)
class IdempotencyClaim:
    """``clientToken`` of a Create/Run call: the same token with the same body replays the
    first call's resource; with another body it is refused."""

    account_id: str
    scope: str  # the operation name
    client_token: str
    request_hash: str
    resource_id: str  # what the first call created (microvm id, or "<image>/<version>")


@dataclass(frozen=True)
class Placement:
    """How a fleet places a VM on a host (``store.placement``): the capabilities a host must
    have (equal values), how far its memory may be overcommitted, the hosts tried first, and
    how many random candidates the best of K compares."""

    required: Mapping[str, Any] = field(default_factory=dict)
    overcommit: float = 1.0
    prefer: tuple[str, ...] = ()
    choices: int = 2

    def preferring(self, host_id: str) -> Placement:
        """The same placement with ``host_id`` tried first (a resume: the VM's last host)."""
        rest = tuple(h for h in self.prefer if h != host_id)
        return Placement(self.required, self.overcommit, (host_id, *rest), self.choices)


@dataclass(frozen=True)
class AdmissionLimits:
    """Checked inside the write transaction that creates (or resumes) a VM. One host
    (``host_id``, with its ``host_memory_budget_mib``), or a fleet: ``placement`` picks the
    host."""

    max_microvms: int | None = None  # per account, every non-terminated VM
    max_total_memory_mib: int | None = None  # per account, memory of non-terminated VMs
    host_memory_budget_mib: int | None = None  # per host, VMs that hold RAM
    host_id: str = "local"
    placement: Placement | None = None


InsertStatus = Literal[
    "created",  # the row(s) were written
    "replayed",  # the idempotency token was seen with the same body: resource_id is the answer
    "token_reused",  # the token was seen with a different body
    "exists",  # a resource with that name exists already
    "quota_microvms",
    "quota_memory",
    "quota_images",
    "capacity",  # the host cannot hold the VM's memory
    "conflict",  # the precondition (image state, version state...) did not hold
    "missing",  # the parent resource is gone
]


@dataclass(frozen=True)
class InsertOutcome:
    status: InsertStatus
    resource_id: str | None = None


DeleteStatus = Literal["deleted", "already_deleted", "missing", "in_use", "busy"]
