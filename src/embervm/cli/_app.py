"""Top-level typer application: global options, then the command groups."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embervm import __version__
from embervm.cli._context import CliContext

app = typer.Typer(
    name="embervm",
    help="Self-hosted AWS Lambda MicroVMs: real microVMs behind the lambda-microvms API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

_state: dict[str, CliContext] = {}


def current() -> CliContext:
    """The context built from the global options (or defaults, e.g. in tests)."""
    if "ctx" not in _state:
        _state["ctx"] = CliContext()
    return _state["ctx"]


@app.callback()
def _global(
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar="EMBERVM_DATA_DIR",
            help="Data directory (default ~/.local/share/embervm).",
        ),
    ] = None,
    endpoint_url: Annotated[
        str | None,
        typer.Option(
            "--endpoint-url",
            envvar="EMBERVM_ENDPOINT_URL",
            help="Control API URL (default http://127.0.0.1:8700).",
        ),
    ] = None,
    region: Annotated[
        str | None, typer.Option("--region", envvar="EMBERVM_REGION", help="Region name.")
    ] = None,
) -> None:
    ctx = CliContext()
    if data_dir is not None:
        ctx.data_dir = data_dir.expanduser().resolve()
    if endpoint_url:
        ctx.endpoint_url = endpoint_url.rstrip("/")
    if region:
        ctx.region = region
    _state["ctx"] = ctx


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def _register() -> None:
    from embervm.cli import credentials, doctor, fleet, images, microvms, server, shell, tokens

    app.add_typer(credentials.app, name="credentials")
    app.add_typer(fleet.app, name="fleet")
    app.add_typer(tokens.app, name="tokens")
    server.register(app)
    images.register(app)
    microvms.register(app)
    doctor.register(app)
    shell.register(app)


def main() -> None:
    _register()
    app()
