"""Fixtures of the local fleet's services: a real PostgreSQL and a real SeaweedFS, each in a
folder of its own, stopped (and their folders removed) after the test whatever happened.

The folders live under a temp dir opened for passing (0711): as root, PostgreSQL runs as the
``postgres`` user, which pytest's own tmp_path (under a 0700 folder) would lock out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from embervm.errors import ConfigError
from embervm.localfleet import LocalPostgres, LocalSeaweedFS, ProcessIdentity, free_port


@pytest.fixture
def fleet_root() -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix="embervm-localfleet-"))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


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
        _last_resort_stop(pg.stop, pg.process)


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
        _last_resort_stop(sw.stop, sw.process)


def _last_resort_stop(
    stop: Callable[[], None], process: Callable[[], ProcessIdentity | None]
) -> None:
    """``stop()``; if that fails, SIGKILL whatever still runs, so no test leaves a process."""
    try:
        stop()
    finally:
        identity = process()
        if identity is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(identity.pid, signal.SIGKILL)
