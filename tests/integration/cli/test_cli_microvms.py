"""``embervm run|ls|get|suspend|resume|terminate|token|logs|curl|shell`` as a user runs them:
happy paths, their clearest failures (unknown 4, conflict 5, invalid 6) and ``--output json``
round trips."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from tests.framework.cli_harness import (
    Following,
    FollowingAppLogs,
    as_json,
    cli,
    json_lines,
    one_error_line,
)
from tests.framework.core_live_server import CoreServer

UNKNOWN = "mvm-00000000000000000000"


@pytest.fixture
def vm(cli_server: CoreServer, image: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A RUNNING VM of ``web`` with shell access, terminated after the test."""
    started = as_json(
        cli(cli_server, "run", "web", "--idle-seconds", "600", "--shell", "--output", "json")
    )
    yield started
    cli(cli_server, "terminate", started["microvmId"])


def _app_logs(server: CoreServer) -> FollowingAppLogs:
    assert isinstance(server.app_logs, FollowingAppLogs)
    return server.app_logs


def test_run_prints_id_endpoint_and_a_token_and_round_trips_as_json(
    cli_server: CoreServer, vm: dict[str, Any]
) -> None:
    vm_id = vm["microvmId"]
    assert vm["state"] == "RUNNING"
    assert vm["endpoint"].startswith(f"https://{vm_id}.")
    assert vm["token"].startswith("fake-endpoint-token")
    assert vm["imageVersion"] == "1"
    got = as_json(cli(cli_server, "get", vm_id, "--output", "json"))
    assert got["microvmId"] == vm_id
    assert got["idlePolicy"] == {
        "maxIdleDurationSeconds": 600,
        "suspendedDurationSeconds": 3600,
        "autoResumeEnabled": True,
    }
    assert any(c.endswith(":SHELL_INGRESS") for c in got["ingressNetworkConnectors"])
    assert any(c.endswith(":INTERNET_EGRESS") for c in got["egressNetworkConnectors"])
    assert vm_id in {v["microvmId"] for v in as_json(cli(cli_server, "ls", "--output", "json"))}


def test_run_text_output_is_ready_to_paste(cli_server: CoreServer, image: dict[str, Any]) -> None:
    done = cli(cli_server, "run", "web", "--no-egress")
    assert done.returncode == 0, done.stderr
    vm_id = done.stdout.split()[0]
    try:
        assert f"try:      embervm curl {vm_id} /" in done.stdout
        assert "X-aws-proxy-auth: fake-endpoint-token" in done.stdout
        got = as_json(cli(cli_server, "get", vm_id, "-o", "json"))
        assert not got.get("egressNetworkConnectors")
        assert not any(c.endswith(":SHELL_INGRESS") for c in got["ingressNetworkConnectors"])
    finally:
        cli(cli_server, "terminate", vm_id)


def test_suspend_resume_terminate_and_the_conflict_of_suspending_twice(
    cli_server: CoreServer, vm: dict[str, Any]
) -> None:
    vm_id = vm["microvmId"]
    suspended = as_json(cli(cli_server, "suspend", vm_id, "--output", "json"))
    assert (suspended["microvmId"], suspended["state"]) == (vm_id, "SUSPENDED")
    again = cli(cli_server, "suspend", vm_id)
    assert again.returncode == 5
    assert "ConflictException" in one_error_line(again)
    assert as_json(cli(cli_server, "resume", vm_id, "--output", "json"))["state"] == "RUNNING"
    done = as_json(cli(cli_server, "terminate", vm_id, "--output", "json"))
    assert done["state"] == "TERMINATED"
    assert vm_id not in {v["microvmId"] for v in as_json(cli(cli_server, "ls", "-o", "json"))}
    every = as_json(cli(cli_server, "ls", "--all", "-o", "json"))
    assert {v["microvmId"]: v["state"] for v in every}[vm_id] == "TERMINATED"
    assert cli(cli_server, "terminate", vm_id).returncode == 0  # idempotent


def test_token_round_trips_as_json_and_prints_bare_for_scripts(
    cli_server: CoreServer, vm: dict[str, Any]
) -> None:
    vm_id = vm["microvmId"]
    endpoint = as_json(cli(cli_server, "token", vm_id, "--port", "8080", "-o", "json"))
    assert endpoint["X-aws-proxy-auth"].startswith("fake-endpoint-token")
    shell = as_json(cli(cli_server, "token", vm_id, "--shell", "--minutes", "5", "-o", "json"))
    assert shell["X-aws-proxy-auth"].startswith("fake-shell-token")
    bare = cli(cli_server, "token", vm_id)
    assert bare.stdout.strip().startswith("fake-endpoint-token")
    assert len(bare.stdout.splitlines()) == 1
    assert cli(cli_server, "token", vm_id, "--minutes", "61").returncode == 2


