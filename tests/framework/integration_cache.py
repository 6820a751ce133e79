"""Where integration tests keep what they build between runs (guest artifacts, layers):
``$EMBERVM_TEST_CACHE``, default ``~/.cache/embervm-test``."""

from __future__ import annotations

import os
from pathlib import Path


def test_cache_dir() -> Path:
    """Where integration tests keep artifacts between runs."""
    env = os.environ.get("EMBERVM_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "embervm-test"


test_cache_dir.__test__ = False  # type: ignore[attr-defined]  # not a test, despite the name
