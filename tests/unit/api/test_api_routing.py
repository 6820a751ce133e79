"""Routing from the model's http traits, and parsing of every input location."""

from __future__ import annotations

import datetime as dt
from urllib.parse import urlsplit

import pytest
from botocore.awsrequest import prepare_request_dict
from botocore.serialize import create_serializer

from embervm.api._parse import parse_request
from embervm.api._routing import Router, compile_route, parse_query
from embervm.errors import ValidationError
from embervm.model import OPERATION_NAMES, example_input, operation_model

ROUTER = Router.from_model()


def _wire(operation: str, params: dict[str, object]) -> tuple[str, str, str, dict[str, str], bytes]:
    """What botocore puts on the wire for ``params``: method, raw path, raw query, headers, body."""
    serializer = create_serializer("rest-json", include_validation=False)
    request = serializer.serialize_to_request(params, operation_model(operation))
    prepare_request_dict(request, endpoint_url="http://h")
    parts = urlsplit(request["url"])
    headers = {k.lower(): v for k, v in request["headers"].items()}
    body = request["body"] if isinstance(request["body"], bytes) else request["body"].encode()
    return request["method"], parts.path, parts.query, headers, body


def _roundtrip(operation: str, params: dict[str, object]) -> dict[str, object]:
    method, path, query, headers, body = _wire(operation, params)
    pairs = parse_query(query.encode())
    match = ROUTER.match(method, path, pairs)
    assert match is not None
    assert match.route.operation == operation
    return parse_request(match, pairs, headers, body)


def test_the_router_has_one_route_per_operation() -> None:
    assert sorted(r.operation for r in ROUTER.routes) == sorted(OPERATION_NAMES)


@pytest.mark.parametrize("operation", OPERATION_NAMES)
def test_every_operation_routes_and_parses_what_botocore_sends(operation: str) -> None:
    params = example_input(operation, full=True)
    assert _roundtrip(operation, params) == params


def test_percent_encoded_slash_stays_inside_its_label() -> None:
    assert _roundtrip("GetMicrovm", {"microvmIdentifier": "a/b c"}) == {
        "microvmIdentifier": "a/b c"
    }


def test_label_ending_route_does_not_swallow_a_longer_path() -> None:
    match = ROUTER.match("POST", "/2025-09-09/microvms/vm-1/resume", [])
    assert match is not None
    assert match.route.operation == "ResumeMicrovm"
    assert match.labels == {"microvmIdentifier": "vm-1"}


def test_method_selects_between_routes_of_one_path() -> None:
    for method, operation in [
        ("GET", "GetMicrovmImage"),
        ("PUT", "UpdateMicrovmImage"),
        ("DELETE", "DeleteMicrovmImage"),
    ]:
        match = ROUTER.match(method, "/2025-09-09/microvm-images/web", [])
        assert match is not None
        assert match.route.operation == operation


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/"),
        ("GET", "/2025-09-09/nothing"),
        ("PATCH", "/2025-09-09/microvms/vm-1"),
        ("GET", "/2025-09-09/microvms/vm-1/extra/segments"),
        ("GET", "/2025-09-09/microvms/"),
    ],
)
def test_unknown_routes_do_not_match(method: str, path: str) -> None:
    assert ROUTER.match(method, path, []) is None


def test_greedy_labels_take_slashes_and_query_literals_must_be_present() -> None:
    router = Router(
        [
            compile_route("Get", "GET", "/objects/{Key+}"),
            compile_route("GetTagging", "GET", "/objects/{Key+}?tagging"),
            compile_route("Versioned", "GET", "/objects/{Key+}?x-id=Versioned"),
        ]
    )
    plain = router.match("GET", "/objects/a/b%20c", [])
    assert plain is not None
    assert (plain.route.operation, plain.labels) == ("Get", {"Key": "a/b c"})
    tagging = router.match("GET", "/objects/a/b", [("tagging", "")])
    assert tagging is not None
    assert tagging.route.operation == "GetTagging"
    versioned = router.match("GET", "/objects/a", [("x-id", "Versioned")])
    assert versioned is not None
    assert versioned.route.operation == "Versioned"
    other = router.match("GET", "/objects/a", [("x-id", "Other")])
    assert other is not None
    assert other.route.operation == "Get"


