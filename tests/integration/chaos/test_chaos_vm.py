"""VM-level chaos at CI size: the scenarios of ``bench/chaos.py`` (``bench/chaoslib/vm.py``)
on real TCG microVMs through the host runtime. Each scenario raises ``StateLost`` naming the
record, the VM and the cycle at the first record that is not what it must be."""

from __future__ import annotations

import os

import pytest
from bench.chaoslib import vm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, nftables, loop mounts)"),
    pytest.mark.timeout(300),
]

RECORDS_PER_CHECK = 5  # PID, counter, RAM sha256, file sha256, log sha256


async def test_every_record_survives_each_of_several_suspend_resume_cycles(
    vm_lab: vm.VmLab,
) -> None:
    """The 2nd, 3rd and 4th resumes are checked as closely as the first (delta suspends)."""
    row = await vm.soak(vm_lab, 4)
    assert (row.cycles, row.lost) == (4, 0)
    assert row.records == (1 + 4) * RECORDS_PER_CHECK
    assert "delta x4" in row.note


async def test_a_suspend_onto_a_full_disk_fails_saying_so_and_the_vm_runs_on(
    vm_lab: vm.VmLab,
) -> None:
    """ENOSPC while writing the snapshot: a SnapshotError saying so, no snapshot left half
    written, the VM running with its records; once space is back it suspends and resumes."""
    row = await vm.disk_full(vm_lab, 1)
    assert (row.cycles, row.faults, row.lost) == (1, 1, 0)
    assert row.records == 3 * RECORDS_PER_CHECK


async def test_each_damaged_snapshot_file_is_refused_before_qemu_starts(
    vm_lab: vm.VmLab,
) -> None:
    """device.state, base.memory, disk.qcow2 and manifest.json, each flipped and each cut
    short: every resume is refused naming the file, no QEMU is spawned, and the VM resumes
    with its records once the file is put back."""
    rounds = len(vm.DAMAGES)
    row = await vm.damaged_snapshots(vm_lab, rounds)
    assert (row.cycles, row.faults, row.lost) == (rounds, rounds, 0)
    assert row.records == (1 + rounds) * RECORDS_PER_CHECK
