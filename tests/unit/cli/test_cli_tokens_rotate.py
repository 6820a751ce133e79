"""``embervm tokens rotate``: a new current key in ``DATA_DIR/keys/tokens.json``; the older
keys kept (until their tokens expire) or, with ``--revoke``, dropped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from typer.testing import CliRunner

from embervm.cli import tokens
from embervm.cli._context import CliContext
from embervm.config import DataDir
from embervm.core.tokens import TokenAuthority

runner = CliRunner()
app = typer.Typer()  # as `embervm` adds it: `tokens` is a group
app.add_typer(tokens.app, name="tokens")


def _keys(data_dir: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(DataDir(data_dir).token_keys.read_text())
    return body


def _seed(data_dir: Path) -> str:
    """A key file as the server's first start leaves it; its current key id."""
    return TokenAuthority(DataDir(data_dir).token_keys)._current


def test_rotate_makes_a_new_key_current_and_keeps_the_old_one(tmp_path: Path) -> None:
    first = _seed(tmp_path)
    result = runner.invoke(
        app, ["tokens", "rotate", "--data-dir", str(tmp_path), "--output", "json"]
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["revoked"] is False
    keys = _keys(tmp_path)
    assert keys["current"] == answer["keyId"] != first
    assert [k["kid"] for k in keys["keys"]] == [first, answer["keyId"]]


def test_rotate_revoke_drops_every_older_key(tmp_path: Path) -> None:
    _seed(tmp_path)
    result = runner.invoke(
        app, ["tokens", "rotate", "--revoke", "--data-dir", str(tmp_path), "-o", "json"]
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert answer["revoked"] is True
    assert [k["kid"] for k in _keys(tmp_path)["keys"]] == [answer["keyId"]]


def test_rotate_says_in_text_what_happened_to_the_old_keys(tmp_path: Path) -> None:
    kept = runner.invoke(app, ["tokens", "rotate", "--data-dir", str(tmp_path)])
    current = _keys(tmp_path)["current"]
    assert kept.stdout == (
        f"token key {current} is current; older keys kept until their tokens expire\n"
    )
    revoked = runner.invoke(app, ["tokens", "rotate", "--revoke", "--data-dir", str(tmp_path)])
    current = _keys(tmp_path)["current"]
    assert revoked.stdout == f"token key {current} is current; older keys revoked\n"


def test_without_data_dir_the_global_one_is_used(ctx: CliContext) -> None:
    assert runner.invoke(app, ["tokens", "rotate"]).exit_code == 0
    assert DataDir(ctx.data_dir).token_keys.is_file()


def test_a_damaged_key_file_is_one_error_line_and_exit_1(tmp_path: Path) -> None:
    path = DataDir(tmp_path).token_keys
    path.parent.mkdir(parents=True)
    path.write_text('{"current": "k1", "keys": [{"kid": "k1"}]')  # cut short
    result = runner.invoke(app, ["tokens", "rotate", "--data-dir", str(tmp_path)])
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: cannot rotate the token key in {path}: ")
    assert len(result.stderr.splitlines()) == 1
    assert "Traceback" not in result.output
