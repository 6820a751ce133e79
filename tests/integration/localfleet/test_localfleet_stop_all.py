"""``stop_all`` as ``embervm fleet down`` runs it: another process, reading the state file of a
fleet with a real PostgreSQL (restarted since it was recorded: a new postmaster pid), a real
SeaweedFS and a role process with a child of its own; afterwards nothing of it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from embervm.localfleet import (
    FleetState,
    LocalPostgres,
    LocalSeaweedFS,
    ProcessRecord,
    ServiceRecord,
    free_port,
    save_state,
    state_file,
)
from embervm.localfleet._proc import wait_pidfd

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

FLEET_DOWN = """
import json, sys
from pathlib import Path
from embervm.localfleet import stop_all
print(json.dumps([[s.name, s.outcome] for s in stop_all(Path(sys.argv[1]))]))
"""


def test_fleet_down_from_another_process_leaves_nothing_running(
    postgres: LocalPostgres, seaweedfs: LocalSeaweedFS, fleet_root: Path
) -> None:
    data_dir = fleet_root / "fleet"
    pg_port = free_port()
    postgres.start(pg_port)
    # A stand-in for a role process: leads its group, and has a child.
    role_argv = ["sh", "-c", "sleep 300 & wait"]
    role = subprocess.Popen(role_argv, start_new_session=True)
    try:
        record = ProcessRecord.of("host-1", role.pid, argv=role_argv, group=True)
        save_state(data_dir, FleetState(
            postgres=ServiceRecord(postgres.root, pg_port),
            seaweedfs=ServiceRecord(seaweedfs.root, seaweedfs.s3_port),
            processes=(record,),
            urls={"database": postgres.url, "s3": seaweedfs.endpoint_url},
        ))  # fmt: skip
        postgres.restart(mode="immediate")  # after the state was written: a new postmaster
        children = subprocess.run(
            ["pgrep", "-g", str(role.pid)], capture_output=True, text=True, timeout=10
        ).stdout.split()
        pg_pids = [postgres.pid, *map(int, subprocess.run(
            ["pgrep", "-P", str(postgres.pid)], capture_output=True, text=True, timeout=10
        ).stdout.split())]  # fmt: skip
        watched = [int(p) for p in children] + [p for p in pg_pids if p] + [seaweedfs.pid or 0]
        assert len(watched) >= 6
        assert 0 not in watched
        pidfds = [os.pidfd_open(pid) for pid in watched]
        try:
            down = subprocess.run(
                [sys.executable, "-c", FLEET_DOWN, str(data_dir)], capture_output=True,
                text=True, timeout=120, check=True,
            )  # fmt: skip
            assert json.loads(down.stdout) == [
                ["host-1", "stopped"], ["seaweedfs", "stopped"], ["postgres", "stopped"],
            ]  # fmt: skip
            for pid, fd in zip(watched, pidfds, strict=True):
                assert wait_pidfd(fd, 10), f"pid {pid} still runs"
        finally:
            for fd in pidfds:
                os.close(fd)
        assert role.wait(timeout=10) < 0
        assert not state_file(data_dir).exists()
        assert not postgres.is_running()
        assert not seaweedfs.is_running()
        # A second `fleet down` finds nothing to do.
        again = subprocess.run([sys.executable, "-c", FLEET_DOWN, str(data_dir)],
                               capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        assert json.loads(again.stdout) == []
    finally:
        if role.poll() is None:
            os.killpg(role.pid, 9)
        role.wait(timeout=10)
