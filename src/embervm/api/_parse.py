"""rest-json request → input params keyed by model member names, with model types.

Where each member comes from is the model's ``location``: ``uri`` (a route label),
``querystring`` (lists repeat the key; a map takes the remaining keys), ``header``/``headers``
(a prefix map), or the JSON body (members by ``locationName``, or the ``payload`` member).
Wrong JSON types, unparsable numbers, booleans or timestamps are ValidationErrors naming the
member; constraint checks (length, range, enum, pattern, required, union) come after, in
``embervm.model``. Unknown body members are ignored (AWS services ignore them too).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import email.utils
import json
from collections.abc import Mapping
from typing import Any

from botocore.model import ListShape, MapShape, Shape, StructureShape

from embervm.errors import ValidationError
from embervm.model import Violation, validation_message

from ._routing import RouteMatch


class _Invalid(Exception):
    """A value of the wrong type; carries the violation for the message."""

    def __init__(self, violation: Violation) -> None:
        super().__init__(violation.describe())
        self.violation = violation


def _bad(path: str, value: object, kind: str, shape: Shape) -> _Invalid:
    sensitive = bool(shape.metadata.get("sensitive"))
    return _Invalid(Violation(path, value, f"Member must be of type {kind}", sensitive))


def parse_request(
    match: RouteMatch,
    query: list[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
) -> dict[str, Any]:
    """All input members of the matched operation, typed; raises ValidationError."""
    shape = match.route.operation_model.input_shape
    if shape is None:
        return {}
    try:
        return _parse(shape, match, query, headers, body)
    except _Invalid as exc:
        raise ValidationError(validation_message([exc.violation])) from None


def _parse(
    shape: StructureShape,
    match: RouteMatch,
    query: list[tuple[str, str]],
    headers: Mapping[str, str],
    body: bytes,
) -> dict[str, Any]:
    params: dict[str, Any] = {}
    payload_member = shape.serialization.get("payload")
    body_members: dict[str, Shape] = {}
    consumed_query = {key for key, _ in match.route.query_literals}
    for name, member in shape.members.items():
        location = member.serialization.get("location")
        wire = member.serialization.get("name", name)
        if location == "uri":
            if wire in match.labels:
                params[name] = _from_text(member, match.labels[wire], name)
        elif location == "querystring":
            consumed_query.add(wire)
            value = _from_query(member, wire, query, name)
            if value is not None:
                params[name] = value
        elif location == "header":
            value = _from_header(member, wire, headers, name)
            if value is not None:
                params[name] = value
        elif location == "headers":
            prefix = wire.lower()
            found = {
                k[len(prefix) :]: v for k, v in headers.items() if k.lower().startswith(prefix)
            }
            if found:
                params[name] = found
        elif location is None and name != payload_member:
            body_members[name] = member
    # Map-typed querystring members take every key no other member (or the route) claimed.
    for name, member in shape.members.items():
        if member.serialization.get("location") == "querystring" and member.type_name == "map":
            rest = {k: v for k, v in query if k not in consumed_query}
            if rest:
                params[name] = rest
    if payload_member is not None:
        member = shape.members[payload_member]
        if member.type_name in ("blob", "string"):
            if body:
                params[payload_member] = body if member.type_name == "blob" else _utf8(body)
        elif body.strip():
            params[payload_member] = _from_json(member, _load_json(body), payload_member)
    elif body_members:
        document = _load_json(body) if body.strip() else {}
        if not isinstance(document, dict):
            raise ValidationError(
                "1 validation error detected: the request body must be a JSON object"
            )
        for name, member in body_members.items():
            wire = member.serialization.get("name", name)
            raw = document.get(wire)
            if raw is not None:
                params[name] = _from_json(member, raw, name)
    return params


def _utf8(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("1 validation error detected: the body is not UTF-8") from exc


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def _load_json(body: bytes) -> Any:
    try:
        return json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise ValidationError(
            "1 validation error detected: the request body is not valid JSON"
        ) from exc


def _from_json(shape: Shape, raw: Any, path: str) -> Any:
    """A JSON value converted to the model type of ``shape`` (raises _Invalid)."""
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        if not isinstance(raw, dict):
            raise _bad(path, raw, "structure", shape)
        out: dict[str, Any] = {}
        for name, member in shape.members.items():
            value = raw.get(member.serialization.get("name", name))
            if value is not None:
                out[name] = _from_json(member, value, f"{path}.{name}")
        return out
    if kind == "list":
        assert isinstance(shape, ListShape)
        if not isinstance(raw, list):
            raise _bad(path, raw, "list", shape)
        return [
            None if item is None else _from_json(shape.member, item, f"{path}.{i}.member")
            for i, item in enumerate(raw, start=1)
        ]
    if kind == "map":
        assert isinstance(shape, MapShape)
        if not isinstance(raw, dict):
            raise _bad(path, raw, "map", shape)
        return {
            key: None if value is None else _from_json(shape.value, value, f"{path}.{key}")
            for key, value in raw.items()
        }
    if kind == "string":
        if not isinstance(raw, str):
            raise _bad(path, raw, "string", shape)
        return raw
    if kind in ("integer", "long"):
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise _bad(path, raw, kind, shape)
        return raw
    if kind in ("float", "double"):
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise _bad(path, raw, kind, shape)
        return float(raw)
    if kind == "boolean":
        if not isinstance(raw, bool):
            raise _bad(path, raw, "boolean", shape)
        return raw
    if kind == "timestamp":
        return _timestamp(shape, raw, path)
    if kind == "blob":
        if not isinstance(raw, str):
            raise _bad(path, raw, "blob", shape)
        try:
            return base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(path, raw, "base64 blob", shape) from None
    raise _bad(path, raw, kind, shape)


def _from_text(shape: Shape, text: str, path: str) -> Any:
    """A URI label, query value or header converted to the model type of ``shape``."""
    kind = shape.type_name
    if kind == "string":
        return text
    if kind in ("integer", "long"):
        stripped = text.strip()
        if not stripped.lstrip("-").isdigit() or len(stripped) > 20:
            raise _bad(path, text, kind, shape)
        return int(stripped)
    if kind in ("float", "double"):
        try:
            return float(text)
        except ValueError:
            raise _bad(path, text, kind, shape) from None
    if kind == "boolean":
        if text not in ("true", "false"):
            raise _bad(path, text, "boolean", shape)
        return text == "true"
    if kind == "timestamp":
        return _timestamp(shape, text, path)
    if kind == "blob":
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _bad(path, text, "base64 blob", shape) from None
    raise _bad(path, text, kind, shape)


def _from_query(shape: Shape, wire: str, query: list[tuple[str, str]], path: str) -> Any:
    values = [v for k, v in query if k == wire]
    if shape.type_name == "map":
        return None  # filled from the unclaimed keys by the caller
    if not values:
        return None
    if shape.type_name == "list":
        assert isinstance(shape, ListShape)
        return [
            _from_text(shape.member, v, f"{path}.{i}.member") for i, v in enumerate(values, start=1)
        ]
    return _from_text(shape, values[-1], path)


def _from_header(shape: Shape, wire: str, headers: Mapping[str, str], path: str) -> Any:
    raw = headers.get(wire.lower())
    if raw is None:
        return None
    if shape.type_name == "list":
        assert isinstance(shape, ListShape)
        items = [item.strip() for item in raw.split(",") if item.strip()]
        return [
            _from_text(shape.member, v, f"{path}.{i}.member") for i, v in enumerate(items, start=1)
        ]
    if shape.serialization.get("jsonvalue"):
        try:
            return json.loads(base64.b64decode(raw, validate=True))
        except (binascii.Error, ValueError):
            raise _bad(path, raw, "base64 JSON", shape) from None
    return _from_text(shape, raw, path)


def _timestamp(shape: Shape, raw: Any, path: str) -> dt.datetime:
    """Epoch seconds, ISO 8601 or RFC 822, whichever the value is; the model's format is only a
    hint (botocore accepts all three on the way back too)."""
    if isinstance(raw, bool):
        raise _bad(path, raw, "timestamp", shape)
    if isinstance(raw, int | float):
        try:
            return dt.datetime.fromtimestamp(raw, tz=dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise _bad(path, raw, "timestamp", shape) from None
    if not isinstance(raw, str):
        raise _bad(path, raw, "timestamp", shape)
    text = raw.strip()
    try:
        return dt.datetime.fromtimestamp(float(text), tz=dt.UTC)
    except (ValueError, OverflowError, OSError):
        pass
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)
    except ValueError:
        pass
    try:
        return email.utils.parsedate_to_datetime(text).astimezone(dt.UTC)
    except (TypeError, ValueError, IndexError):
        raise _bad(path, raw, "timestamp", shape) from None
