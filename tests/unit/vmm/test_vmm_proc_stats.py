import os
from pathlib import Path

import pytest

from embervm.errors import VmmError
from embervm.vmm._procfs import read_stats

ROLLUP = """55d0c0000000-7ffd8b9fe000 ---p 00000000 00:00 0                          [rollup]
Rss:              120000 kB
Pss:              100000 kB
Pss_Anon:          90000 kB
Shared_Clean:      20000 kB
Private_Clean:      1000 kB
Private_Dirty:     99000 kB
"""


def test_stats_read_rss_pss_private_and_cpu_time(tmp_path: Path) -> None:
    d = tmp_path / "42"
    d.mkdir()
    (d / "smaps_rollup").write_text(ROLLUP)
    ticks = os.sysconf("SC_CLK_TCK")
    # comm with spaces and a parenthesis must not shift the fields
    (d / "stat").write_text(f"42 (qemu (x) y) S 1 42 42 0 -1 0 0 0 0 0 {3 * ticks} {ticks} 0 0\n")
    s = read_stats(42, proc=tmp_path)
    assert (s.rss_bytes, s.pss_bytes, s.private_bytes) == (120000 << 10, 100000 << 10, 100000 << 10)
    assert s.cpu_seconds == 4.0


def test_stats_of_a_gone_process_are_a_vmm_error(tmp_path: Path) -> None:
    with pytest.raises(VmmError):
        read_stats(999, proc=tmp_path)
