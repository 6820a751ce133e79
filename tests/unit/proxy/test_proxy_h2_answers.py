"""What an app's HTTP/1.1 answer becomes for an HTTP/2 client (``h2.relay_h1.response_fields``):
the same rules as the HTTP/1.1 relay (audit A15, A18), from the same list
(``limits.HOP_BY_HOP_H2``)."""

from __future__ import annotations

from embervm.proxy.h1.wire import parse_response
from embervm.proxy.h2.relay_h1 import response_fields


def _fields(raw: bytes) -> tuple[dict[bytes, bytes], bool]:
    fields, close = response_fields(parse_response(raw))
    return dict(fields), close


def test_an_apps_cookie_comes_back_host_only() -> None:
    fields, _ = _fields(
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
        b"set-cookie: sid=1; Domain=microvm.localhost; Path=/; HttpOnly\r\n\r\n"
    )
    assert fields[b"set-cookie"] == b"sid=1; Path=/; HttpOnly"


def test_connection_specific_fields_and_those_connection_names_are_dropped() -> None:
    fields, close = _fields(
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: x-private\r\nx-private: 1\r\n"
        b"keep-alive: timeout=5\r\nproxy-authenticate: Basic\r\nx-kept: 2\r\n\r\n"
    )
    assert fields == {b":status": b"200", b"content-length": b"0", b"x-kept": b"2"}
    assert not close
