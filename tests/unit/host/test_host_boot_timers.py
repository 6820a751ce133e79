"""Which timers a VM boots with: the PIT and PIC go off only when the kernel line tells the
guest the TSC rate (without it, ``pit=off`` hangs every boot: docs/GUEST_PROTOCOL.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from embervm.guest.artifacts import GuestArtifacts
from embervm.host import _boot
from embervm.host._boot import BootInputs
from embervm.vmm.cmdline import machine_option

ARTIFACTS = GuestArtifacts(Path("/a/vmlinuz"), Path("/a/initrd"), Path("/a/base.raw"), "6.1.0-x")


@pytest.mark.parametrize(
    ("tsc_khz", "on_the_line", "machine"),
    [(2_000_000, "tsc_early_khz=2000000", "microvm,pit=off,pic=off"), (None, None, "microvm")],
)
def test_the_legacy_timers_stay_exactly_when_the_tsc_rate_is_unknown(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    tsc_khz: int | None,
    on_the_line: str | None,
    machine: str,
) -> None:
    monkeypatch.setattr(_boot, "host_tsc_khz", lambda: tsc_khz)
    cfg = BootInputs(ARTIFACTS).config("vm", tmp_path, memory_mib=512, network=None, jail=False)
    assert cfg.legacy_timers is (tsc_khz is None)
    tsc_words = [w for w in cfg.cmdline.split() if w.startswith("tsc_early_khz=")]
    assert tsc_words == ([on_the_line] if on_the_line else [])
    assert machine_option(cfg).split(",memory-backend=")[0] == machine
