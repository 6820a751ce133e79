"""Rendering: ``--output json`` prints machine-readable JSON; ``text`` prints for people.

Text comes from the server, and through it from guests and builds: rich markup in it is
escaped (a ``[/]`` in a message must not crash the CLI, a ``[link=...]`` must not turn into a
hyperlink), and :func:`safe_text` removes terminal control sequences from guest output before
it reaches the user's terminal.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text


class OutputFormat(enum.StrEnum):
    text = "text"
    json = "json"


OutputOption = Annotated[
    OutputFormat,
    typer.Option("--output", "-o", help="text for people, json for scripts."),
]

console = Console(highlight=False, soft_wrap=True)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def _default(value: object) -> object:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    raise TypeError(f"cannot serialize {type(value).__name__}")


# C0 controls but tab, DEL and C1 controls: escape sequences could retitle, recolour or
# rewrite the user's terminal (or its clipboard, OSC 52).
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")


def safe_text(text: str) -> str:
    """``text`` from a guest or build, printable on a terminal: controls become ``?``."""
    return _CONTROL.sub("?", text)


def one_line(text: str) -> str:
    """``text`` on one printable line (controls and runs of white space become one space)."""
    return " ".join(_CONTROL.sub(" ", text).split())


def to_json(value: object) -> str:
    return json.dumps(value, default=_default, indent=2, sort_keys=True)


def strip_metadata(response: Mapping[str, Any]) -> dict[str, Any]:
    """boto3 responses carry ``ResponseMetadata``; users never want it."""
    return {k: v for k, v in response.items() if k != "ResponseMetadata"}


def emit(value: object, output: OutputFormat, text: Callable[[], None]) -> None:
    if output is OutputFormat.json:
        sys.stdout.write(to_json(value) + "\n")
    else:
        text()


def table(columns: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column)
    for row in rows:
        grid.add_row(*(Text("" if cell is None else safe_text(str(cell))) for cell in row))
    console.print(grid)


def fields(pairs: Iterable[tuple[str, object]]) -> None:
    for name, value in pairs:
        if value is None or value == "" or value == [] or value == {}:
            continue
        if isinstance(value, dt.datetime):
            value = value.isoformat(timespec="seconds")
        elif isinstance(value, (dict, list)):
            value = json.dumps(value, default=_default)
        console.print(f"[bold]{escape(name)}[/bold]: {escape(safe_text(str(value)))}")
