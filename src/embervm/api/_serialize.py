"""Output members → rest-json response (status, headers, JSON body), per the output shape.

Body members go out under their ``locationName``; ``header`` members become headers,
``statusCode`` members override the operation's ``responseCode``. Timestamps use the member's
or shape's ``timestampFormat``, else the rest-json defaults botocore parses: epoch seconds in
the body, RFC 822 in headers. ``None`` means "absent". Members the output shape does not know
are dropped (core may carry internal fields; clients never see them).
"""

from __future__ import annotations

import base64
import datetime as dt
import email.utils
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from botocore.model import ListShape, MapShape, OperationModel, Shape, StructureShape

JSON_CONTENT_TYPE = "application/json"


@dataclass
class Serialized:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""


def serialize_output(operation: OperationModel, output: Mapping[str, Any]) -> Serialized:
    """The response for ``output`` (output members by model name) of ``operation``."""
    status = int(operation.http.get("responseCode", 200))
    shape = operation.output_shape
    if shape is None:
        return Serialized(
            status,
            {} if status == 204 else {"content-type": JSON_CONTENT_TYPE},
            b"" if status == 204 else b"{}",
        )
    return serialize_structure(shape, output, status)


def serialize_structure(
    shape: StructureShape, values: Mapping[str, Any], status: int
) -> Serialized:
    """Serialize a top-level structure (an output or an error shape) with its locations."""
    result = Serialized(status)
    body: dict[str, Any] = {}
    payload = shape.serialization.get("payload")
    for name, member in shape.members.items():
        value = values.get(name)
        if value is None:
            continue
        location = member.serialization.get("location")
        wire = member.serialization.get("name", name)
        if location == "header":
            result.headers[wire.lower()] = _header_value(member, value)
        elif location == "headers":
            for key, item in value.items():
                result.headers[f"{wire}{key}".lower()] = str(item)
        elif location == "statusCode":
            result.status = int(value)
        elif name == payload:
            if member.type_name == "blob":
                result.body = bytes(value)
            elif member.type_name == "string":
                result.body = str(value).encode()
            else:
                result.body = _dump(to_json(member, value))
                result.headers["content-type"] = JSON_CONTENT_TYPE
        elif location is None:
            body[wire] = to_json(member, value)
    if payload is None and result.status != 204:
        result.body = _dump(body)
        result.headers["content-type"] = JSON_CONTENT_TYPE
    return result


def _dump(document: Any) -> bytes:
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def to_json(shape: Shape, value: Any) -> Any:
    """A Python value of ``shape`` as a JSON-ready value."""
    kind = shape.type_name
    if kind == "structure":
        assert isinstance(shape, StructureShape)
        return {
            member.serialization.get("name", name): to_json(member, value[name])
            for name, member in shape.members.items()
            if value.get(name) is not None
        }
    if kind == "list":
        assert isinstance(shape, ListShape)
        return [to_json(shape.member, item) for item in value]
    if kind == "map":
        assert isinstance(shape, MapShape)
        return {str(key): to_json(shape.value, item) for key, item in value.items()}
    if kind == "timestamp":
        return format_timestamp(value, _timestamp_format(shape, "unixTimestamp"))
    if kind == "blob":
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def _timestamp_format(shape: Shape, default: str) -> str:
    return str(shape.serialization.get("timestampFormat") or default)


def _epoch(value: dt.datetime | int | float) -> float:
    if isinstance(value, dt.datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=dt.UTC)
        return moment.timestamp()
    return float(value)


def format_timestamp(value: dt.datetime | int | float, fmt: str) -> Any:
    """``unixTimestamp`` (a number), ``iso8601`` or ``rfc822`` text."""
    seconds = _epoch(value)
    if fmt == "iso8601":
        moment = dt.datetime.fromtimestamp(seconds, tz=dt.UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if fmt == "rfc822":
        return email.utils.formatdate(seconds, usegmt=True)
    return int(seconds) if seconds == int(seconds) else round(seconds, 3)


def _header_value(shape: Shape, value: Any) -> str:
    kind = shape.type_name
    if kind == "timestamp":
        return str(format_timestamp(value, _timestamp_format(shape, "rfc822")))
    if kind == "boolean":
        return "true" if value else "false"
    if kind == "list":
        return ",".join(str(item) for item in value)
    if shape.serialization.get("jsonvalue"):
        return base64.b64encode(_dump(value)).decode("ascii")
    if kind == "blob":
        return base64.b64encode(bytes(value)).decode("ascii")
    return str(value)
