"""The sizing rule (one vCPU per 2 GiB) for every memory size Lambda MicroVMs offers."""

from __future__ import annotations

import pytest

from embervm.sizing import cpu_quota_for, cpu_share, vcpus_for


@pytest.mark.parametrize(
    ("memory_mib", "share", "vcpus", "quota"),
    [
        (512, 0.25, 1, 0.25),
        (1024, 0.5, 1, 0.5),
        (2048, 1.0, 1, 1.0),
        (4096, 2.0, 2, 2.0),
        (8192, 4.0, 4, 4.0),
        (256, 0.125, 1, 0.25),
    ],
)
def test_share_vcpus_and_quota_follow_memory(
    memory_mib: int, share: float, vcpus: int, quota: float
) -> None:
    assert cpu_share(memory_mib) == share
    assert vcpus_for(memory_mib) == vcpus
    assert cpu_quota_for(memory_mib) == quota
