"""``BodyEnd``: where a body ends, however the bytes are cut into pieces; malformed chunk
framing (the other half of request smuggling) is refused. ``Payload``: the same, with the
payload handed back without its framing."""

from __future__ import annotations

import pytest

from embervm.proxy.h1.body import BodyEnd, Payload
from embervm.proxy.h1.wire import CHUNKED, MAX_CHUNK_LINE, NONE, TO_CLOSE, BadMessage

CHUNKED_BODY = b"5;name=value\r\nhello\r\n6 ; x\r\n world\r\n0\r\nx-trailer: t\r\n\r\n"


def ends_at(framing: int, data: bytes, piece: int) -> int | None:
    """Where the body ends when ``data`` arrives ``piece`` bytes at a time (None: not yet)."""
    body = BodyEnd(framing)
    for start in range(0, len(data), piece):
        chunk = data[start : start + piece]
        end = body.feed(chunk)
        if body.done:
            return start + end
        assert end == len(chunk)
    return None


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_a_chunked_body_ends_after_its_trailers_however_it_is_cut(piece: int) -> None:
    assert ends_at(CHUNKED, CHUNKED_BODY + b"GET / HTTP/1.1\r\n", piece) == len(CHUNKED_BODY)


@pytest.mark.parametrize("piece", [1, 4, 1000])
def test_a_length_body_ends_at_its_length(piece: int) -> None:
    assert ends_at(10, b"0123456789GET / HTTP/1.1\r\n", piece) == 10


def test_no_body_and_to_close() -> None:
    assert BodyEnd(NONE).done
    body = BodyEnd(TO_CLOSE)
    assert body.feed(b"all of it") == 9
    assert not body.done


def test_feed_starts_where_asked() -> None:
    body = BodyEnd(CHUNKED)
    assert body.feed(b"HEAD0\r\n\r\nNEXT", 4) == 9
    assert body.done


@pytest.mark.parametrize(
    "data",
    [
        b"5\n;x\r\nhello\r\n0\r\n\r\n",  # bare LF in the size line
        b"5;x\ry\r\nhello\r\n0\r\n\r\n",  # bare CR in an extension
        b" 5\r\nhello\r\n0\r\n\r\n",  # whitespace before the size
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"-5\r\nhello\r\n0\r\n\r\n",
        b"12345678901234567\r\n",  # more than 16 hex digits
        b"5\r\nhelloXX0\r\n\r\n",  # no CR LF after the data
        b"5\r\nhello\r\n0\r\nbad trailer\r\n\r\n",
        b"5\r\nhello\r\n0\r\n folded: x\r\n\r\n",
        b"5;" + b"x" * MAX_CHUNK_LINE + b"\r\n",  # a line longer than the limit
        b"5;" + b"x" * MAX_CHUNK_LINE,  # ... even before its end arrives
    ],
)
@pytest.mark.parametrize("piece", [1, 1 << 20])
def test_malformed_chunk_framing_is_refused(data: bytes, piece: int) -> None:
    with pytest.raises(BadMessage):
        ends_at(CHUNKED, data, piece)


def payload_of(framing: int, data: bytes, piece: int) -> tuple[bytes, int | None]:
    """The payload and where the body ended when ``data`` arrives ``piece`` bytes at a time."""
    body = Payload(framing)
    got = b""
    for start in range(0, len(data), piece):
        part, end = body.payload(data[start : start + piece])
        got += part
        if body.done:
            return got, start + end
    return got, None


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_a_payload_comes_without_chunk_lines_or_trailers_however_it_is_cut(piece: int) -> None:
    data = CHUNKED_BODY + b"HTTP/1.1 200 OK\r\n"
    assert payload_of(CHUNKED, data, piece) == (b"hello world", len(CHUNKED_BODY))
    assert payload_of(5, b"helloHTTP/1.1", piece) == (b"hello", 5)
    assert payload_of(TO_CLOSE, b"all of it", piece) == (b"all of it", None)
    assert Payload(NONE).payload(b"next") == (b"", 0)
