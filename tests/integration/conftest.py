"""Session fixtures shared by every integration test.

``guest_artifacts`` builds (once per input hash, then reuses) the guest kernel, initramfs and
base disk in ``$EMBERVM_TEST_CACHE`` (default ``~/.cache/embervm-test``), so test runs and CI
share one build. The first run takes about a minute (mmdebstrap), later runs a fraction of a
second.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from embervm.guest.artifacts import GuestArtifacts, ensure_guest_artifacts


def test_cache_dir() -> Path:
    """Where integration tests keep artifacts between runs."""
    env = os.environ.get("EMBERVM_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "embervm-test"


test_cache_dir.__test__ = False  # type: ignore[attr-defined]  # not a test, despite the name


@pytest.fixture(scope="session")
def guest_artifacts() -> GuestArtifacts:
    """Kernel, initramfs and debian12 base disk, built once and cached across runs."""

    def progress(msg: str) -> None:
        sys.stderr.write(f"[guest artifacts] {msg}\n")

    return asyncio.run(ensure_guest_artifacts(test_cache_dir() / "artifacts", progress=progress))