def test_invalid_utf8_in_a_label_is_a_validation_error() -> None:
    with pytest.raises(ValidationError):
        ROUTER.match("GET", "/2025-09-09/microvms/%ff%fe", [])


def test_querystring_integers_enums_and_repeated_lists_are_typed() -> None:
    params = {
        "imageIdentifier": "img",
        "imageVersion": "3",
        "maxResults": 50,
        "architecture": "X86_64",
    }
    assert _roundtrip("ListMicrovmImageBuilds", params) == params
    untag = {"Resource": example_input("UntagResource")["Resource"], "TagKeys": ["a", "b c"]}
    assert _roundtrip("UntagResource", untag) == untag


def test_querystring_integer_that_is_not_a_number_is_a_validation_error() -> None:
    match = ROUTER.match("GET", "/2025-09-09/microvms", [("maxResults", "ten")])
    assert match is not None
    with pytest.raises(ValidationError, match=r"at 'maxResults'.*Member must be of type integer"):
        parse_request(match, [("maxResults", "ten")], {}, b"")


def test_body_nested_structures_lists_maps_and_booleans_are_typed() -> None:
    params = {
        "imageIdentifier": "img",
        "idlePolicy": {
            "maxIdleDurationSeconds": 300,
            "suspendedDurationSeconds": 0,
            "autoResumeEnabled": False,
        },
        "ingressNetworkConnectors": ["a", "b"],
        "logging": {"cloudWatch": {"logGroup": "g", "logStream": "s"}},
    }
    assert _roundtrip("RunMicrovm", params) == params


def _run_match() -> object:
    match = ROUTER.match("POST", "/2025-09-09/microvms", [])
    assert match is not None
    return match


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"imageIdentifier": 5}', "at 'imageIdentifier'.*type string"),
        (b'{"imageIdentifier": "i", "maximumDurationInSeconds": "60"}', "type integer"),
        (b'{"imageIdentifier": "i", "maximumDurationInSeconds": 1.5}', "type integer"),
        (b'{"imageIdentifier": "i", "idlePolicy": []}', "at 'idlePolicy'.*type structure"),
        (
            b'{"imageIdentifier": "i", "idlePolicy": {"autoResumeEnabled": "yes"}}',
            "at 'idlePolicy.autoResumeEnabled'.*type boolean",
        ),
        (b'{"imageIdentifier": "i", "ingressNetworkConnectors": [1]}', "1.member"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"imageIdentifier": NaN}', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_malformed_or_mistyped_bodies_are_validation_errors(body: bytes, expected: str) -> None:
    with pytest.raises(ValidationError, match=expected):
        parse_request(_run_match(), [], {}, body)  # type: ignore[arg-type]


def test_unknown_body_members_are_ignored() -> None:
    params = parse_request(_run_match(), [], {}, b'{"imageIdentifier": "i", "bogus": 1}')  # type: ignore[arg-type]
    assert params == {"imageIdentifier": "i"}


def test_json_null_means_absent() -> None:
    params = parse_request(_run_match(), [], {}, b'{"imageIdentifier": "i", "logging": null}')  # type: ignore[arg-type]
    assert params == {"imageIdentifier": "i"}


def test_timestamps_parse_from_epoch_iso_and_rfc822() -> None:
    from botocore.model import Shape

    from embervm.api._parse import _timestamp

    shape = Shape("T", {"type": "timestamp"})
    expected = dt.datetime(2025, 9, 9, 12, 0, tzinfo=dt.UTC)
    assert _timestamp(shape, 1757419200, "t") == expected
    assert _timestamp(shape, "2025-09-09T12:00:00Z", "t") == expected
    assert _timestamp(shape, "Tue, 09 Sep 2025 12:00:00 GMT", "t") == expected