def test_logs_prints_the_apps_lines_and_json_lines(
    cli_server: CoreServer, vm: dict[str, Any]
) -> None:
    vm_id = vm["microvmId"]
    _app_logs(cli_server).logs[vm_id] = ["listening on 8080", "GET / 200", "\x1b]52;c;evil\x07"]  # type: ignore[index]
    text = cli(cli_server, "logs", vm_id)
    assert text.stdout.splitlines() == ["listening on 8080", "GET / 200", "?]52;c;evil?"]
    records = json_lines(cli(cli_server, "logs", vm_id, "--output", "json"))
    assert [r["line"] for r in records] == ["listening on 8080", "GET / 200", "\x1b]52;c;evil\x07"]
    assert {r["microvmId"] for r in records} == {vm_id}


def test_logs_follow_streams_lines_as_they_come_until_the_vm_ends(
    cli_server: CoreServer, vm: dict[str, Any]
) -> None:
    vm_id = vm["microvmId"]
    logs = _app_logs(cli_server)
    logs.logs[vm_id] = ["booted"]  # type: ignore[index]
    follower = Following(cli_server, "logs", vm_id, "--follow")
    try:
        assert follower.line() == "booted"
        logs.push(vm_id, "GET /counter 200")
        assert follower.line() == "GET /counter 200"
        assert follower.proc.poll() is None  # still following
        logs.end(vm_id)
        code, rest, err = follower.wait()
        assert (code, rest, err) == (0, "", "")
    finally:
        follower.kill()


def test_a_follower_that_goes_away_is_let_go_by_the_server(
    cli_server: CoreServer, vm: dict[str, Any]
) -> None:
    vm_id = vm["microvmId"]
    logs = _app_logs(cli_server)
    logs.logs[vm_id] = ["booted"]  # type: ignore[index]
    follower = Following(cli_server, "logs", vm_id, "-f")
    assert follower.line() == "booted"
    assert logs.readers >= 1
    follower.kill()  # Ctrl-C, a closed terminal: the server must not keep reading for it
    deadline = time.monotonic() + 30
    while logs.readers and time.monotonic() < deadline:
        time.sleep(0.05)
    assert logs.readers == 0
    assert as_json(cli(cli_server, "get", vm_id, "-o", "json"))["state"] == "RUNNING"


def test_unknown_ids_are_exit_4_for_every_command_that_takes_one(cli_server: CoreServer) -> None:
    for command in ("get", "suspend", "resume", "terminate", "token", "logs", "curl", "shell"):
        done = cli(cli_server, command, UNKNOWN)
        assert done.returncode == 4, (command, done.stderr)
        assert "ResourceNotFoundException" in one_error_line(done), command
    assert cli(cli_server, "run", "no-such-image").returncode == 4


def test_invalid_input_is_exit_6_in_one_line(cli_server: CoreServer, image: dict[str, Any]) -> None:
    done = cli(cli_server, "run", "web", "--idle-seconds", "10")
    assert done.returncode == 6
    assert "60" in one_error_line(done)
    too_long = cli(cli_server, "run", "web", "--max-duration", "999999")
    assert too_long.returncode == 6
    assert "maximumDurationInSeconds" in one_error_line(too_long)


def test_server_messages_are_printed_as_text_on_one_line(cli_server: CoreServer) -> None:
    # The server echoes the id: rich markup in it is not interpreted, a newline not kept.
    done = cli(cli_server, "get", "[/]bad\nid")
    assert done.returncode == 4
    assert "MicroVM [/]bad id not found" in one_error_line(done)
    too_long = cli(cli_server, "run", "web", "--max-duration", "999999")
    assert too_long.returncode == 6


def test_run_memory_must_match_the_image_versions_snapshot(
    cli_server: CoreServer, image: dict[str, Any]
) -> None:
    mismatch = cli(cli_server, "run", "web", "--memory", "4096")
    assert mismatch.returncode == 6
    assert "built for 1024 MiB" in one_error_line(mismatch)
    assert "images create" in mismatch.stderr
    matching = as_json(cli(cli_server, "run", "web", "--memory", "1024", "-o", "json"))
    cli(cli_server, "terminate", matching["microvmId"])
    assert matching["state"] == "RUNNING"


def test_shell_needs_a_vm_run_with_shell(cli_server: CoreServer, image: dict[str, Any]) -> None:
    plain = as_json(cli(cli_server, "run", "web", "-o", "json"))
    try:
        done = cli(cli_server, "shell", plain["microvmId"])
        assert done.returncode == 6
        assert "SHELL_INGRESS" in one_error_line(done)
    finally:
        cli(cli_server, "terminate", plain["microvmId"])
