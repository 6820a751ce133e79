"""The strict HTTP/1.1 parsers fed structured-random and mutated heads and chunked bodies, cut
anywhere.

Whatever arrives, ``h1.wire`` and ``h1.body`` either accept it or raise their own ``BadMessage``
(never another exception); what they accept keeps its promises (a head that parses forwards
no connection-specific field and canonical framing; the response summary agrees with the full
parser); a body is found to end exactly where its framing says, however it is split, and
nothing is held but a partial chunk-size or trailer line of at most ``MAX_CHUNK_LINE`` bytes.
Derandomized and a few seconds long, for CI."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from embervm.proxy.h1.body import BodyEnd, Payload
from embervm.proxy.h1.wire import (
    CHUNKED,
    MAX_CHUNK_LINE,
    BadMessage,
    forwarded_fields,
    host_only_cookies,
    parse_request,
    parse_response,
    request_framing,
    response_framing,
    response_summary,
)
from embervm.proxy.limits import HOP_BY_HOP

pytestmark = pytest.mark.timeout(120)

FUZZ = settings(derandomize=True, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow])  # fmt: skip

NAMES = [b"Host", b"Content-Length", b"Transfer-Encoding", b"Connection", b"Upgrade", b"TE",
         b"Keep-Alive", b"Proxy-Authorization", b"Set-Cookie", b"X-aws-proxy-auth", b"X-A",
         b"Bad Name", b"", b"Name ", b"\x00", b"h\xc3\xa9"]  # fmt: skip
VALUES = [b"chunked", b",Chunked", b"chunked, chunked", b"gzip", b"5", b"5, 5", b"5, 6", b"-1",
          b"0x5", b"close", b"keep-alive, X-A", b"upgrade", b"a\rb", b"a\nb", b"\x7f", b"",
          b" a ", b"s=1; Domain=x; Path=/", b"\xff", b"9" * 20]  # fmt: skip
STARTS = [b"GET / HTTP/1.1", b"POST /a?b HTTP/1.0", b"GET http://x/ HTTP/1.1",
          b"OPTIONS * HTTP/1.1", b"CONNECT x:1 HTTP/1.1", b"GET / HTTP/2.0", b"GET  / HTTP/1.1",
          b"G@T / HTTP/1.1", b"HTTP/1.1 200 OK", b"HTTP/1.0 204", b"HTTP/1.1 101 Switching", b"",
          b"GET /\x7f HTTP/1.1"]  # fmt: skip
SEPARATORS = [b"\r\n", b"\n", b"\r", b"\r\n "]
GOOD_STARTS = [b"GET / HTTP/1.1", b"POST /a?b HTTP/1.0", b"OPTIONS * HTTP/1.1", b"PUT /x HTTP/1.1",
               b"HTTP/1.1 200 OK", b"HTTP/1.0 204", b"HTTP/1.1 101 Switching"]  # fmt: skip
GOOD_NAMES = [n for n in NAMES if re.fullmatch(rb"[A-Za-z0-9-]+", n)]
GOOD_VALUES = [v for v in VALUES if re.fullmatch(rb"[ -~]{0,19}", v)]


@st.composite
def heads(draw: st.DrawFn) -> bytes:
    """A head made of likely and unlikely pieces: half of them of well-formed lines only (so
    that what is accepted gets exercised too), the others with odd names, values, separators
    and colons, mutated byte by byte."""
    if not draw(st.booleans()):
        lines = [draw(st.sampled_from(GOOD_STARTS))]
        for _ in range(draw(st.integers(0, 8))):
            name = draw(st.sampled_from(GOOD_NAMES) | st.from_regex(rb"\A[a-zA-Z0-9-]{1,8}\Z"))
            value = draw(st.sampled_from(GOOD_VALUES) | st.from_regex(rb"\A[ -~]{0,16}\Z"))
            lines.append(name + b": " + value)
        return b"\r\n".join(lines) + b"\r\n\r\n"
    lines = [draw(st.sampled_from(STARTS) | st.binary(max_size=40))]
    for _ in range(draw(st.integers(0, 8))):
        name = draw(st.sampled_from(NAMES) | st.binary(min_size=1, max_size=12))
        value = draw(st.sampled_from(VALUES) | st.binary(max_size=20))
        lines.append(name + draw(st.sampled_from([b": ", b":", b" : ", b":\t"])) + value)
    separator = draw(st.sampled_from(SEPARATORS))
    raw = bytearray(lines[0] + b"".join(separator + line for line in lines[1:]))
    for _ in range(draw(st.integers(0, 3))):
        if raw:
            raw[draw(st.integers(0, len(raw) - 1))] = draw(st.integers(0, 255))
    return bytes(raw) + b"\r\n\r\n"


@FUZZ
@given(heads())
def test_request_heads_are_accepted_whole_or_refused_with_bad_message(raw: bytes) -> None:
    try:
        head = parse_request(raw)
        framing = request_framing(head)
    except BadMessage as bad:
        status = bad.status
        assert status in (400, 431, 505)
        return
    forwarded = forwarded_fields(head, upgrade=b"upgrade" in head.tokens(b"connection"))
    names = [name for name, _ in forwarded]
    assert not (set(names) & HOP_BY_HOP) - {b"upgrade", b"connection", b"transfer-encoding"}
    assert names.count(b"content-length") + names.count(b"transfer-encoding") <= 1
    assert [name for name, _ in head.fields].count(b"host") <= 1
    if framing == CHUNKED:
        assert (b"transfer-encoding", b"chunked") in forwarded
    elif framing > 0:
        assert (b"content-length", b"%d" % framing) in forwarded


@FUZZ
@given(heads(), st.sampled_from([b"GET", b"HEAD", b"POST"]))
def test_response_heads_are_read_alike_by_the_summary_and_the_parser(
    raw: bytes, method: bytes
) -> None:
    try:
        head = parse_response(raw)
        framing = response_framing(head, method)
    except BadMessage:
        with pytest.raises(BadMessage):
            response_summary(raw, method)
        return
    status, summary_framing, _ = response_summary(raw, method)
    assert (status, summary_framing) == (head.status, framing)
    rewritten = host_only_cookies(raw)
    assert response_framing(parse_response(rewritten), method) == framing


# -- bodies --------------------------------------------------------------------------------


@st.composite
def chunked_bodies(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """``(the body's wire bytes, its payload)``, with extensions and trailers now and then."""
    wire, payload = [], []
    for _ in range(draw(st.integers(0, 5))):
        data = draw(st.binary(min_size=1, max_size=64))
        size = b"%x" % len(data)
        size = size.upper() if draw(st.booleans()) else size
        extension = draw(st.sampled_from([b"", b";a=b", b" ;x", b'\t;q="v"']))
        wire.append(size + extension + b"\r\n" + data + b"\r\n")
        payload.append(data)
    wire.append(b"0\r\n")
    wire += [b"X-T%d: v\r\n" % i for i in range(draw(st.integers(0, 2)))]
    wire.append(b"\r\n")
    return b"".join(wire), b"".join(payload)


def cut(data: bytes, points: list[int]) -> list[bytes]:
    marks = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in itertools.pairwise(marks)]


