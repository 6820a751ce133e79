"""Fixtures of the local fleet's services: a real PostgreSQL and a real SeaweedFS, each in a
folder of its own, stopped (and their folders removed) after the test whatever happened.

The folders live under a temp dir opened for passing (0711): as root, PostgreSQL runs as the
``postgres`` user, which pytest's own tmp_path (under a 0700 folder) would lock out.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.framework.local_services import last_resort_stop, service_root

from embervm.errors import ConfigError
from embervm.localfleet import LocalPostgres, LocalSeaweedFS, free_port


@pytest.fixture
def fleet_root() -> Iterator[Path]:
    with service_root() as root:
        yield root


@pytest.fixture
def postgres(fleet_root: Path) -> Iterator[LocalPostgres]:
    """A cluster set up (initdb) but not started; stopped after the test."""
    pg = LocalPostgres(fleet_root / "postgres")
    try:
        pg.init()
    except ConfigError as exc:
        pytest.skip(str(exc))
    try:
        yield pg
    finally:
        last_resort_stop(pg.stop, pg.process)


@pytest.fixture
def seaweedfs(fleet_root: Path) -> Iterator[LocalSeaweedFS]:
    """SeaweedFS started with S3 on a free port and a bucket ``embervm``; stopped after."""
    sw = LocalSeaweedFS(fleet_root / "seaweedfs")
    try:
        sw.weed  # noqa: B018 - ConfigError when the wheel is missing
    except ConfigError as exc:
        pytest.skip(str(exc))
    try:
        sw.start(free_port())
        sw.create_bucket("embervm")
        yield sw
    finally:
        last_resort_stop(sw.stop, sw.process)
