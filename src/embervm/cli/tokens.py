"""``embervm tokens rotate [--revoke]``: replace the key that seals endpoint and shell tokens.

Works on ``DATA_DIR/keys/tokens.json`` directly (no server needed, like ``credentials``); a
running server notices the change on its next token check. Without ``--revoke`` the old key
keeps opening the tokens it sealed until they expire (at most 60 min); with it, every token
issued before is refused at once and the WebSocket and shell sessions they opened end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embervm.cli._context import CliError
from embervm.cli._errors import handle_errors
from embervm.cli._output import OutputFormat, OutputOption, console, emit
from embervm.config import DataDir
from embervm.errors import EmbervmError

app = typer.Typer(
    name="tokens",
    help="Rotate the key that seals endpoint and shell tokens (DATA_DIR/keys/tokens.json).",
    no_args_is_help=True,
)


@app.command("rotate")
@handle_errors
def rotate(
    revoke: Annotated[
        bool,
        typer.Option(
            "--revoke",
            help="Drop the old keys too: every token issued before is refused now, and the "
            "sessions it opened close.",
        ),
    ] = False,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar="EMBERVM_DATA_DIR",
            help="Data directory (default: the global --data-dir or ~/.local/share/embervm).",
        ),
    ] = None,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Make a new key current (the server picks it up without a restart)."""
    from embervm.cli._app import current
    from embervm.core.tokens import TokenAuthority

    path = DataDir((data_dir or current().data_dir).expanduser().resolve()).token_keys
    try:
        key_id = TokenAuthority(path).rotate(revoke=revoke)
    except (OSError, ValueError, KeyError, EmbervmError) as exc:
        raise CliError(f"cannot rotate the token key in {path}: {exc}") from exc
    note = "older keys revoked" if revoke else "older keys kept until their tokens expire"
    emit(
        {"keyId": key_id, "revoked": revoke},
        output,
        lambda: console.print(f"token key {key_id} is current; {note}", markup=False),
    )
