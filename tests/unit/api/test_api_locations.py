"""Input locations and output locations the lambda-microvms model does not use (yet): headers,
prefix headers, query maps, greedy labels, payloads, status codes, timestamp formats. A small
model of the same protocol drives the same code paths."""

from __future__ import annotations

import datetime as dt
import json
from urllib.parse import urlsplit

import pytest
from botocore.awsrequest import HeadersDict, prepare_request_dict
from botocore.model import ServiceModel
from botocore.parsers import create_parser
from botocore.serialize import create_serializer

from embervm.api._parse import parse_request
from embervm.api._routing import Router, compile_route, parse_query
from embervm.api._serialize import serialize_output
from embervm.errors import ValidationError

MODEL = ServiceModel(
    {
        "metadata": {"protocol": "rest-json", "apiVersion": "2020-01-01", "signingName": "t"},
        "operations": {
            "PutThing": {
                "name": "PutThing",
                "http": {"method": "PUT", "requestUri": "/things/{Key+}?x-id=PutThing"},
                "input": {"shape": "PutThingInput"},
                "output": {"shape": "PutThingOutput"},
            }
        },
        "shapes": {
            "PutThingInput": {
                "type": "structure",
                "required": ["Key"],
                "payload": "Document",
                "members": {
                    "Key": {"shape": "S", "location": "uri", "locationName": "Key"},
                    "Count": {"shape": "I", "location": "header", "locationName": "x-count"},
                    "Flag": {"shape": "B", "location": "header", "locationName": "x-flag"},
                    "When": {"shape": "T", "location": "header", "locationName": "x-when"},
                    "Names": {"shape": "L", "location": "header", "locationName": "x-names"},
                    "Meta": {"shape": "M", "location": "headers", "locationName": "x-meta-"},
                    "Extra": {"shape": "M", "location": "querystring"},
                    "Since": {"shape": "T", "location": "querystring", "locationName": "since"},
                    "Document": {"shape": "Doc"},
                },
            },
            "PutThingOutput": {
                "type": "structure",
                "members": {
                    "Status": {"shape": "I", "location": "statusCode"},
                    "ETag": {"shape": "S", "location": "header", "locationName": "ETag"},
                    "Modified": {"shape": "T", "location": "header", "locationName": "x-mod"},
                    "Created": {"shape": "T"},
                    "CreatedIso": {"shape": "TIso"},
                    "Blob": {"shape": "Bl"},
                },
            },
            "Doc": {"type": "structure", "members": {"Name": {"shape": "S"}}},
            "S": {"type": "string"},
            "I": {"type": "integer"},
            "B": {"type": "boolean"},
            "T": {"type": "timestamp"},
            "TIso": {"type": "timestamp", "timestampFormat": "iso8601"},
            "Bl": {"type": "blob"},
            "L": {"type": "list", "member": {"shape": "S"}},
            "M": {"type": "map", "key": {"shape": "S"}, "value": {"shape": "S"}},
        },
    },
    service_name="t",
)
OPERATION = MODEL.operation_model("PutThing")
ROUTER = Router([compile_route("PutThing", "PUT", OPERATION.http["requestUri"], OPERATION)])
WHEN = dt.datetime(2025, 9, 9, 12, 0, tzinfo=dt.UTC)


def _send(params: dict[str, object]) -> dict[str, object]:
    request = create_serializer("rest-json", include_validation=False).serialize_to_request(
        params, OPERATION
    )
    prepare_request_dict(request, endpoint_url="http://h")
    parts = urlsplit(request["url"])
    pairs = parse_query(parts.query.encode())
    match = ROUTER.match("PUT", parts.path, pairs)
    assert match is not None
    headers = {k.lower(): str(v) for k, v in request["headers"].items()}
    return parse_request(match, pairs, headers, request["body"] or b"")


def test_headers_prefix_headers_query_maps_greedy_labels_and_payloads_parse() -> None:
    params = {
        "Key": "a/b/c",
        "Count": 3,
        "Flag": True,
        "When": WHEN,
        "Names": ["x", "y"],
        "Meta": {"color": "red"},
        "Since": WHEN,
        "Extra": {"k": "v"},
        "Document": {"Name": "n"},
    }
    assert _send(params) == params


def test_query_literal_of_the_route_is_not_part_of_a_query_map() -> None:
    parsed = _send({"Key": "k", "Extra": {"k": "v"}})
    assert parsed["Extra"] == {"k": "v"}


def test_bad_header_integer_is_a_validation_error() -> None:
    match = ROUTER.match("PUT", "/things/k", [("x-id", "PutThing")])
    assert match is not None
    with pytest.raises(ValidationError, match="at 'Count'"):
        parse_request(match, [], {"x-count": "many"}, b"")


def test_status_code_header_members_and_timestamp_formats_serialize_for_botocore() -> None:
    output = {
        "Status": 202,
        "ETag": "abc",
        "Modified": WHEN,
        "Created": WHEN,
        "CreatedIso": WHEN,
        "Blob": b"\x00\x01",
    }
    result = serialize_output(OPERATION, output)
    assert result.status == 202
    assert result.headers["etag"] == "abc"
    assert result.headers["x-mod"] == "Tue, 09 Sep 2025 12:00:00 GMT"
    body = json.loads(result.body)
    assert body["Created"] == 1757419200
    assert body["CreatedIso"] == "2025-09-09T12:00:00.000Z"
    parsed = create_parser("rest-json").parse(
        {"status_code": result.status, "headers": HeadersDict(result.headers), "body": result.body},
        OPERATION.output_shape,
    )
    parsed.pop("ResponseMetadata")
    assert parsed == output
