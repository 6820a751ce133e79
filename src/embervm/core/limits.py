"""Admission limits: quotas, host capacity, per-operation rate limits.

Quotas (per account) and capacity (per host, never overcommitted: a VM's baseline memory is
reserved from launch to suspend/terminate) are checked by the store inside the transaction
that creates or resumes the VM. Rate limits are token buckets per (account, operation) on an
injected clock; an empty bucket raises ``ThrottledError`` with the seconds until a token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from embervm.errors import ThrottledError

MIB = 1024 * 1024


@dataclass(frozen=True)
class RateLimit:
    rate: float  # tokens per second
    burst: int  # bucket size


READ_OPERATIONS = frozenset(
    {
        "GetMicrovm",
        "GetMicrovmImage",
        "GetMicrovmImageBuild",
        "GetMicrovmImageVersion",
        "ListManagedMicrovmImageVersions",
        "ListManagedMicrovmImages",
        "ListMicrovmImageBuilds",
        "ListMicrovmImageVersions",
        "ListMicrovmImages",
        "ListMicrovms",
        "ListTags",
    }
)


def default_rate_limits() -> dict[str, RateLimit]:
    """Reads 200/s (burst 400), writes 50/s (burst 100), builds 2/s (burst 10)."""
    limits = {op: RateLimit(200.0, 400) for op in READ_OPERATIONS}
    for op in (
        "RunMicrovm",
        "SuspendMicrovm",
        "ResumeMicrovm",
        "TerminateMicrovm",
        "CreateMicrovmAuthToken",
        "CreateMicrovmShellAuthToken",
        "TagResource",
        "UntagResource",
        "UpdateMicrovmImageVersion",
        "DeleteMicrovmImage",
        "DeleteMicrovmImageVersion",
    ):
        limits[op] = RateLimit(50.0, 100)
    for op in ("CreateMicrovmImage", "UpdateMicrovmImage"):
        limits[op] = RateLimit(2.0, 10)
    return limits


def host_memory_budget_mib(reserve_fraction: float = 0.25, meminfo: Path | None = None) -> int:
    """What VMs may hold on this host: MemTotal minus a reserve for the host itself."""
    path = meminfo or Path("/proc/meminfo")
    for line in path.read_text().splitlines():
        if line.startswith("MemTotal:"):
            total_mib = int(line.split()[1]) // 1024
            return int(total_mib * (1.0 - reserve_fraction))
    return 0


@dataclass(frozen=True)
class CoreLimits:
    max_microvms: int | None = 100  # per account, non-terminated
    max_total_memory_mib: int | None = 256 * 1024  # per account, non-terminated
    max_images: int | None = 50  # per account
    host_memory_budget_mib: int | None = None  # None: no capacity check (tests, benches)
    rate_limits: Mapping[str, RateLimit] = field(default_factory=default_rate_limits)
    concurrent_builds: int = 1
    default_memory_mib: int = 1024  # = embervm.imagebuild's default app memory: snapshot size
    min_memory_mib: int = 512
    max_memory_mib: int = 8192
    default_maximum_duration_seconds: int = 28_800
    max_token_minutes: int = 60


class RateLimiter:
    """Token buckets keyed by (account, operation)."""

    def __init__(self, limits: Mapping[str, RateLimit], clock: Callable[[], float]) -> None:
        self._limits = limits
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def check(self, account_id: str, operation: str) -> None:
        limit = self._limits.get(operation)
        if limit is None:
            return
        now = self._clock()
        key = (account_id, operation)
        tokens, last = self._buckets.get(key, (float(limit.burst), now))
        tokens = min(float(limit.burst), tokens + max(0.0, now - last) * limit.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            retry = max(1, math.ceil((1.0 - tokens) / limit.rate)) if limit.rate > 0 else 60
            raise ThrottledError(f"Rate exceeded for {operation}", retry_after=retry)
        self._buckets[key] = (tokens - 1.0, now)
