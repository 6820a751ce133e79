"""The ``embervm`` command line (typer + rich)."""

from embervm.cli._app import app, main

__all__ = ["app", "main"]
