"""Property tests generated from the model: invalid input is always a 4xx with a model error
shape, never a 5xx, and core is never called for it.

Every case starts from a valid, fully populated input of an operation (``example_input``),
breaks exactly one thing the model forbids, and sends it over TCP to the real server, signed
correctly (so only the input is wrong). Bounded: a few examples per operation and kind.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from api_live_server import LiveApi
from botocore.awsrequest import AWSRequest
from botocore.model import ListShape, MapShape, Shape, StructureShape
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from embervm.api._routing import Router
from embervm.api.testing import sign, signed_request
from embervm.errors import ValidationError
from embervm.model import (
    OPERATION_NAMES,
    error_shape_names,
    example_input,
    operation_model,
    pattern_matches,
    validate_input,
)

pytestmark = pytest.mark.integration

FUZZ = settings(
    max_examples=6,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
ROUTER = Router.from_model()
Path_ = tuple[str | int, ...]


def _nodes(shape: Shape, value: Any, path: Path_ = ()) -> Iterator[tuple[Path_, Shape]]:
    """Every (path, shape) inside a value, the value itself included."""
    yield path, shape
    if isinstance(shape, StructureShape):
        for name, member in shape.members.items():
            if name in value:
                yield from _nodes(member, value[name], (*path, name))
    elif isinstance(shape, ListShape):
        for index, item in enumerate(value):
            yield from _nodes(shape.member, item, (*path, index))
    elif isinstance(shape, MapShape):
        for key, item in value.items():
            yield from _nodes(shape.value, item, (*path, key))


def _set(document: Any, path: Path_, value: Any) -> None:
    for step in path[:-1]:
        document = document[step]
    document[path[-1]] = value


def _delete(document: Any, path: Path_) -> None:
    for step in path[:-1]:
        document = document[step]
    del document[path[-1]]


def _invalid_values(shape: Shape, current: Any) -> list[Any]:
    """Values of the right type that break one of ``shape``'s rules."""
    meta = shape.metadata
    out: list[Any] = []
    kind = shape.type_name
    if kind == "string":
        if meta.get("enum"):
            out += ["NOT_" + meta["enum"][0], meta["enum"][0].lower()]
        if meta.get("max") is not None:
            out.append("a" * (meta["max"] + 1))
        if meta.get("min", 0) >= 1:
            out.append("")
        if meta.get("pattern"):
            for candidate in ("a b", " ", "tab\there", "semi;colon", "!!", "a\nb", "*:*"):
                fits = meta.get("min", 0) <= len(candidate) <= meta.get("max", 10**9)
                if fits and not pattern_matches(meta["pattern"], candidate):
                    out.append(candidate)
    elif kind in ("integer", "long"):
        if meta.get("max") is not None:
            out.append(meta["max"] + 1)
        if meta.get("min") is not None:
            out.append(meta["min"] - 1)
        out.append(2**63 if kind == "long" else 2**31)
    elif kind == "list":
        assert isinstance(shape, ListShape)
        if meta.get("max") is not None and current:
            out.append([current[0]] * (meta["max"] + 1))
        if meta.get("min", 0) >= 1:
            out.append([])
    elif kind == "map":
        if meta.get("max") is not None and current:
            key, item = next(iter(current.items()))
            out.append({f"{key}{i}": item for i in range(meta["max"] + 1)})
    elif isinstance(shape, StructureShape) and shape.is_tagged_union:
        out.append({})
    return out


def _wrong_types(shape: Shape) -> list[Any]:
    return {
        "string": [123, True, [], {}, 1.5],
        "integer": ["1", 1.5, True, [], {}],
        "long": ["1", 1.5, False, []],
        "boolean": ["true", 1, [], {}],
        "list": ["x", 1, {}],
        "map": ["x", 1, []],
        "structure": ["x", 1, [], True],
        "timestamp": [True, [], {}],
    }.get(shape.type_name, [[]])


def _send(live: LiveApi, method: str, target: str, body: bytes) -> httpx.Response:
    request = AWSRequest(method=method, url=live.url + target, data=body)
    sign(request, live.credential.access_key_id, live.credential.secret_access_key)
    headers = dict(request.prepare().headers.items())
    return httpx.request(method, live.url + target, headers=headers, content=body, timeout=10)


def _send_params(live: LiveApi, operation: str, params: dict[str, Any]) -> httpx.Response:
    request = signed_request(
        operation,
        params,
        access_key_id=live.credential.access_key_id,
        secret_access_key=live.credential.secret_access_key,
        endpoint=live.url,
    )
    return httpx.request(
        request.method,
        live.url + request.target,
        headers=request.headers,
        content=request.body,
        timeout=10,
    )


def _assert_rejected(live: LiveApi, response: httpx.Response, calls_before: int) -> None:
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    assert response.headers["x-amzn-errortype"] in error_shape_names()
    assert isinstance(response.json()["message"], str)
    assert len(live.operations.calls) == calls_before


@pytest.mark.parametrize("operation", OPERATION_NAMES)
@FUZZ
@given(data=st.data())
def test_values_breaking_a_rule_are_rejected(
    live_api: LiveApi, operation: str, data: st.DataObject
) -> None:
    params = example_input(operation, full=True)
    shape = operation_model(operation).input_shape
    candidates = [
        (path, bad)
        for path, node in _nodes(shape, params)
        if path
        for bad in _invalid_values(node, _get(params, path))
    ]
    path, bad = data.draw(st.sampled_from(candidates), label="mutation")
    broken = copy.deepcopy(params)
    _set(broken, path, bad)
    assert validate_input(operation, broken), "the mutation must break a rule"
    before = len(live_api.operations.calls)
    _assert_rejected(live_api, _send_params(live_api, operation, broken), before)


