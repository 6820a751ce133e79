"""Shape rules of the model (required, length, range, enum, pattern, union) checked on values.

botocore checks only presence, types and minimums on the client (REFERENCE "The service
model"), so the server checks the rest. Values are the Python values the API layer parsed
(``str``, ``int``, ``bool``, ``float``, ``datetime``, ``bytes``, ``list``, ``dict``); the same
checks serve the tests that hold every response against its output shape.

Messages follow the wording AWS services use, so scripts written against AWS read them alike:
``1 validation error detected: Value 'x y' at 'name' failed to satisfy constraint: Member must
satisfy regular expression pattern: [a-zA-Z0-9-_]+``. Paths name members the way AWS does
(``idlePolicy.maxIdleDurationSeconds``, ``allowedPorts.1.member.port``).

Patterns are matched against untrusted values with RE2 (``google-re2``), which runs in time
linear in the value: no value can make a pattern backtrack, so there is no timeout (the
``regex`` package with a 0.1 s timeout refused valid values under load). ``_re2_pattern``
spells the model's ``\\s``/``\\d`` the way the ``regex`` package read them (Unicode), and a
pattern RE2 cannot match with the same meaning raises ``PatternError`` when first used.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import re2
from botocore.model import ListShape, MapShape, Shape, StructureShape

from embervm.model._loader import operation_model

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
_MAX_SHOWN = 200  # characters of a value echoed in a message
MAX_REPORTED = 10  # AWS reports several violations at once; a bounded number of them


@dataclass(frozen=True)
class Violation:
    """One broken rule: where (``path``), what was there (``value``), and which rule."""

    path: str
    value: object
    constraint: str
    sensitive: bool = False
    missing: bool = False

    def describe(self) -> str:
        if self.missing:
            head = "Value null"
        elif self.sensitive:
            head = "Value"
        else:
            head = f"Value '{_show(self.value)}'"
        return f"{head} at '{self.path}' failed to satisfy constraint: {self.constraint}"


def _show(value: object) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, dt.datetime):
        text = value.isoformat()
    else:
        try:
            text = json.dumps(value, default=str, ensure_ascii=False, separators=(",", ":"))
        except (TypeError, ValueError):
            text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def validation_message(violations: list[Violation]) -> str:
    """The ValidationException message for ``violations`` (at least one), AWS style."""
    shown = violations[:MAX_REPORTED]
    count = len(violations)
    noun = "error" if count == 1 else "errors"
    return f"{count} validation {noun} detected: " + "; ".join(v.describe() for v in shown)


class PatternError(ValueError):
    """A model pattern RE2 cannot match with the meaning the ``regex`` package gave it."""


# RE2's \s and \d are ASCII; the ``regex`` package (which matched patterns before RE2) read them
# as Unicode: \s is White_Space (\t-\r, U+0085 and \p{Z}), \d is \p{Nd}. Spelled out for RE2,
# the model's patterns keep the meaning they had (tests/unit/api/test_api_model_patterns.py).
_CLASS_ESCAPES = {"s": r"\t-\r\x{85}\p{Z}", "d": r"\p{Nd}"}
# Escapes whose meaning differs between the two engines and that are not spelled out above.
_DIFFERING_ESCAPES = frozenset("wWbBZ")


def _re2_pattern(pattern: str) -> str:
    """``pattern`` (``regex`` package syntax) spelled for RE2 with the same meaning."""
    out: list[str] = []
    in_class = False
    index = 0
    while index < len(pattern):
        char = pattern[index]
        if char == "\\" and index + 1 < len(pattern):
            escape = pattern[index + 1]
            index += 2
            if escape in _CLASS_ESCAPES:
                spelled = _CLASS_ESCAPES[escape]
                out.append(spelled if in_class else f"[{spelled}]")
            elif escape in "SD" and not in_class:
                out.append(f"[^{_CLASS_ESCAPES[escape.lower()]}]")
            elif escape in "SD" or escape in _DIFFERING_ESCAPES:
                raise PatternError(f"\\{escape} means something else in RE2: {pattern}")
            else:
                out.append("\\" + escape)
            continue
        index += 1
        out.append(char)
        if in_class:
            if char == "]":
                in_class = False
            elif char == "[" and pattern.startswith(":", index):
                raise PatternError(f"POSIX classes mean something else in RE2: {pattern}")
        elif char == "[":
            in_class = True
            # A ']' first in a class (after an optional '^') is a literal in both engines.
            for literal in "^]":
                if pattern.startswith(literal, index):
                    out.append(literal)
                    index += 1
        elif char == "(" and pattern.startswith("?", index):
            if not pattern.startswith((":", "P<"), index + 1):
                raise PatternError(f"inline flags and lookarounds are not supported: {pattern}")
        elif char == "{" and pattern.startswith(",", index):
            raise PatternError(f"'{{,n}}' is a literal in RE2: {pattern}")
    return "".join(out)


@functools.lru_cache(maxsize=64)
def _compiled(pattern: str) -> Any:
    try:
        return re2.compile(_re2_pattern(pattern))
    except re2.error as error:
        raise PatternError(f"RE2 cannot compile the model pattern {pattern!r}: {error}") from error


def pattern_matches(pattern: str, value: str) -> bool:
    """Whole-string match of ``value`` against a model ``pattern``, in linear time (RE2).

    The value goes to RE2 as UTF-8 with lone surrogates (``"\\ud800"`` is valid JSON) passed
    through: RE2 reads each as one character, as the ``regex`` package did.
    """
    encoded = value.encode("utf-8", "surrogatepass")
    return _compiled(pattern).fullmatch(encoded) is not None


def check_value(shape: Shape, value: Any, path: str, out: list[Violation]) -> None:
    """Append every violation of ``value`` against ``shape`` (at ``path``) to ``out``."""
    sensitive = bool(shape.serialization.get("sensitive") or shape.metadata.get("sensitive"))
    kind = shape.type_name
    checker = _CHECKERS.get(kind)
    if checker is None:
        return
    checker(shape, value, path, out, sensitive)


def _type_violation(path: str, value: object, kind: str, sensitive: bool) -> Violation:
    return Violation(path, value, f"Member must be of type {kind}", sensitive)


def _check_string(
    shape: Shape, value: Any, path: str, out: list[Violation], sensitive: bool
) -> None:
    if not isinstance(value, str):
        out.append(_type_violation(path, value, "string", sensitive))
        return
    enum = shape.metadata.get("enum")
    if enum and value not in enum:
        out.append(
            Violation(
                path, value, f"Member must satisfy enum value set: [{', '.join(enum)}]", sensitive
            )
        )
        return
    if not _check_length(shape, value, len(value), path, out, sensitive):
        return
    pattern = shape.metadata.get("pattern")
    if pattern is not None and not pattern_matches(pattern, value):
        out.append(
            Violation(
                path,
                value,
                f"Member must satisfy regular expression pattern: {pattern}",
                sensitive,
            )
        )


def _check_length(
    shape: Shape, value: object, length: int, path: str, out: list[Violation], sensitive: bool
) -> bool:
    low = shape.metadata.get("min")
    high = shape.metadata.get("max")
    if low is not None and length < low:
        out.append(
            Violation(
                path, value, f"Member must have length greater than or equal to {low}", sensitive
            )
        )
        return False
    if high is not None and length > high:
        out.append(
            Violation(
                path, value, f"Member must have length less than or equal to {high}", sensitive
            )
        )
        return False
    return True


def _check_integer(
    shape: Shape, value: Any, path: str, out: list[Violation], sensitive: bool
) -> None:
    kind = shape.type_name
    if isinstance(value, bool) or not isinstance(value, int):
        out.append(_type_violation(path, value, kind, sensitive))
        return
    low, high = INT32 if kind == "integer" else INT64
    low = max(low, shape.metadata.get("min", low))
    high = min(high, shape.metadata.get("max", high))
    if value < low:
        out.append(
            Violation(
                path, value, f"Member must have value greater than or equal to {low}", sensitive
            )
        )
    elif value > high:
        out.append(
            Violation(
                path, value, f"Member must have value less than or equal to {high}", sensitive
            )
        )


def _check_float(
    shape: Shape, value: Any, path: str, out: list[Violation], sensitive: bool
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        out.append(_type_violation(path, value, shape.type_name, sensitive))
        return
    low = shape.metadata.get("min")
    high = shape.metadata.get("max")
    if low is not None and value < low:
        out.append(
            Violation(
                path, value, f"Member must have value greater than or equal to {low}", sensitive
            )
        )
    elif high is not None and value > high:
        out.append(
            Violation(
                path, value, f"Member must have value less than or equal to {high}", sensitive
            )
        )


def _check_boolean(
    shape: Shape, value: Any, path: str, out: list[Violation], sensitive: bool
) -> None:
    if not isinstance(value, bool):
        out.append(_type_violation(path, value, "boolean", sensitive))


def _check_timestamp(
    shape: Shape, value: Any, path: str, out: list[Violation], sensitive: bool
) -> None:
    # Epoch numbers are accepted too: core may hand the API seconds instead of datetimes.
    if isinstance(value, bool) or not isinstance(value, dt.datetime | int | float):
        out.append(_type_violation(path, value, "timestamp", sensitive))
    elif isinstance(value, dt.datetime) and value.tzinfo is None:
        out.append(Violation(path, value, "Member must be a timezone-aware timestamp", sensitive))


def _check_blob(shape: Shape, value: Any, path: str, out: list[Violation], sensitive: bool) -> None:
    if not isinstance(value, bytes | bytearray):
        out.append(_type_violation(path, value, "blob", sensitive))
        return
    _check_length(shape, value, len(value), path, out, sensitive)


def _check_list(shape: Shape, value: Any, path: str, out: list[Violation], sensitive: bool) -> None:
    assert isinstance(shape, ListShape)
    if not isinstance(value, list):
        out.append(_type_violation(path, value, "list", sensitive))
        return
    if not _check_length(shape, value, len(value), path, out, sensitive):
        return
    for index, item in enumerate(value, start=1):
        item_path = f"{path}.{index}.member"
        if item is None:
            out.append(Violation(item_path, None, "Member must not be null", missing=True))
            continue
        check_value(shape.member, item, item_path, out)


def _check_map(shape: Shape, value: Any, path: str, out: list[Violation], sensitive: bool) -> None:
    assert isinstance(shape, MapShape)
    if not isinstance(value, dict):
        out.append(_type_violation(path, value, "map", sensitive))
        return
    if not _check_length(shape, value, len(value), path, out, sensitive):
        return
    for key, item in value.items():
        check_value(shape.key, key, f"{path}.key", out)
        if item is None:
            out.append(Violation(f"{path}.{key}", None, "Member must not be null", missing=True))
            continue
        check_value(shape.value, item, f"{path}.{key}", out)


def _check_structure(
    shape: Shape, value: Any, path: str, out: list[Violation], sensitive: bool
) -> None:
    assert isinstance(shape, StructureShape)
    if not isinstance(value, Mapping):
        out.append(_type_violation(path, value, "structure", sensitive))
        return
    check_members(shape, value, path, out)


def check_members(
    shape: StructureShape, value: Mapping[str, Any], path: str, out: list[Violation]
) -> None:
    """The members of a structure (or of an operation's input/output) against ``shape``."""
    prefix = f"{path}." if path else ""
    for name in shape.required_members:
        if value.get(name) is None:
            out.append(Violation(prefix + name, None, "Member must not be null", missing=True))
    if shape.is_tagged_union:
        present = [name for name in shape.members if value.get(name) is not None]
        if len(present) != 1:
            out.append(
                Violation(
                    path or shape.name,
                    {k: v for k, v in value.items() if v is not None},
                    "Member must have exactly one of "
                    f"[{', '.join(shape.members)}] set, not {len(present)}",
                )
            )
    for name, member in shape.members.items():
        item = value.get(name)
        if item is not None:
            check_value(member, item, prefix + name, out)
    for name in value:
        if name not in shape.members and value[name] is not None:
            out.append(Violation(prefix + name, value[name], "Member is not part of the model"))


_CHECKERS = {
    "string": _check_string,
    "integer": _check_integer,
    "long": _check_integer,
    "float": _check_float,
    "double": _check_float,
    "boolean": _check_boolean,
    "timestamp": _check_timestamp,
    "blob": _check_blob,
    "list": _check_list,
    "map": _check_map,
    "structure": _check_structure,
}


def validate_input(operation: str, params: Mapping[str, Any]) -> list[Violation]:
    """Violations of ``params`` (input members by model name) against the operation's input."""
    shape = operation_model(operation).input_shape
    out: list[Violation] = []
    if shape is not None:
        check_members(shape, params, "", out)
    elif params:
        out.append(Violation("", dict(params), "Operation takes no input"))
    return out


def validate_output(operation: str, output: Mapping[str, Any]) -> list[Violation]:
    """Violations of ``output`` (output members by model name) against the output shape.

    botocore's ``ResponseMetadata`` is ignored, so a parsed boto3 response can be checked as is.
    """
    shape = operation_model(operation).output_shape
    data = {k: v for k, v in output.items() if k != "ResponseMetadata"}
    out: list[Violation] = []
    if shape is not None:
        check_members(shape, data, "", out)
    elif data:
        out.append(Violation("", data, "Operation has no output"))
    return out
