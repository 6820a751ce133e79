"""``h1.wire``'s head parser and framing rules, byte for byte: what smuggling needs (two
lengths, chunked beside a length, obs-fold, bare CR or LF, "name :") is refused; what RFC 9112
allows is read the way the app will read it."""

from __future__ import annotations

import pytest

from embervm.proxy.h1.wire import (
    CHUNKED,
    MAX_FIELDS,
    NONE,
    TO_CLOSE,
    BadMessage,
    parse_request,
    parse_response,
    request_framing,
    response_framing,
    response_summary,
)


def request(*fields: bytes, first: bytes = b"POST /a?b=1 HTTP/1.1") -> bytes:
    return b"\r\n".join([first, *fields]) + b"\r\n\r\n"


def test_a_request_head_is_read_with_lowercased_names_and_trimmed_values() -> None:
    head = parse_request(request(b"Host: a.example", b"X-Two:\tv  w \t", b"Empty:"))
    assert (head.method, head.target, head.version) == (b"POST", b"/a?b=1", b"1.1")
    assert head.start == b"POST /a?b=1 HTTP/1.1"
    assert head.fields == [(b"host", b"a.example"), (b"x-two", b"v  w"), (b"empty", b"")]


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (request(b"X-Folded: a", b" b"), 400),  # obs-fold
        (request(b"Name : x"), 400),  # whitespace before the colon
        (request(b"Bad Name: x"), 400),
        (request(b"X: a\rb"), 400),  # bare CR inside a value
        (request(b"X: a\nContent-Length: 5"), 400),  # bare LF: a hidden second field
        (request(b"X: a\x00"), 400),
        (request(b"X: a\x7f"), 400),
        (request(b"Host: a", first=b"GET  / HTTP/1.1"), 400),
        (request(b"Host: a", first=b"GET / HTTP/1.1 "), 400),
        (request(b"Host: a", first=b"G@T / HTTP/1.1"), 400),
        (request(b"Host: a", first=b"GET /\x7f HTTP/1.1"), 400),
        (request(b"Host: a", first=b"GET / HTTP/2.0"), 505),
        (request(b"Host: a", first=b"GET / http/1.1"), 400),
        (b"\r\n" + request(b"Host: a"), 400),
        (request(*[b"X-%d: v" % i for i in range(MAX_FIELDS + 1)]), 431),
    ],
)
def test_malformed_request_heads_are_refused(raw: bytes, status: int) -> None:
    with pytest.raises(BadMessage) as refused:
        request_framing(parse_request(raw))
    assert refused.value.status == status


@pytest.mark.parametrize(
    "fields",
    [
        (b"Content-Length: 5", b"Transfer-Encoding: chunked"),
        (b"Transfer-Encoding: chunked", b"Content-Length: 5"),
        (b"Content-Length: 5", b"Content-Length: 6"),
        (b"Content-Length: 5, 6",),
        (b"Content-Length: -1",),
        (b"Content-Length: +5",),
        (b"Content-Length: 0x5",),
        (b"Content-Length: 1234567890123456789",),
        (b"Transfer-Encoding: gzip, chunked",),
        (b"Transfer-Encoding: chunked, chunked",),
        (b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked"),
        (b"Transfer-Encoding: identity",),
    ],
)
def test_ambiguous_request_framing_is_refused(fields: tuple[bytes, ...]) -> None:
    with pytest.raises(BadMessage):
        request_framing(parse_request(request(*fields)))


@pytest.mark.parametrize(
    ("fields", "framing"),
    [
        ((), NONE),
        ((b"Content-Length: 0",), NONE),
        ((b"Content-Length: 12",), 12),
        ((b"Content-Length: 12, 12", b"content-length: 12"), 12),
        ((b"Transfer-Encoding: Chunked",), CHUNKED),
        ((b"Transfer-Encoding: , chunked",), CHUNKED),
    ],
)
def test_request_framing(fields: tuple[bytes, ...], framing: int) -> None:
    assert request_framing(parse_request(request(*fields))) == framing


def response(first: bytes, *fields: bytes) -> bytes:
    return b"\r\n".join([first, *fields]) + b"\r\n\r\n"


MALFORMED_RESPONSES = [
    response(b"HTTP/1.1 200 OK\nContent-Length: 3"),  # bare LF in the status line
    response(b"HTTP/1.1 200 O\rK"),
    response(b"HTTP/1.1 20 OK"),
    response(b"HTTP/1.1 2000 OK"),
    response(b"HTTP/2 200 OK"),
    response(b"HTTP/1.1 200 OK", b"X: a\nY: b"),
]


@pytest.mark.parametrize("raw", MALFORMED_RESPONSES)
def test_malformed_responses_are_refused(raw: bytes) -> None:
    with pytest.raises(BadMessage):
        parse_response(raw)


RESPONSE_FRAMING = [
    (response(b"HTTP/1.1 200 OK", b"Content-Length: 3"), b"GET", 3),
    (response(b"HTTP/1.1 200", b"Content-Length: 3"), b"GET", 3),
    (response(b"HTTP/1.1 200 OK", b"Content-Length: 3"), b"HEAD", NONE),
    (response(b"HTTP/1.1 204 No Content"), b"GET", NONE),
    (response(b"HTTP/1.1 304 Not Modified", b"Content-Length: 3"), b"GET", NONE),
    (response(b"HTTP/1.1 100 Continue"), b"POST", NONE),
    (response(b"HTTP/1.0 200 OK"), b"GET", TO_CLOSE),
    (response(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked"), b"GET", CHUNKED),
]


@pytest.mark.parametrize(("raw", "method", "framing"), RESPONSE_FRAMING)
def test_response_framing(raw: bytes, method: bytes, framing: int) -> None:
    assert response_framing(parse_response(raw), method) == framing


@pytest.mark.parametrize(
    ("raw", "keep"),
    [
        (response(b"HTTP/1.1 200 OK", b"Content-Length: 3"), True),
        (response(b"HTTP/1.1 200 OK", b"Connection: keep-alive, Close", b"Content-Length: 3"),
         False),
        (response(b"HTTP/1.1 200 OK", b"connection: x", b"CONNECTION: close"), False),
        (response(b"HTTP/1.1 200 OK"), False),  # ends when the app closes
        (response(b"HTTP/1.0 200 OK", b"Content-Length: 3"), False),
    ],
)  # fmt: skip
def test_response_summary_says_whether_the_app_connection_stays(raw: bytes, keep: bool) -> None:
    assert response_summary(raw, b"GET")[2] is keep


@pytest.mark.parametrize(("raw", "method", "framing"), RESPONSE_FRAMING)
def test_response_summary_frames_as_the_parser_does(
    raw: bytes, method: bytes, framing: int
) -> None:
    assert response_summary(raw, method)[:2] == (parse_response(raw).status, framing)


@pytest.mark.parametrize(
    "raw",
    [
        *MALFORMED_RESPONSES,
        response(b"HTTP/1.1 200 OK", b"Content-Length: 1, 2"),
        response(b"HTTP/1.1 200 OK", b"Transfer-Encoding: chunked", b"content-length: 2"),
        response(b"HTTP/1.1 200 OK", *[b"X-%d: v" % i for i in range(MAX_FIELDS + 1)]),
    ],
)
def test_response_summary_refuses_what_the_parser_refuses(raw: bytes) -> None:
    with pytest.raises(BadMessage):
        response_summary(raw, b"GET")
