"""What an HTTP/2 request's header list must be before it goes anywhere (RFC 9113 §8.2 and §8.3).

Pseudo-header fields first, only the four a request may carry, each once; ``:method``,
``:scheme`` and ``:path`` present (no CONNECT: nothing here tunnels); field names lowercase
tokens; values (pseudo-header values too) without NUL, CR, LF or other control characters and
without whitespace at either end; no connection-specific fields; ``te`` only ``trailers``; one
consistent ``content-length``. A request that breaks any of these is malformed: its stream is
reset and nothing of it reaches an app (HPACK can carry bytes, such as CR LF, that would split
an HTTP/1.1 head). Checked a whole list at a time with C-level byte operations: the per-field
regex checks cost more than the rest of a request.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from embervm.proxy.h2.hpack import Header
from embervm.proxy.limits import CONNECTION_SPECIFIC

_TCHAR_LOWER = b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyz"
_FIELD_VALUE = bytes(range(0x20, 0x7F)) + b"\t" + bytes(range(0x80, 0x100))  # VCHAR SP HTAB obs
_EDGE = frozenset({b"", b" ", b"\t"})  # what may not start or end a value (or: no value)
# SP or HTAB beside a NUL (the separator of joined values): one scan from NUL to NUL (a
# literal first byte), where four ``bytes.find`` of two-byte needles cost ~1 us a request
_INNER_EDGE = re.compile(rb"\x00(?:[ \t]|(?<=[ \t]\x00))")
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_PATH = re.compile(rb"[\x21-\x7e]+")
_PSEUDO = frozenset({b":method", b":scheme", b":authority", b":path"})


class Malformed(Exception):
    """A malformed request or trailer section: stream error PROTOCOL_ERROR."""


class Request(NamedTuple):
    method: bytes
    scheme: bytes
    authority: bytes | None
    path: bytes
    fields: list[Header]  # the regular fields, in order
    length: int  # content-length, or -1


def _joined_ok(parts: list[bytes], allowed: bytes) -> bool:
    """Every part made only of ``allowed`` bytes (which never include NUL, the separator)."""
    joined = b"\x00".join(parts)
    return joined.translate(None, allowed) == b"\x00" * (len(parts) - 1)


def _values_ok(joined: bytes, count: int) -> bool:
    """``count`` values joined by NUL: allowed bytes only, no whitespace at either end of one."""
    if joined.translate(None, _FIELD_VALUE) != b"\x00" * (count - 1):
        return False
    if joined[:1] in _EDGE or joined[-1:] in _EDGE:
        return not joined  # one empty value is fine
    return _INNER_EDGE.search(joined) is None


def check_fields(fields: list[Header], extra_values: tuple[bytes, ...] = ()) -> None:
    """Names and values of regular fields (plus ``extra_values``, the pseudo-headers')."""
    names = [name for name, _ in fields]
    if names:
        if not _joined_ok(names, _TCHAR_LOWER) or not all(names):
            raise Malformed("bad field name")
        if not CONNECTION_SPECIFIC.isdisjoint(names):
            raise Malformed("connection-specific field")
    values = [value for _, value in fields]
    values += extra_values
    if values and not _values_ok(b"\x00".join(values), len(values)):
        raise Malformed("bad field value")


def request(headers: list[Header]) -> Request:
    pseudo: dict[bytes, bytes] = {}
    count = 0
    for name, value in headers:
        if name[:1] != b":":
            break
        if name not in _PSEUDO or name in pseudo:
            raise Malformed("bad pseudo-header")
        pseudo[name] = value
        count += 1
    fields = headers[count:] if count else headers
    check_fields(fields, tuple(pseudo.values()))
    method, scheme, path = pseudo.get(b":method"), pseudo.get(b":scheme"), pseudo.get(b":path")
    if method is None or scheme is None or path is None:
        raise Malformed("missing pseudo-header")
    if not _METHOD.fullmatch(method) or not _PATH.fullmatch(path):
        raise Malformed("bad method or path")
    length = -1
    for name, value in fields:
        if name == b"content-length":
            if not value.isdigit() or len(value) > 18 or (length >= 0 and int(value) != length):
                raise Malformed("bad content-length")
            length = int(value)
        elif name == b"te" and value != b"trailers":
            raise Malformed("te other than trailers")
    return Request(method, scheme, pseudo.get(b":authority"), path, fields, length)


def trailers(headers: list[Header]) -> list[Header]:
    if any(name[:1] == b":" for name, _ in headers):
        raise Malformed("pseudo-header in trailers")
    check_fields(headers)
    return headers
