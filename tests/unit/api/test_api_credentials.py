"""The credentials file: first-start pair, create/list/revoke, live reload, the CLI."""

from __future__ import annotations

import configparser
import json
import os
import stat
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embervm.api import CredentialStore
from embervm.cli.credentials import app
from embervm.errors import ConfigError


def test_first_start_writes_one_pair_as_default_and_embervm(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials")
    credential = store.ensure()
    parser = configparser.ConfigParser()
    parser.read(tmp_path / "credentials")
    assert set(parser.sections()) == {"default", "embervm"}
    for profile in ("default", "embervm"):
        assert parser[profile]["aws_access_key_id"] == credential.access_key_id
        assert parser[profile]["aws_secret_access_key"] == credential.secret_access_key
    assert credential.access_key_id.startswith("AKIA")
    assert len(credential.access_key_id) == 20
    assert len(credential.secret_access_key) == 40


def test_the_file_is_private(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials")
    store.ensure()
    assert stat.S_IMODE(os.stat(tmp_path / "credentials").st_mode) == 0o600


def test_ensure_keeps_an_existing_pair(tmp_path: Path) -> None:
    first = CredentialStore(tmp_path / "credentials").ensure()
    assert CredentialStore(tmp_path / "credentials").ensure() == first


def test_ensure_adds_the_default_pair_when_only_other_keys_exist(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials")
    other = store.create("ci")
    default = store.ensure()
    assert default.access_key_id != other.access_key_id
    assert "embervm" in default.profiles


def test_botocore_reads_the_file_as_a_shared_credentials_file(tmp_path: Path) -> None:
    import botocore.session

    credential = CredentialStore(tmp_path / "credentials").ensure()
    session = botocore.session.Session(profile="embervm")
    session.set_config_variable("credentials_file", str(tmp_path / "credentials"))
    session.set_config_variable("config_file", str(tmp_path / "none"))
    found = session.get_credentials()
    assert found.access_key == credential.access_key_id
    assert found.secret_key == credential.secret_access_key


def test_create_list_revoke(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials")
    default = store.ensure()
    created = store.create("ci")
    listed = {c.access_key_id: c.profiles for c in store.list()}
    assert listed == {default.access_key_id: ("default", "embervm"), created.access_key_id: ("ci",)}
    assert store.revoke(created.access_key_id) is True
    assert store.revoke(created.access_key_id) is False
    assert [c.access_key_id for c in store.list()] == [default.access_key_id]


def test_profile_names_are_checked_and_unique(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials")
    store.create("ci")
    with pytest.raises(ConfigError, match="already exists"):
        store.create("ci")
    with pytest.raises(ConfigError, match="must match"):
        store.create("bad name]")


def test_lookups_follow_changes_made_by_another_process(tmp_path: Path) -> None:
    server_view = CredentialStore(tmp_path / "credentials")
    cli_view = CredentialStore(tmp_path / "credentials")
    server_view.ensure()
    created = cli_view.create("late")
    assert server_view.secret_for(created.access_key_id) == created.secret_access_key
    cli_view.revoke(created.access_key_id)
    assert server_view.secret_for(created.access_key_id) is None


def test_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    store = CredentialStore(tmp_path / "credentials")
    store.ensure()
    store.create("a")
    store.revoke(store.create("b").access_key_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["credentials", "credentials.lock"]


def test_a_corrupt_file_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "credentials").write_text("not an ini file\n")
    with pytest.raises(ConfigError, match="not an AWS credentials file"):
        CredentialStore(tmp_path / "credentials").list()


def test_cli_create_list_revoke_with_json_output(tmp_path: Path) -> None:
    runner = CliRunner()
    created = runner.invoke(
        app, ["create", "--profile", "ci", "--data-dir", str(tmp_path), "--output", "json"]
    )
    assert created.exit_code == 0, created.output
    pair = json.loads(created.output)
    assert pair["profiles"] == ["ci"]
    assert (
        CredentialStore(tmp_path / "credentials").secret_for(pair["accessKeyId"])
        == pair["secretAccessKey"]
    )

    listed = runner.invoke(app, ["list", "--data-dir", str(tmp_path), "--output", "json"])
    assert json.loads(listed.output) == [{"accessKeyId": pair["accessKeyId"], "profiles": ["ci"]}]
    assert (
        pair["secretAccessKey"]
        not in runner.invoke(app, ["list", "--data-dir", str(tmp_path)]).output
    )

    revoked = runner.invoke(app, ["revoke", pair["accessKeyId"], "--data-dir", str(tmp_path)])
    assert revoked.exit_code == 0
    again = runner.invoke(app, ["revoke", pair["accessKeyId"], "--data-dir", str(tmp_path)])
    assert again.exit_code == 4
