"""The commands' behaviour without a server (exit 3 in one line), and the ones that need none:
``credentials``, ``doctor``, ``version``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.framework.cli_harness import as_json, cli, one_error_line
from tests.framework.core_live_server import CoreServer, free_port

import embervm

DOWN_COMMANDS = [
    ("ls",),
    ("get", "mvm-00000000000000000000"),
    ("run", "web"),
    ("suspend", "mvm-00000000000000000000"),
    ("token", "mvm-00000000000000000000"),
    ("logs", "mvm-00000000000000000000", "--follow"),
    ("curl", "mvm-00000000000000000000"),
    ("shell", "mvm-00000000000000000000"),
    ("images", "ls"),
    ("images", "logs", "web", "--version", "1"),
    ("images", "create", "{app}", "--name", "web", "--follow"),
]


@pytest.fixture
def keys_only(tmp_path: Path) -> Path:
    """A data dir with credentials but no server behind it."""
    (tmp_path / "credentials").write_text(
        "[default]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = secret\n"
    )
    return tmp_path


@pytest.mark.parametrize("args", DOWN_COMMANDS, ids=" ".join)
def test_server_down_is_exit_3_in_one_line(
    keys_only: Path, app_dir: Path, args: tuple[str, ...]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens once the probe socket closed
    argv = [arg.format(app=app_dir) for arg in args]
    done = cli(None, *argv, data_dir=keys_only, url=url)
    assert done.returncode == 3, done.stderr
    assert "is `embervm server` running?" in one_error_line(done)
    assert done.stdout == ""


def test_no_credentials_says_how_to_get_them(tmp_path: Path) -> None:
    done = cli(None, "ls", data_dir=tmp_path)
    assert done.returncode == 3
    assert "start the server once" in one_error_line(done)


def test_credentials_create_list_revoke(tmp_path: Path) -> None:
    created = as_json(
        cli(None, "credentials", "create", "--profile", "ci", "-o", "json", data_dir=tmp_path)
    )
    key, secret = created["accessKeyId"], created["secretAccessKey"]
    assert created["profiles"] == ["ci"]
    assert (tmp_path / "credentials").stat().st_mode & 0o077 == 0
    listed = as_json(cli(None, "credentials", "list", "-o", "json", data_dir=tmp_path))
    assert {"accessKeyId": key, "profiles": ["ci"]} in listed
    text = cli(None, "credentials", "list", data_dir=tmp_path)
    assert key in text.stdout
    assert secret not in text.stdout + json.dumps(listed)
    revoked = as_json(cli(None, "credentials", "revoke", key, "-o", "json", data_dir=tmp_path))
    assert revoked == {"accessKeyId": key, "revoked": True}
    assert key not in cli(None, "credentials", "list", data_dir=tmp_path).stdout
    again = cli(None, "credentials", "revoke", key, data_dir=tmp_path)
    assert again.returncode == 4
    assert key in one_error_line(again)


def test_credentials_a_revoked_key_is_refused_by_a_running_server(
    cli_server: CoreServer,
) -> None:
    created = as_json(
        cli(cli_server, "credentials", "create", "--profile", "revocable", "-o", "json")
    )
    env = {
        **os.environ,
        "EMBERVM_ACCESS_KEY_ID": created["accessKeyId"],
        "EMBERVM_SECRET_ACCESS_KEY": created["secretAccessKey"],
    }
    assert cli(cli_server, "ls", env=env).returncode == 0
    assert cli(cli_server, "credentials", "revoke", created["accessKeyId"]).returncode == 0
    refused = cli(cli_server, "ls", env=env)
    assert refused.returncode == 1
    assert "AccessDeniedException" in one_error_line(refused)


def test_doctor_reports_every_check_and_its_exit_code_follows_them(tmp_path: Path) -> None:
    done = cli(None, "doctor", "--output", "json", data_dir=tmp_path)
    report = json.loads(done.stdout)
    names = {check["name"] for check in report}
    assert {"qemu-system-x86_64", "nftables", "accelerator", "disk space", "port 8700"} <= names
    assert all(set(check) == {"name", "ok", "detail", "fix", "fatal"} for check in report)
    problems = [c for c in report if not c["ok"] and c["fatal"]]
    assert done.returncode == (1 if problems else 0), problems


def test_doctor_names_missing_tools_with_their_fix_and_fails(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path / "empty")}
    done = cli(None, "doctor", data_dir=tmp_path, env=env)
    assert done.returncode == 1
    assert "FAIL qemu-system-x86_64: not installed" in done.stdout
    assert "fix: run `make setup`" in done.stdout
    assert "(package qemu-system-x86)" in done.stdout


def test_version_and_help_need_no_server() -> None:
    done = cli(None, "version")
    assert done.stdout.strip() == embervm.__version__
    help_text = cli(None, "--help").stdout
    for command in ("images", "run", "logs", "doctor", "credentials", "shell", "curl"):
        assert command in help_text
