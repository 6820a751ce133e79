"""Model-valid example values for any shape, derived from the model's own rules.

Fakes and tests need outputs that satisfy the output shapes (and inputs that satisfy the input
shapes) without retyping the model: strings are chosen from a few candidates by the shape's
pattern and length, numbers from its range, enums take their first value, unions their first
member. ``full=True`` fills optional members too, so serializers see every member.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from botocore.model import ListShape, MapShape, Shape, StructureShape

from embervm.model._loader import operation_model
from embervm.model._validate import pattern_matches

EXAMPLE_TIME = dt.datetime(2025, 9, 9, 12, 0, 0, tzinfo=dt.UTC)

# Tried in order; the first that satisfies the shape's length and pattern wins.
_STRING_CANDIDATES = (
    "example",
    "arn:aws:lambda:us-east-1:000000000000:microvm-image:example",
    "arn:aws:iam::000000000000:role/example",
    "x",
    "",
)


def example_value(shape: Shape, *, full: bool = False, _depth: int = 0) -> Any:
    """A value of ``shape`` that passes every rule the model states for it."""
    if _depth > 20:
        raise ValueError(f"shape {shape.name} nests too deep for an example")
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        return _example_structure(shape, full=full, depth=_depth)
    if kind == "list":
        assert isinstance(shape, ListShape)
        count = max(1, shape.metadata.get("min", 0))
        return [example_value(shape.member, full=full, _depth=_depth + 1) for _ in range(count)]
    if kind == "map":
        assert isinstance(shape, MapShape)
        return {
            example_value(shape.key, _depth=_depth + 1): example_value(
                shape.value, full=full, _depth=_depth + 1
            )
        }
    if kind == "string":
        return _example_string(shape)
    if kind in ("integer", "long"):
        low = shape.metadata.get("min", 1)
        high = shape.metadata.get("max", max(low, 1))
        return max(low, min(high, 1 if low <= 1 else low))
    if kind in ("float", "double"):
        return float(shape.metadata.get("min", 1.0))
    if kind == "boolean":
        return True
    if kind == "timestamp":
        return EXAMPLE_TIME
    if kind == "blob":
        return b"example"
    raise ValueError(f"no example for shape type {kind}")


def _example_structure(shape: StructureShape, *, full: bool, depth: int) -> dict[str, Any]:
    if shape.is_tagged_union:
        name, member = next(iter(shape.members.items()))
        return {name: example_value(member, full=full, _depth=depth + 1)}
    wanted = shape.members if full else {n: shape.members[n] for n in shape.required_members}
    return {
        name: example_value(member, full=full, _depth=depth + 1) for name, member in wanted.items()
    }


def _example_string(shape: Shape) -> str:
    enum = shape.metadata.get("enum")
    if enum:
        return str(enum[0])
    low = shape.metadata.get("min", 0)
    high = shape.metadata.get("max")
    pattern = shape.metadata.get("pattern")
    for candidate in _STRING_CANDIDATES:
        if len(candidate) < low or (high is not None and len(candidate) > high):
            continue
        if pattern is None or pattern_matches(pattern, candidate):
            return candidate
    raise ValueError(f"no example string fits shape {shape.name} (pattern {pattern!r})")


def example_input(operation: str, *, full: bool = False) -> dict[str, Any]:
    """Input members of ``operation`` that pass validation (required only, or all)."""
    shape = operation_model(operation).input_shape
    return {} if shape is None else _example_structure(shape, full=full, depth=0)


def example_output(operation: str, *, full: bool = False) -> dict[str, Any]:
    """Output members of ``operation`` that satisfy its output shape (required only, or all)."""
    shape = operation_model(operation).output_shape
    return {} if shape is None else _example_structure(shape, full=full, depth=0)
