"""``Repository``: everything core needs from the store, and nothing about SQL.

Writes that must be atomic are single calls: a compare-and-set (``expect_states``) either
applies every change of the call or none (``apply``, ``transition``), and admission (quota,
capacity, idempotency, the image still runnable) is checked inside the transaction that
inserts the VM (``admit_microvm``). Values are keyed by the record's field names.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from embervm.contracts import MicrovmState
from embervm.store.records import (
    AdmissionLimits,
    BuildRecord,
    DeleteStatus,
    HostFence,
    IdempotencyClaim,
    ImageRecord,
    InsertOutcome,
    MicrovmRecord,
    UsageRecord,
    VersionRecord,
)


@dataclass(frozen=True)
class ImageChange:
    account_id: str
    name: str
    values: Mapping[str, Any]
    expect_states: Collection[str] | None = None


@dataclass(frozen=True)
class VersionChange:
    account_id: str
    image_name: str
    number: int
    values: Mapping[str, Any]
    expect_states: Collection[str] | None = None


@dataclass(frozen=True)
class BuildChange:
    build_id: str
    values: Mapping[str, Any]
    expect_states: Collection[str] | None = None


Change = ImageChange | VersionChange | BuildChange


@dataclass(frozen=True)
class RunnableVersion:
    """Admission re-checks, inside its transaction, that the version may still be run."""

    account_id: str
    image_name: str
    number: int
    states: Collection[str] = ("SUCCESSFUL",)
    statuses: Collection[str] = ("ACTIVE", "INACTIVE")


@dataclass(frozen=True)
class Transition:
    status: Literal["ok", "conflict", "missing", "capacity", "fenced"]
    record: MicrovmRecord | None = None  # the row after the change (ok) or as found (otherwise)


@dataclass(frozen=True)
class BuildFilter:
    architecture: str | None = None
    chipset: str | None = None
    chipset_generation: str | None = None


@dataclass(frozen=True)
class Page:
    """Keyset pagination: rows after ``after`` (the last seen sort key), at most ``limit``."""

    limit: int
    after: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Repository(Protocol):
    # -- images ------------------------------------------------------------------------------
    async def create_image(
        self,
        image: ImageRecord,
        version: VersionRecord,
        build: BuildRecord,
        tags: Mapping[str, str],
        *,
        max_images: int | None,
        claim: IdempotencyClaim | None,
    ) -> InsertOutcome:
        """Insert an image with its first version and build. A DELETED image of the same name
        is replaced. ``exists``/``quota_images``/``replayed``/``token_reused`` otherwise."""
        ...

    async def add_version(
        self,
        version: VersionRecord,
        build: BuildRecord,
        *,
        image_values: Mapping[str, Any],
        expect_image_states: Collection[str],
        claim: IdempotencyClaim | None,
    ) -> InsertOutcome:
        """Insert the image's next version (``version.number`` must equal the image's
        ``next_version``) and update the image, only if it is in ``expect_image_states``."""
        ...

    async def get_image(self, account_id: str, name: str) -> ImageRecord | None: ...

    async def list_images(
        self, account_id: str, page: Page, *, name_filter: str | None = None
    ) -> list[ImageRecord]:
        """Images not DELETED, by creation order; ``name_filter`` is a substring."""
        ...

    async def get_version(
        self, account_id: str, image_name: str, number: int
    ) -> VersionRecord | None: ...

    async def list_versions(
        self, account_id: str, image_name: str, page: Page
    ) -> list[VersionRecord]:
        """Versions not DELETED, by number."""
        ...

    async def versions_in_states(self, states: Collection[str]) -> list[VersionRecord]:
        """Every version (any account) in one of ``states``: recovery of interrupted builds."""
        ...

    async def get_build(self, build_id: str) -> BuildRecord | None: ...

    async def list_builds(
        self, account_id: str, image_name: str, number: int, page: Page, filters: BuildFilter
    ) -> list[BuildRecord]: ...

    async def apply(self, *changes: Change) -> bool:
        """All changes in one transaction; if any ``expect_states`` does not hold (or a row
        is missing) nothing is written and False is returned."""
        ...

    async def delete_image(
        self, account_id: str, name: str, *, version: int | None = None
    ) -> DeleteStatus:
        """Mark an image (or one version) DELETED unless a non-terminated VM uses it
        (``in_use``) or a build is running (``busy``)."""
        ...

    async def get_tags(self, account_id: str, image_name: str) -> dict[str, str]: ...

    async def tag(self, account_id: str, image_name: str, tags: Mapping[str, str]) -> bool:
        """Add/overwrite tags; False when the image does not exist."""
        ...

    async def untag(self, account_id: str, image_name: str, keys: Sequence[str]) -> bool: ...

    # -- microvms ----------------------------------------------------------------------------
    async def admit_microvm(
        self,
        vm: MicrovmRecord,
        *,
        limits: AdmissionLimits,
        runnable: RunnableVersion,
        claim: IdempotencyClaim | None,
    ) -> InsertOutcome:
        """Insert a PENDING VM if quotas, host capacity and the version allow it, atomically
        with the idempotency claim."""
        ...

    async def get_microvm(self, microvm_id: str) -> MicrovmRecord | None: ...

    async def list_microvms(
        self,
        account_id: str,
        page: Page,
        *,
        image_name: str | None = None,
        image_version: str | None = None,
    ) -> list[MicrovmRecord]: ...

    async def microvms_in_states(
        self, states: Collection[MicrovmState], *, host_id: str | None = None
    ) -> list[MicrovmRecord]:
        """Every VM (any account) in one of ``states``, or only those placed on ``host_id``:
        the lifecycle's and recovery's scan, a fleet host's work."""
        ...

    async def transition(
        self,
        microvm_id: str,
        *,
        expect: Collection[str],
        values: Mapping[str, Any],
        capacity: AdmissionLimits | None = None,
        fence: HostFence | None = None,
    ) -> Transition:
        """Compare-and-set on the VM's state. With ``capacity``, the VM's memory must also
        fit the host's budget (resume). With ``fence`` (a fleet host's write), the VM must be
        placed on that host with that epoch and the host not LOST, else ``fenced``."""
        ...

    async def update_microvm(self, microvm_id: str, values: Mapping[str, Any]) -> None:
        """Unconditional update of non-state fields (timers, address)."""
        ...

    async def add_usage(
        self,
        microvm_id: str,
        *,
        vcpu_seconds: float = 0.0,
        gib_seconds: float = 0.0,
        snapshot_bytes_written: int = 0,
        snapshot_bytes_read: int = 0,
    ) -> None: ...

    async def get_usage(self, microvm_id: str) -> UsageRecord: ...

    async def close(self) -> None: ...
