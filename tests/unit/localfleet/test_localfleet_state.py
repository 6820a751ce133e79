"""The fleet's run state file and ``stop_all`` over plain processes: what ``fleet down`` reads,
whom it stops (only the processes the file describes), and when it keeps the file."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from embervm.errors import ConfigError, RuntimeFailure
from embervm.localfleet import (
    FleetState,
    ProcessRecord,
    ServiceRecord,
    Stopped,
    load_state,
    save_state,
    state_file,
    stop_all,
)
from embervm.localfleet import state as state_module
from embervm.localfleet._proc import ProcessIdentity

pytestmark = pytest.mark.timeout(60)


def spawn(spawned: list[subprocess.Popen[bytes]], name: str, **how: Any) -> ProcessRecord:
    argv = ["sleep", "60"]
    child = subprocess.Popen(argv, start_new_session=True)
    spawned.append(child)
    return ProcessRecord.of(name, child.pid, argv=argv, **how)


def test_the_state_round_trips_through_its_file(tmp_path: Path) -> None:
    assert load_state(tmp_path) is None  # no fleet here
    record = ProcessRecord("api", 4242, ("python3", "-m", "embervm", "server"), 99,
                           signal.SIGINT, True, 2.5)  # fmt: skip
    state = FleetState(
        postgres=ServiceRecord(tmp_path / "postgres", 5433),
        seaweedfs=ServiceRecord(tmp_path / "seaweedfs", 8333),
        processes=(record,),
        urls={"api": "http://127.0.0.1:8700", "database": "postgresql+asyncpg://x"},
    )
    save_state(tmp_path / "fleet", state)
    path = state_file(tmp_path / "fleet")
    assert path.name == "fleet.json"
    assert path.stat().st_mode & 0o777 == 0o600
    assert load_state(tmp_path / "fleet") == state


def test_with_process_replaces_a_process_of_the_same_name() -> None:
    first = ProcessRecord("host-1", 10, ("a",), 1)
    state = FleetState().with_process(first).with_process(ProcessRecord("api", 11, ("b",), 1))
    again = ProcessRecord("host-1", 12, ("a",), 2)  # the host restarted
    assert [p.pid for p in state.with_process(again).processes] == [11, 12]


def test_a_damaged_or_foreign_file_is_refused(tmp_path: Path) -> None:
    state_file(tmp_path).write_text("{not json")
    with pytest.raises(ConfigError, match="not a fleet state file"):
        load_state(tmp_path)
    state_file(tmp_path).write_text('{"format": 99}')
    with pytest.raises(ConfigError, match="nothing was stopped"):
        stop_all(tmp_path)
    assert state_file(tmp_path).exists()


def test_record_of_a_process_that_is_gone_fails() -> None:
    child = subprocess.Popen(["true"])
    child.wait(timeout=10)
    with pytest.raises(RuntimeFailure, match="not running"):
        ProcessRecord.of("api", child.pid)


def test_stop_all_stops_what_it_lists_last_started_first_and_removes_the_file(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    api = spawn(spawned, "api", group=True)
    proxy = spawn(spawned, "proxy", stop_signal=signal.SIGINT)
    host = spawn(spawned, "host-1", grace_seconds=1.0)
    gone = spawn(spawned, "host-2")
    spawned[-1].kill()
    spawned[-1].wait(timeout=10)
    save_state(tmp_path, FleetState(processes=(api, proxy, host, gone)))

    done = stop_all(tmp_path)
    assert done == [
        Stopped("host-2", "gone"), Stopped("host-1", "stopped"), Stopped("proxy", "stopped"),
        Stopped("api", "stopped"),
    ]  # fmt: skip
    assert [child.wait(timeout=5) for child in spawned[:3]] == [
        -signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM,
    ]  # fmt: skip
    assert not state_file(tmp_path).exists()
    assert stop_all(tmp_path) == []  # nothing started here any more


def test_stop_all_never_signals_a_pid_that_names_another_process_now(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    stranger = spawn(spawned, "stranger")
    # The record of a process that exited, whose pid the kernel gave to `stranger`:
    old = ProcessRecord("api", stranger.pid, ("python3", "-m", "embervm", "server", "--role",
                                              "api"), stranger.start_ticks - 100)  # fmt: skip
    save_state(tmp_path, FleetState(processes=(old,)))
    assert stop_all(tmp_path) == [Stopped("api", "not ours")]
    assert spawned[0].poll() is None  # untouched
    assert ProcessIdentity(stranger.pid, stranger.cmdline, stranger.start_ticks).matches_now()
    assert not state_file(tmp_path).exists()  # what it lists is gone (its pid is not it)


def test_stop_all_keeps_the_file_when_something_survives(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    survivor = spawn(spawned, "host-1")
    save_state(tmp_path, FleetState(processes=(survivor,)))

    def cannot(*_args: object, **_kwargs: object) -> str:
        raise RuntimeFailure("sleep (pid 1) survived SIGKILL for 10 s")

    monkeypatch.setattr(state_module, "stop_process", cannot)
    with pytest.raises(RuntimeFailure, match=r"still running: host-1; sleep .* survived"):
        stop_all(tmp_path)
    assert state_file(tmp_path).exists()  # `fleet down` can be run again
    monkeypatch.undo()
    assert stop_all(tmp_path) == [Stopped("host-1", "stopped")]


def test_services_that_are_not_running_are_reported_gone(tmp_path: Path) -> None:
    # Folders of a PostgreSQL and a SeaweedFS that run no more (or never ran): no binaries are
    # needed to find that out, and nothing is signalled.
    (tmp_path / "pg" / "data").mkdir(parents=True)
    (tmp_path / "pg" / "data" / "postmaster.pid").write_text(f"{os.getpid()}\n/elsewhere\n")
    save_state(tmp_path, FleetState(
        postgres=ServiceRecord(tmp_path / "pg", 5432),
        seaweedfs=ServiceRecord(tmp_path / "sw", 8333),
    ))  # fmt: skip
    assert stop_all(tmp_path) == [Stopped("seaweedfs", "gone"), Stopped("postgres", "gone")]