@FUZZ
@given(chunked_bodies(), st.lists(st.integers(0, 10_000), max_size=12), st.binary(max_size=20))
def test_a_chunked_body_ends_where_its_framing_says_however_it_is_cut(
    body: tuple[bytes, bytes], points: list[int], after: bytes
) -> None:
    wire, payload = body
    end_of, unframe = BodyEnd(CHUNKED), Payload(CHUNKED)
    seen, ended_at, taken = [], None, 0
    for piece in cut(wire + after, points):
        if ended_at is None:
            end = end_of.feed(piece)
            if end_of.done:
                ended_at = taken + end
        if not unframe.done:
            data, _ = unframe.payload(piece)
            seen.append(data)
        assert len(end_of.line) <= MAX_CHUNK_LINE
        taken += len(piece)
    assert ended_at == len(wire)
    assert b"".join(seen) == payload


@FUZZ
@given(chunked_bodies(), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                  min_size=1, max_size=4),
       st.lists(st.integers(0, 10_000), max_size=8))  # fmt: skip
def test_a_mutated_chunked_body_is_refused_with_bad_message_or_read_bounded(
    body: tuple[bytes, bytes], mutations: list[tuple[int, int]], points: list[int]
) -> None:
    wire = bytearray(body[0])
    for where, byte in mutations:
        wire[where % len(wire)] = byte
    end_of = BodyEnd(CHUNKED)
    try:
        for piece in cut(bytes(wire), points):
            end_of.feed(piece)
            assert len(end_of.line) <= MAX_CHUNK_LINE
    except BadMessage:
        pass


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(0, 10_000), max_size=8))
def test_random_bytes_as_a_chunked_body_hold_at_most_one_line(
    data: bytes, points: list[int]
) -> None:
    end_of = BodyEnd(CHUNKED)
    try:
        for piece in cut(data, points):
            end_of.feed(piece)
            assert len(end_of.line) <= MAX_CHUNK_LINE
    except BadMessage:
        pass


def test_an_endless_chunk_size_line_is_refused_not_held() -> None:
    end_of = BodyEnd(CHUNKED)
    end_of.feed(b"0" * MAX_CHUNK_LINE)
    with pytest.raises(BadMessage):
        end_of.feed(b"0")
