"""Session fixtures shared by every integration test.

``guest_artifacts`` builds (once per input hash, then reuses) the guest kernel, initramfs and
base disk in ``$EMBERVM_TEST_CACHE`` (default ``~/.cache/embervm-test``), so test runs and CI
share one build. The first run takes about a minute (mmdebstrap), later runs a fraction of a
second.
"""

from __future__ import annotations

import asyncio
import sys

import pytest
from tests.framework.integration_cache import test_cache_dir

from embervm.guest.artifacts import GuestArtifacts, ensure_guest_artifacts


@pytest.fixture(scope="session")
def guest_artifacts() -> GuestArtifacts:
    """Kernel, initramfs and debian12 base disk, built once and cached across runs."""

    def progress(msg: str) -> None:
        sys.stderr.write(f"[guest artifacts] {msg}\n")

    return asyncio.run(ensure_guest_artifacts(test_cache_dir() / "artifacts", progress=progress))
