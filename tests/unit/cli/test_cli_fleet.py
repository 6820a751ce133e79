"""``embervm fleet hosts|drain`` refuse what is not a fleet's store, in one line, before
touching anything (the rest runs against a real PostgreSQL in tests/integration/fleet)."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from embervm.cli import fleet

runner = CliRunner()
app = typer.Typer()  # as `embervm` adds it: `fleet` is a group
app.add_typer(fleet.app, name="fleet")


@pytest.mark.parametrize("args", [["hosts"], ["drain", "h1"]])
@pytest.mark.parametrize("url", [None, "sqlite+aiosqlite:///tmp/x.db"])
def test_a_fleet_command_needs_postgresql(
    args: list[str], url: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("EMBERVM_DATABASE_URL", raising=False)
    extra = ["--database-url", url] if url else []
    result = runner.invoke(app, ["fleet", *args, *extra])
    assert result.exit_code == 2
    assert result.stderr == (
        "error: a fleet lives in PostgreSQL: give --database-url postgresql+asyncpg://…\n"
    )
