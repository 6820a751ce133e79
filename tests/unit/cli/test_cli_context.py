"""``cli/_context.py`` and the global options of ``cli/_app.py``: where the data dir and the API
are, which key pair signs, which CA verifies an ``https://`` API."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from typer.testing import CliRunner

from embervm import __version__
from embervm.cli import _app
from embervm.cli._context import EXIT_FAILED, EXIT_UNREACHABLE, CliContext, CliError
from embervm.config import DataDir

runner = CliRunner()


def _write_credentials(ctx: CliContext, text: str) -> Path:
    path = DataDir(ctx.data_dir).credentials
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


BOTH_PROFILES = """\
[default]
aws_access_key_id = AKIDDEFAULT
aws_secret_access_key = secret-default

[embervm]
aws_access_key_id = AKIDEMBERVM
aws_secret_access_key = secret-embervm
"""


def test_the_embervm_profile_wins_over_default(ctx: CliContext) -> None:
    _write_credentials(ctx, BOTH_PROFILES)
    assert ctx.credentials() == ("AKIDEMBERVM", "secret-embervm")


def test_default_is_used_when_embervm_is_missing_or_incomplete(ctx: CliContext) -> None:
    _write_credentials(
        ctx,
        "[embervm]\naws_access_key_id = AKIDHALF\n\n"
        "[default]\naws_access_key_id = AKIDDEFAULT\naws_secret_access_key = s\n",
    )
    assert ctx.credentials() == ("AKIDDEFAULT", "s")


def test_the_environment_wins_over_the_file(
    ctx: CliContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_credentials(ctx, BOTH_PROFILES)
    monkeypatch.setenv("EMBERVM_ACCESS_KEY_ID", "AKIDENV")
    monkeypatch.setenv("EMBERVM_SECRET_ACCESS_KEY", "secret-env")
    assert ctx.credentials() == ("AKIDENV", "secret-env")


def test_half_a_pair_in_the_environment_is_ignored(
    ctx: CliContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    _write_credentials(ctx, BOTH_PROFILES)
    monkeypatch.setenv("EMBERVM_ACCESS_KEY_ID", "AKIDENV")
    assert ctx.credentials() == ("AKIDEMBERVM", "secret-embervm")


def test_no_credentials_file_says_how_to_get_one_and_is_exit_3(ctx: CliContext) -> None:
    with pytest.raises(CliError) as raised:
        ctx.credentials()
    assert raised.value.exit_code == EXIT_UNREACHABLE
    assert str(DataDir(ctx.data_dir).credentials) in raised.value.message
    assert "embervm server" in raised.value.message


def test_a_file_without_a_usable_profile_is_exit_1(ctx: CliContext) -> None:
    path = _write_credentials(ctx, "[other]\naws_access_key_id = A\naws_secret_access_key = B\n")
    with pytest.raises(CliError) as raised:
        ctx.credentials()
    assert raised.value.exit_code == EXIT_FAILED
    assert str(path) in raised.value.message


def test_the_ca_bundle_is_the_environments_then_the_local_ca_then_none(
    ctx: CliContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert ctx.api_ca_bundle() is None  # boto3's own default
    ca = DataDir(ctx.data_dir).ca_file
    ca.parent.mkdir(parents=True)
    ca.write_text("not read here")
    assert ctx.api_ca_bundle() == str(ca)
    monkeypatch.setenv("EMBERVM_CA_BUNDLE", "/etc/operator-ca.pem")
    assert ctx.api_ca_bundle() == "/etc/operator-ca.pem"


def test_api_tls_verifies_with_the_bundle(ctx: CliContext, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def fake_context(*, cafile: str | None = None) -> ssl.SSLContext:
        seen.append(cafile)
        return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)

    monkeypatch.setattr(ssl, "create_default_context", fake_context)
    monkeypatch.setenv("EMBERVM_CA_BUNDLE", "/ca.pem")
    ctx.api_tls()
    assert seen == ["/ca.pem"]


def test_the_client_points_at_the_api_with_the_files_keys_and_is_made_once(
    ctx: CliContext,
) -> None:
    _write_credentials(ctx, BOTH_PROFILES)
    ctx.endpoint_url = "http://127.0.0.1:8799"
    ctx.region = "eu-west-1"
    client = ctx.client()
    assert client.meta.endpoint_url == "http://127.0.0.1:8799"
    assert client.meta.region_name == "eu-west-1"
    assert client._request_signer._credentials.access_key == "AKIDEMBERVM"
    assert ctx.client() is client


def test_the_client_needs_credentials_before_it_is_made(ctx: CliContext) -> None:
    with pytest.raises(CliError):
        ctx.client()
    assert ctx._client is None


# -- the global options ----------------------------------------------------------------------


@pytest.mark.usefixtures("ctx")
def test_global_options_build_the_context(tmp_path: Path) -> None:
    result = runner.invoke(
        _app.app,
        [
            "--data-dir",
            str(tmp_path / "x" / ".." / "d"),
            "--endpoint-url",
            "http://api.example:8700//",
            "--region",
            "eu-central-1",
            "version",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{__version__}\n"
    made = _app.current()
    assert made.data_dir == (tmp_path / "d").resolve()
    assert made.endpoint_url == "http://api.example:8700"
    assert made.region == "eu-central-1"


@pytest.mark.usefixtures("ctx")
def test_global_options_come_from_the_environment_too(tmp_path: Path) -> None:
    result = runner.invoke(
        _app.app,
        ["version"],
        env={
            "EMBERVM_DATA_DIR": str(tmp_path / "env-data"),
            "EMBERVM_ENDPOINT_URL": "https://api.example/",
            "EMBERVM_REGION": "ap-south-1",
        },
    )
    assert result.exit_code == 0, result.output
    made = _app.current()
    assert (made.data_dir, made.endpoint_url, made.region) == (
        (tmp_path / "env-data").resolve(),
        "https://api.example",
        "ap-south-1",
    )


@pytest.mark.usefixtures("ctx")
def test_without_options_the_context_has_the_defaults() -> None:
    assert runner.invoke(_app.app, ["version"]).exit_code == 0
    made = _app.current()
    assert (made.endpoint_url, made.region) == ("http://127.0.0.1:8700", "us-east-1")


def test_current_makes_a_default_context_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_app, "_state", {})
    first = _app.current()
    assert isinstance(first, CliContext)
    assert _app.current() is first


def test_the_endpoint_ca_missing_is_one_clear_error(ctx: CliContext) -> None:
    with pytest.raises(CliError) as raised:
        ctx.endpoint_tls()
    assert raised.value.exit_code == EXIT_FAILED
    assert str(DataDir(ctx.data_dir).ca_file) in raised.value.message
    assert "--data-dir" in raised.value.message
