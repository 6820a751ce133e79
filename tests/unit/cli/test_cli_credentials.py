"""``embervm credentials``: what tests/unit/api/test_api_credentials.py leaves out: the data
dir of the global options, text output, and the store's errors as one line and an exit code."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from embervm.api.credentials import CredentialStore
from embervm.cli._context import CliContext
from embervm.cli.credentials import app
from embervm.config import DataDir

runner = CliRunner()


def test_without_data_dir_the_global_one_is_used(ctx: CliContext) -> None:
    created = runner.invoke(app, ["create", "--profile", "ops"])
    assert created.exit_code == 0, created.output
    store = CredentialStore(DataDir(ctx.data_dir).credentials)
    assert [c.profiles for c in store.list()] == [("ops",)]


def test_create_prints_the_secret_once_and_where_it_was_written(ctx: CliContext) -> None:
    created = runner.invoke(app, ["create", "--profile", "ops"])
    (credential,) = CredentialStore(DataDir(ctx.data_dir).credentials).list()
    lines = created.stdout.splitlines()
    assert lines[0] == "profile: ops"
    assert lines[1] == f"aws_access_key_id: {credential.access_key_id}"
    assert lines[2] == f"aws_secret_access_key: {credential.secret_access_key}"
    assert lines[3] == f"written to {DataDir(ctx.data_dir).credentials}"

    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0
    assert credential.access_key_id in listed.stdout
    assert "ops" in listed.stdout
    assert credential.secret_access_key not in listed.stdout


def test_a_bad_profile_name_is_one_error_line_and_exit_1(ctx: CliContext) -> None:
    result = runner.invoke(app, ["create", "--profile", "no spaces [here]"])
    assert result.exit_code == 1
    assert result.stderr.startswith("error: profile name 'no spaces [here]' must match")
    assert len(result.stderr.splitlines()) == 1
    assert not DataDir(ctx.data_dir).credentials.exists()


@pytest.mark.parametrize("command", [["list"], ["revoke", "AKIDX"], ["create"]])
def test_a_corrupt_file_is_exit_1_for_every_command(ctx: CliContext, command: list[str]) -> None:
    path = DataDir(ctx.data_dir).credentials
    path.parent.mkdir(parents=True)
    path.write_text("not an ini file\n")
    result = runner.invoke(app, command)
    assert result.exit_code == 1
    assert "not an AWS credentials file" in result.stderr
    assert "Traceback" not in result.output


def test_revoke_says_what_it_did_and_an_unknown_key_is_exit_4(ctx: CliContext) -> None:
    key = CredentialStore(DataDir(ctx.data_dir).credentials).create("x").access_key_id
    done = runner.invoke(app, ["revoke", key])
    assert (done.exit_code, done.stdout) == (0, f"revoked {key}\n")
    again = runner.invoke(app, ["revoke", key])
    assert again.exit_code == 4
    assert again.stderr == f"error: no key {key} in {DataDir(ctx.data_dir).credentials}\n"
