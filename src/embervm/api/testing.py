"""Test helpers for the API (public, like ``trio.testing``): a fake ``Operations``.

``FakeOperations`` answers every operation with a model-valid canned output (all members
filled, from ``embervm.model.example_output``), records each call, and raises a programmed
``ApiError`` when told to — enough to drive every operation through boto3 without core.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from embervm.errors import ApiError
from embervm.model import example_output


@dataclass
class Call:
    operation: str
    params: dict[str, Any]
    caller: Any


@dataclass
class FakeOperations:
    """Canned outputs per operation; ``errors[name]`` is raised instead when set."""

    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: dict[str, ApiError] = field(default_factory=dict)
    crash: dict[str, BaseException] = field(default_factory=dict)
    calls: list[Call] = field(default_factory=list)

    async def invoke(self, operation: str, params: dict[str, Any], caller: Any) -> dict[str, Any]:
        self.calls.append(Call(operation, copy.deepcopy(params), caller))
        if operation in self.crash:
            raise self.crash[operation]
        if operation in self.errors:
            raise self.errors[operation]
        if operation in self.outputs:
            return copy.deepcopy(self.outputs[operation])
        return example_output(operation, full=True)
