"""``embervm server``: flags into ``Settings`` (``run_server`` faked: nothing starts), the
checks made before anything starts, and ``run_server``'s code as the exit code."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner
from typer.testing import Result as CliResult

from embervm.cli import server as server_cli
from embervm.cli._context import CliContext
from embervm.config import Settings
from embervm.server import app as server_app

runner = CliRunner()
cli = typer.Typer()
server_cli.register(cli)
cli.command("noop")(lambda: None)  # two commands: `server` is a subcommand


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> list[Settings]:
    seen: list[Settings] = []

    async def fake_run(settings: Settings) -> int:
        seen.append(settings)
        return 1 if settings.domain == "fails.example" else 0

    monkeypatch.setattr(server_app, "run_server", fake_run)
    monkeypatch.setattr(server_app, "event_loop_factory", lambda: asyncio.new_event_loop)
    return seen


def _server(*args: str) -> CliResult:
    return runner.invoke(cli, ["server", *args], env={"COLUMNS": "200"})


def test_defaults_take_the_contexts_data_dir_and_region(
    ctx: CliContext, started: list[Settings]
) -> None:
    ctx.region = "eu-west-3"
    assert _server().exit_code == 0
    (settings,) = started
    assert settings.data_dir == ctx.data_dir.resolve()
    assert settings.region == "eu-west-3"
    assert (settings.api_port, settings.proxy_port, settings.proxy_http_port) == (8700, 8443, 8780)
    assert settings.artifact_roots is None
    assert settings.artifact_s3_buckets is None  # every bucket of an own endpoint, none on AWS
    assert settings.api_tls_cert is None
    assert settings.api_tls_key is None


@pytest.mark.usefixtures("ctx")
def test_flags_reach_the_settings(tmp_path: Path, started: list[Settings]) -> None:
    (tmp_path / "cert.pem").write_text("c")
    (tmp_path / "key.pem").write_text("k")
    result = _server(
        *("--data-dir", str(tmp_path / "own"), "--api-port", "9700", "--domain", "vms.test"),
        *("--api-tls-cert", str(tmp_path / "cert.pem"), "--api-tls-key", str(tmp_path / "key.pem")),
        *("--artifact-private-network", "10.1.0.0/16", "--artifact-private-network", "fd00::/8"),
        *("--artifact-s3-bucket", "a", "--artifact-s3-bucket", "b"),
        *("--s3-endpoint-url", "https://minio.test:9000", "--log-retention-days", "0.5"),
    )
    assert result.exit_code == 0, result.output
    (settings,) = started
    assert settings.data_dir == (tmp_path / "own").resolve()
    assert (settings.api_port, settings.domain) == (9700, "vms.test")
    assert (settings.api_tls_cert, settings.api_tls_key) == (
        tmp_path / "cert.pem",
        tmp_path / "key.pem",
    )
    assert settings.artifact_private_networks == ("10.1.0.0/16", "fd00::/8")
    assert settings.artifact_s3_buckets == ("a", "b")
    assert settings.s3_endpoint_url == "https://minio.test:9000"
    assert settings.app_log_retention_days == 0.5


@pytest.mark.usefixtures("ctx")
@pytest.mark.parametrize("given", ["--api-tls-cert", "--api-tls-key"])
def test_a_certificate_and_its_key_go_together(
    tmp_path: Path, started: list[Settings], given: str
) -> None:
    result = _server(given, str(tmp_path / "one.pem"))
    assert result.exit_code == 2
    assert "--api-tls-cert and --api-tls-key go together" in result.output
    assert started == []


@pytest.mark.usefixtures("ctx")
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--s3-endpoint-url", "minio:9000"], "'minio:9000' is not an http(s) URL"),
        (["--artifact-private-network", "10.0.0.0/33"], "'10.0.0.0/33' is not a network"),
        (["--token-key-rotation-hours", "-1"], "--token-key-rotation-hours"),
        (["--proxy-max-connections", "0"], "--proxy-max-connections"),
    ],
)
def test_bad_flags_are_usage_errors_before_anything_starts(
    started: list[Settings], args: list[str], message: str
) -> None:
    result = _server(*args)
    assert result.exit_code == 2
    assert message in result.output
    assert started == []


@pytest.mark.usefixtures("ctx")
def test_the_servers_code_is_the_exit_code(started: list[Settings]) -> None:
    assert _server("--domain", "fails.example").exit_code == 1
    assert len(started) == 1
