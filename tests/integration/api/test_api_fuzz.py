"""Property tests generated from the model: invalid input is always a 4xx with a model error
shape, never a 5xx, and core is never called for it; valid input at the model's edges always
reaches core; random bytes anywhere never make the real server fail, hang or grow.

Every case starts from a valid, fully populated input of an operation (``example_input``),
breaks exactly one thing the model forbids, and sends it over TCP to the API, signed
correctly (so only the input is wrong). Every operation is also sent valid-but-odd values
(bounds, unicode, characters that mean something elsewhere: ``_odd_values``), to the API over
a fake core (the request must reach it: ``test_every_operation_has_odd_input_that_reaches_core``
checks that the whole model is covered) and to a real ``embervm server`` subprocess with no
VMs (``real_server``: the real core and store answer), where random bytes also go into the
path, query, a header name or value, a signed header or the body of every operation. The real
server must answer each in 10 s with a status under 500 (or close the connection), stay alive,
and keep its RSS within ``RSS_GROWTH_BOUND`` of what it was once warm. Bounded: a few examples
per operation and kind (about a minute; the real server needs ``flock /tmp/embervm-vm.lock``).
"""

from __future__ import annotations

import copy
import functools
import json
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from botocore.awsrequest import AWSRequest
from botocore.model import ListShape, MapShape, Shape, StructureShape
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from tests.framework.api_live_server import LiveApi
from tests.framework.chaos_server_harness import chaos_server
from tests.framework.fake_api import SignedRequest, sign, signed_request
from tests.framework.server_harness import LiveServer, _read_default_credentials

from embervm.api._routing import Router
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


# -- every operation with valid but odd input --------------------------------------------------

ODD_STRINGS = ("é" * 8, "\u202eevil", "😀", "../..", "%2F%00", "'\"<>&;", " x ", "\\", "\x7f")


def _odd_values(shape: Shape, current: Any) -> list[Any]:
    """Values that pass every rule of ``shape`` but sit at its edges (lengths, bounds,
    unicode, characters with a meaning elsewhere)."""
    meta, kind = shape.metadata, shape.type_name
    low, high = meta.get("min"), meta.get("max")
    out: list[Any] = []
    if kind == "string" and meta.get("enum"):
        out += list(meta["enum"])
    elif kind == "string":
        longest = min(high or 256, 4096)
        out += [*ODD_STRINGS, "é" * longest, current * max(1, longest // max(1, len(current)))]
        out += [current[: low or 0], current.upper(), current + "0" * (longest - len(current))]
        out = [
            s
            for s in out
            if (low or 0) <= len(s) <= longest
            and (not meta.get("pattern") or pattern_matches(meta["pattern"], s))
        ]
    elif kind in ("integer", "long"):
        out += [v for v in (low, high) if v is not None]
        out += [2**31 - 1] if high is None and kind == "integer" else []
        out += [2**63 - 1] if high is None and kind == "long" else []
    elif kind == "boolean":
        out += [True, False]
    elif kind == "list" and current:
        shortest = current[: low or 0]
        # an empty list in the query string is no parameter at all on the wire (botocore sends
        # nothing): for a required member that is a missing value, not an odd one
        if shortest or shape.serialization.get("location") != "querystring":
            out.append(shortest)
        out.append(current * min(high or 20, 100))
    elif kind == "map" and current:
        out += [{}] if not low else []
    return out


@functools.cache
def _odd_candidates(operation: str) -> list[tuple[Path_, Any]]:
    """Made once per operation: hypothesis replays a failing example by drawing from the same
    list again (the model's patterns are matched with a timeout, so a list made again under
    load could differ: FlakyStrategyDefinition)."""
    params = example_input(operation, full=True)
    shape = operation_model(operation).input_shape
    return [
        (path, odd)
        for path, node in _nodes(shape, params)
        if path
        for odd in _odd_values(node, _get(params, path))
    ]


def _odd_input(operation: str, path: Path_, value: Any) -> dict[str, Any]:
    params = copy.deepcopy(example_input(operation, full=True))
    _set(params, path, value)
    return params


@pytest.mark.parametrize("operation", OPERATION_NAMES)
@FUZZ
@given(data=st.data())
def test_valid_but_odd_input_reaches_core_and_never_fails(
    live_api: LiveApi, operation: str, data: st.DataObject
) -> None:
    candidates = _odd_candidates(operation) or [((), None)]
    path, odd = data.draw(st.sampled_from(candidates), label="odd value")
    params = _odd_input(operation, path, odd) if path else example_input(operation, full=True)
    assume(not validate_input(operation, params))
    before = len(live_api.operations.calls)
    response = _send_params(live_api, operation, params)
    assert response.status_code < 300, (response.status_code, response.text)
    assert [c.operation for c in live_api.operations.calls[before:]] == [operation]


def test_every_operation_has_odd_input_that_reaches_core(live_api: LiveApi) -> None:
    """The check that the fuzzing above covers the whole model: for each of its operations,
    at least one odd value is valid, and the request carrying it reaches core."""
    reached = set()
    for operation in OPERATION_NAMES:
        valid = [
            _odd_input(operation, path, odd)
            for path, odd in _odd_candidates(operation)
            if not validate_input(operation, _odd_input(operation, path, odd))
        ]
        assert valid or not operation_model(operation).input_shape.members, operation
        params = valid[0] if valid else {}
        before = len(live_api.operations.calls)
        assert _send_params(live_api, operation, params).status_code < 300, operation
        reached |= {c.operation for c in live_api.operations.calls[before:]}
    assert reached == set(OPERATION_NAMES)


# -- the real server: random bytes anywhere, odd input to the real core, bounded memory -------

#: RSS the real server may gain over the whole fuzz run once warmed up (caches, a few builds'
#: records); a leak per request would pass this within the first thousand requests.
RSS_GROWTH_BOUND = 48 * 1024 * 1024
POSITIONS = ("path", "query", "header name", "header value", "signed header", "body")
RANDOM = st.binary(min_size=1, max_size=96)


@dataclass
class RealServer:
    live: LiveServer
    credential: tuple[str, str]
    rss_warm: list[int]

    def rss(self) -> int:
        assert self.live.process is not None
        for line in Path(f"/proc/{self.live.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def signed(self, operation: str, params: dict[str, Any]) -> SignedRequest:
        key, secret = self.credential
        return signed_request(
            operation, params, access_key_id=key, secret_access_key=secret, endpoint=self.url
        )

    @property
    def url(self) -> str:
        return self.live.api_url

    def send_raw(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]],
                 body: bytes) -> int | None:  # fmt: skip
        """One request on its own connection; the status, or None if the server closed the
        connection without an answer. A server that does neither in 10 s fails the test."""
        head = b"%s %s HTTP/1.1\r\n" % (method, target)
        head += b"".join(b"%s: %s\r\n" % (name, value) for name, value in headers)
        with socket.create_connection(("127.0.0.1", self.live.api_port), timeout=10) as sock:
            sock.sendall(head + b"\r\n" + body)
            answer = b""
            while b"\r\n" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    return None
                answer += chunk
        return int(answer.split(b" ", 2)[1])


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealServer]:
    """``embervm server`` as users run it (a subprocess: its RSS is its own), no VMs."""
    with chaos_server(tmp_path_factory.mktemp("fuzz-server")) as live:
        key, secret = _read_default_credentials(live.data_dir / "credentials")
        yield RealServer(live, (key, secret), [])


