"""The SQLite state DB fsyncs every commit (A22): an answered write survives a power loss."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import text

from embervm.store.engine import create_engine

FULL = 2  # PRAGMA synchronous: 0 OFF, 1 NORMAL, 2 FULL, 3 EXTRA


async def test_sqlite_commits_are_synchronous_full_in_wal(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'embervm.db'}")
    try:
        async with engine.connect() as conn:
            synchronous = (await conn.execute(text("PRAGMA synchronous"))).scalar_one()
            journal = (await conn.execute(text("PRAGMA journal_mode"))).scalar_one()
    finally:
        await engine.dispose()
    assert journal == "wal"
    assert synchronous == FULL