def _get(document: Any, path: Path_) -> Any:
    for step in path:
        document = document[step]
    return document


def _required_paths(operation: str) -> list[Path_]:
    """Required members anywhere in the full example input, except URI labels (a missing
    label is another path: the garbage-path test covers those)."""
    params = example_input(operation, full=True)
    return [
        (*path, name)
        for path, node in _nodes(operation_model(operation).input_shape, params)
        if isinstance(node, StructureShape)
        for name in node.required_members
        if node.members[name].serialization.get("location") != "uri"
    ]


@pytest.mark.parametrize("operation", [op for op in OPERATION_NAMES if _required_paths(op)])
@FUZZ
@given(data=st.data())
def test_missing_required_members_are_rejected(
    live_api: LiveApi, operation: str, data: st.DataObject
) -> None:
    params = example_input(operation, full=True)
    path = data.draw(st.sampled_from(_required_paths(operation)), label="missing")
    broken = copy.deepcopy(params)
    _delete(broken, path)
    before = len(live_api.operations.calls)
    _assert_rejected(live_api, _send_params(live_api, operation, broken), before)


def _body_members(operation: str) -> dict[str, Shape]:
    shape = operation_model(operation).input_shape
    return {
        name: member
        for name, member in shape.members.items()
        if member.serialization.get("location") is None
    }


BODY_OPERATIONS = [op for op in OPERATION_NAMES if _body_members(op)]


@pytest.mark.parametrize("operation", BODY_OPERATIONS)
@FUZZ
@given(data=st.data())
def test_wrong_json_types_are_rejected(
    live_api: LiveApi, operation: str, data: st.DataObject
) -> None:
    params = example_input(operation, full=True)
    request = signed_request(
        operation, params, access_key_id="k", secret_access_key="s", endpoint=live_api.url
    )
    document = json.loads(request.body)
    candidates = [
        (path, node)
        for name, member in _body_members(operation).items()
        for path, node in _nodes(member, params[name], (name,))
    ]
    path, node = data.draw(st.sampled_from(candidates), label="member")
    wrong = data.draw(st.sampled_from(_wrong_types(node)), label="wrong value")
    _set(document, path, wrong)
    before = len(live_api.operations.calls)
    target = request.target
    response = _send(live_api, request.method, target, json.dumps(document).encode())
    _assert_rejected(live_api, response, before)


@pytest.mark.parametrize("operation", BODY_OPERATIONS)
@FUZZ
@given(
    body=st.one_of(
        st.binary(min_size=1, max_size=64),
        st.text(min_size=1, max_size=64).map(str.encode),
        st.sampled_from([b"[]", b'"x"', b"1", b"null", b"{", b'{"a":NaN}', b"\xff"]),
    )
)
def test_malformed_bodies_are_rejected(live_api: LiveApi, operation: str, body: bytes) -> None:
    try:
        document = json.loads(body)
    except ValueError:
        document = None
    assume(not isinstance(document, dict))
    assume(body.strip() not in (b"", b"null"))
    request = signed_request(
        operation,
        example_input(operation, full=True),
        access_key_id="k",
        secret_access_key="s",
        endpoint=live_api.url,
    )
    before = len(live_api.operations.calls)
    _assert_rejected(live_api, _send(live_api, request.method, request.target, body), before)


@pytest.mark.parametrize(
    "operation",
    [
        op
        for op in OPERATION_NAMES
        if any(
            m.serialization.get("location") == "querystring" and m.type_name == "integer"
            for m in operation_model(op).input_shape.members.values()
        )
    ],
)
@FUZZ
@given(value=st.sampled_from(["abc", "1.5", "", "-", "99999999999999999999999", "0x10", "1e3"]))
def test_non_integer_query_values_are_rejected(
    live_api: LiveApi, operation: str, value: str
) -> None:
    params = example_input(operation, full=True)
    request = signed_request(
        operation, params, access_key_id="k", secret_access_key="s", endpoint=live_api.url
    )
    path, _, query = request.target.partition("?")
    pairs = [p for p in query.split("&") if not p.startswith("maxResults=")]
    target = f"{path}?{'&'.join([*pairs, 'maxResults=' + quote(value)])}"
    before = len(live_api.operations.calls)
    _assert_rejected(live_api, _send(live_api, request.method, target, b""), before)


SEGMENT = st.one_of(
    st.text(min_size=0, max_size=12).map(lambda s: quote(s, safe="")),
    st.sampled_from(["2025-09-09", "microvms", "microvm-images", "versions", "%ff", "%zz", ".."]),
)


@settings(FUZZ, max_examples=60)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE"]),
    segments=st.lists(SEGMENT, min_size=0, max_size=6),
)
def test_garbage_paths_are_rejected(live_api: LiveApi, method: str, segments: list[str]) -> None:
    target = "/" + "/".join(segments)
    try:
        match = ROUTER.match(method, target, [])
    except ValidationError:
        match = None
    before = len(live_api.operations.calls)
    response = _send(live_api, method, target, b"")
    if match is not None:
        # A path that happens to name an operation may be valid input; never a 5xx though.
        assert response.status_code < 500, response.text
        return
    _assert_rejected(live_api, response, before)
