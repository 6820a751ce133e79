"""The local fleet's process plumbing: a process is its pid, command line and start time, and
``stop_process`` signals only the process it was given (never one that inherited its pid)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from embervm.errors import RuntimeFailure
from embervm.localfleet._proc import (
    ProcessIdentity,
    free_ports,
    is_gone,
    read_cmdline,
    run,
    stop_process,
    tail,
    tail_file,
    wait_pidfd,
)

pytestmark = pytest.mark.timeout(60)

# A Python child that says "ready" once its SIGTERM handling is in place, then waits.
IGNORES_TERM = (
    "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('ready', flush=True); time.sleep(60)"
)


def start(spawned: list[subprocess.Popen[bytes]], argv: list[str]) -> ProcessIdentity:
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, start_new_session=True)
    spawned.append(child)
    if argv[0] == sys.executable:
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
    return ProcessIdentity.after_spawn(child.pid, argv)


def test_a_process_is_its_pid_command_line_and_start_time(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    me = ProcessIdentity.of(os.getpid())
    assert me is not None
    assert me.matches_now()
    assert me.cmdline == read_cmdline(os.getpid())
    sleeper = start(spawned, ["sleep", "60"])
    assert sleeper.cmdline == ("sleep", "60")
    assert sleeper.matches_now()
    # The same pid with another start time or command line is another process.
    assert not ProcessIdentity(sleeper.pid, sleeper.cmdline, sleeper.start_ticks + 1).matches_now()
    assert not ProcessIdentity(sleeper.pid, ("sleep", "61"), sleeper.start_ticks).matches_now()


def test_stop_sends_the_signal_and_reports_what_happened(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    sleeper = start(spawned, ["sleep", "60"])
    assert stop_process(sleeper, grace=10) == "stopped"
    assert is_gone(sleeper.pid)
    spawned[-1].wait(timeout=5)
    assert stop_process(sleeper) == "gone"  # reaped: nothing left to stop

    stubborn = start(spawned, [sys.executable, "-c", IGNORES_TERM])
    assert stop_process(stubborn, grace=0.3) == "killed"  # SIGTERM ignored: SIGKILL after grace
    assert spawned[-1].wait(timeout=5) == -signal.SIGKILL

    other = start(spawned, ["sleep", "60"])
    assert stop_process(other, first=None) == "killed"  # kill(): SIGKILL at once
    assert spawned[-1].wait(timeout=5) == -signal.SIGKILL


def test_a_pid_that_names_another_process_now_is_left_alone(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    alive = start(spawned, ["sleep", "60"])
    # What a record says after the recorded process exited and its pid went to this one:
    recorded = ProcessIdentity(alive.pid, ("weed", "mini"), alive.start_ticks)
    assert stop_process(recorded, grace=0.1) == "not ours"
    reused = ProcessIdentity(alive.pid, alive.cmdline, alive.start_ticks - 5)
    assert stop_process(reused, grace=0.1) == "not ours"
    assert alive.matches_now()
    assert spawned[-1].poll() is None


def test_a_group_is_stopped_whole_even_a_member_that_ignores_sigterm(
    spawned: list[subprocess.Popen[bytes]],
) -> None:
    # A leader (sh) with two members: one exits on SIGTERM, one ignores it.
    script = f'sleep 60 & {sys.executable} -c "{IGNORES_TERM}" & wait'
    leader = start(spawned, ["sh", "-c", script])
    assert spawned[-1].stdout is not None
    assert spawned[-1].stdout.readline() == b"ready\n"
    members = [int(p) for p in subprocess.check_output(["pgrep", "-g", str(leader.pid)]).split()]
    assert len(members) == 3
    pidfds = [os.pidfd_open(pid) for pid in members]
    try:
        assert stop_process(leader, group=True, grace=10) == "stopped"
        spawned[-1].wait(timeout=5)
        for pid, fd in zip(members, pidfds, strict=True):
            assert wait_pidfd(fd, 5), pid  # the one that ignored SIGTERM got SIGKILL
    finally:
        for fd in pidfds:
            os.close(fd)


def test_a_zombie_counts_as_gone(spawned: list[subprocess.Popen[bytes]]) -> None:
    child = subprocess.Popen(["true"], start_new_session=True)
    spawned.append(child)
    fd = os.pidfd_open(child.pid)
    try:
        assert wait_pidfd(fd, 10)  # exited; not reaped yet: a zombie
    finally:
        os.close(fd)
    assert is_gone(child.pid)
    assert ProcessIdentity.of(child.pid) is None
    assert stop_process(ProcessIdentity(child.pid, ("true",), 1)) == "gone"


def test_after_spawn_fails_for_a_process_that_exits_at_once() -> None:
    child = subprocess.Popen(["false"])
    child.wait(timeout=10)
    with pytest.raises(RuntimeFailure, match="exited or did not start"):
        ProcessIdentity.after_spawn(child.pid, ["false"], timeout=1)


def test_run_bounds_every_command_and_says_why_it_failed(tmp_path: Path) -> None:
    assert run(["echo", "hi"], what="echo", timeout=10).stdout == "hi\n"
    with pytest.raises(RuntimeFailure, match=r"listing failed \(exit 2\): .*No such file"):
        run(["ls", str(tmp_path / "nope")], what="listing", timeout=10)
    with pytest.raises(RuntimeFailure, match=r"napping did not finish in 0.2 s"):
        run(["sleep", "30"], what="napping", timeout=0.2)
    with pytest.raises(RuntimeFailure, match="could not run"):
        run([str(tmp_path / "missing-binary")], what="x", timeout=10)
    assert run(["cat"], what="cat", timeout=10, input_text="fed").stdout == "fed"


def test_free_ports_are_distinct_and_tails_are_short(tmp_path: Path) -> None:
    ports = free_ports(12)
    assert len(set(ports)) == 12
    assert tail("\n".join(str(i) for i in range(20)), lines=3) == "17 | 18 | 19"
    assert tail("") == "(no output)"
    log = tmp_path / "log"
    log.write_text("x\n" * 10000 + "last words\n")
    assert tail_file(log, lines=1) == "last words"
    assert tail_file(tmp_path / "none") == "(no log)"


def test_a_script_is_recorded_with_its_interpreter(
    tmp_path: Path, spawned: list[subprocess.Popen[bytes]]
) -> None:
    script = tmp_path / "role"
    script.write_text("#!/bin/sh\nsleep 60\n")
    script.chmod(0o755)
    argv = [str(script), "--role", "api"]
    spawned.append(subprocess.Popen(argv, start_new_session=True))
    identity = ProcessIdentity.after_spawn(spawned[-1].pid, argv)
    assert identity.cmdline == ("/bin/sh", str(script), "--role", "api")
    assert stop_process(identity, group=True) == "stopped"  # sh and its sleep
