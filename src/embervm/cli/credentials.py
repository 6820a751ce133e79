"""``embervm credentials create|list|revoke``: the API key pairs in ``DATA_DIR/credentials``.

Works on the file directly (no server needed); a running server picks changes up on the next
request. Secrets are printed once, by ``create``; ``list`` never shows them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from embervm.api.credentials import Credential, CredentialStore
from embervm.cli._context import EXIT_NOT_FOUND, CliError
from embervm.cli._errors import handle_errors
from embervm.cli._output import OutputFormat, OutputOption, console, emit, fields, table
from embervm.config import DataDir
from embervm.errors import ConfigError

app = typer.Typer(
    name="credentials",
    help="Create, list and revoke API key pairs (DATA_DIR/credentials).",
    no_args_is_help=True,
)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="EMBERVM_DATA_DIR",
        help="Data directory (default: the global --data-dir or ~/.local/share/embervm).",
    ),
]


def _store(data_dir: Path | None) -> CredentialStore:
    if data_dir is None:
        from embervm.cli._app import current

        data_dir = current().data_dir
    return CredentialStore(DataDir(data_dir.expanduser().resolve()).credentials)


def _public(credential: Credential) -> dict[str, object]:
    return {"accessKeyId": credential.access_key_id, "profiles": list(credential.profiles)}


@app.command("create")
@handle_errors
def create(
    profile: Annotated[
        str | None,
        typer.Option("--profile", help="Profile name (default key-<last 6 of the key id>)."),
    ] = None,
    data_dir: DataDirOption = None,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Create a new key pair; the secret is shown only now."""
    store = _store(data_dir)
    try:
        credential = store.create(profile)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    value = {**_public(credential), "secretAccessKey": credential.secret_access_key}

    def text() -> None:
        fields(
            [
                ("profile", credential.profiles[0]),
                ("aws_access_key_id", credential.access_key_id),
                ("aws_secret_access_key", credential.secret_access_key),
            ]
        )
        console.print(f"written to {store.path}", markup=False)

    emit(value, output, text)


@app.command("list")
@handle_errors
def list_(data_dir: DataDirOption = None, output: OutputOption = OutputFormat.text) -> None:
    """List key pairs (ids and profiles, never secrets)."""
    store = _store(data_dir)
    try:
        credentials = store.list()
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    emit(
        [_public(c) for c in credentials],
        output,
        lambda: table(
            ["ACCESS KEY ID", "PROFILES"],
            [(c.access_key_id, ",".join(c.profiles)) for c in credentials],
        ),
    )


@app.command("revoke")
@handle_errors
def revoke(
    access_key_id: Annotated[str, typer.Argument(help="The access key id to revoke.")],
    data_dir: DataDirOption = None,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Revoke a key pair: every profile holding it is removed; the server refuses it at once."""
    store = _store(data_dir)
    try:
        removed = store.revoke(access_key_id)
    except ConfigError as exc:
        raise CliError(str(exc)) from exc
    if not removed:
        raise CliError(f"no key {access_key_id} in {store.path}", EXIT_NOT_FOUND)
    emit(
        {"accessKeyId": access_key_id, "revoked": True},
        output,
        lambda: console.print(f"revoked {access_key_id}", markup=False),
    )
