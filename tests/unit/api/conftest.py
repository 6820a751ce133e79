"""Fixtures for the api tests.

Until core lands ``embervm.core.caller`` (another helper's module, the brief's contract:
``Caller(access_key_id, account_id, region)``), a stand-in with exactly that shape is
registered so the API can be tested on its own; once the real module exists it is used.
"""

from __future__ import annotations

import importlib
import sys
import types
from dataclasses import dataclass


def _ensure_caller_module() -> None:
    try:
        importlib.import_module("embervm.core.caller")
    except ModuleNotFoundError:

        @dataclass(frozen=True)
        class Caller:
            access_key_id: str
            account_id: str
            region: str

        core = sys.modules.get("embervm.core") or types.ModuleType("embervm.core")
        core.__path__ = []  # type: ignore[attr-defined]
        caller = types.ModuleType("embervm.core.caller")
        caller.Caller = Caller  # type: ignore[attr-defined]
        sys.modules["embervm.core"] = core
        sys.modules["embervm.core.caller"] = caller


_ensure_caller_module()
