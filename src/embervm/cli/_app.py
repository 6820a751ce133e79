"""Top-level typer application; sub-commands live in their own modules."""

from __future__ import annotations

import typer

from embervm import __version__

app = typer.Typer(
    name="embervm",
    help="Self-hosted AWS Lambda MicroVMs.",
    no_args_is_help=True,
    add_completion=False,
)


@app.command()
def version() -> None:
    """Print the version."""
    typer.echo(__version__)


def main() -> None:
    app()
