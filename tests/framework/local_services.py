"""The local fleet's services for tests (``embervm.localfleet``): a folder PostgreSQL can enter
and a PostgreSQL of the test's own, always stopped afterwards, even when a test fails.

The folder is opened for passing (0711): as root, PostgreSQL runs as the ``postgres`` user,
which pytest's own tmp_path (under a 0700 folder) would lock out.
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
from embervm.localfleet import LocalPostgres, ProcessIdentity, free_port


@contextlib.contextmanager
def service_root(prefix: str = "embervm-localfleet-") -> Iterator[Path]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def started_postgres(root: Path) -> Iterator[LocalPostgres]:
    """A PostgreSQL of the test's own, started on a free port (skips when it is missing)."""
    pg = LocalPostgres(root / "postgres")
    try:
        pg.init()
    except ConfigError as exc:
        pytest.skip(str(exc))
    try:
        pg.start(free_port())
        yield pg
    finally:
        last_resort_stop(pg.stop, pg.process)


def last_resort_stop(
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