def _warm(server: RealServer) -> None:
    """The RSS baseline is taken after every operation ran once (imports, caches, pools)."""
    if server.rss_warm:
        return
    for operation in OPERATION_NAMES:
        request = server.signed(operation, example_input(operation, full=True))
        server.send_raw(request.method.encode(), request.target.encode(),
                        [(k.encode(), v.encode()) for k, v in request.headers.items()],
                        request.body)  # fmt: skip
    server.rss_warm.append(server.rss())


RawRequest = tuple[bytes, list[tuple[bytes, bytes]], bytes]


def _garbled(request: SignedRequest, position: str, noise: bytes) -> RawRequest:
    """The signed request with ``noise`` in one ``position``: target, headers, body."""
    target = request.target.encode()
    headers = [(k.encode(), v.encode()) for k, v in request.headers.items()]
    body = request.body
    path, _, query = target.partition(b"?")
    if position == "path":
        segments = path.split(b"/")
        segments[len(segments) // 2] = noise
        target = b"/".join(segments) + (b"?" + query if query else b"")
    elif position == "query":
        target = path + b"?" + noise
    elif position == "header name":
        headers.append((noise, b"x"))
    elif position == "header value":
        headers.append((b"x-fuzz", noise))
    elif position == "signed header":
        index = [k.lower() for k, _ in headers].index(b"x-amz-date")
        headers[index] = (headers[index][0], noise)
    else:
        body = noise
        headers = [(k, v) for k, v in headers if k.lower() != b"content-length"]
        headers.append((b"Content-Length", str(len(body)).encode()))
    return target, headers, body


@pytest.mark.parametrize("operation", OPERATION_NAMES)
@settings(FUZZ, max_examples=8)
@given(position=st.sampled_from(POSITIONS), noise=RANDOM, data=st.data())
def test_random_bytes_anywhere_never_fail_the_real_server(
    real_server: RealServer, operation: str, position: str, noise: bytes, data: st.DataObject
) -> None:
    _warm(real_server)
    candidates = _odd_candidates(operation)
    params = example_input(operation, full=True)
    if candidates:
        path, odd = data.draw(st.sampled_from(candidates), label="odd value")
        params = _odd_input(operation, path, odd)
    request = real_server.signed(operation, params)
    target, headers, body = _garbled(request, position, noise)
    status = real_server.send_raw(request.method.encode(), target, headers, body)
    assert status is None or status < 500, (status, position, noise)


@pytest.mark.parametrize("operation", OPERATION_NAMES)
@settings(FUZZ, max_examples=4)
@given(data=st.data())
def test_odd_input_never_fails_the_real_core(
    real_server: RealServer, operation: str, data: st.DataObject
) -> None:
    _warm(real_server)
    candidates = _odd_candidates(operation) or [((), None)]
    path, odd = data.draw(st.sampled_from(candidates), label="odd value")
    params = _odd_input(operation, path, odd) if path else example_input(operation, full=True)
    assume(not validate_input(operation, params))
    request = real_server.signed(operation, params)
    response = httpx.request(request.method, real_server.url + request.target,
                             headers=request.headers, content=request.body, timeout=10)  # fmt: skip
    assert response.status_code < 500, (response.status_code, response.text)
    assert response.status_code < 300 or response.headers["x-amzn-errortype"] in error_shape_names()


def test_the_real_server_is_alive_answers_and_kept_its_memory_bounded(
    real_server: RealServer,
) -> None:
    """Runs after the fuzzing above (file order): the process lives, a valid call answers,
    and its RSS grew by less than ``RSS_GROWTH_BOUND`` since it was warm."""
    _warm(real_server)
    assert real_server.live.process is not None
    assert real_server.live.process.poll() is None
    request = real_server.signed("ListMicrovms", {})
    response = httpx.request(request.method, real_server.url + request.target,
                             headers=request.headers, timeout=10)  # fmt: skip
    assert response.status_code == 200, response.text
    growth = real_server.rss() - real_server.rss_warm[0]
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.1f} MiB"
