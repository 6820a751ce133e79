"""HTTP/1.1 on the wire for the relay's hot path: strict head parsing and raw body copying.

h11 parsed and re-serialized every head and every body chunk, and that was ~60 % of the
proxy's CPU per request. A relay needs less: the head's fields (to route, check and strip),
the body's framing (to know where a message ends), and then the bytes as they are. This module
parses heads strictly (RFC 9112: token methods and field names, no whitespace before the
colon, no obs-fold, no control characters in values, one consistent Content-Length, chunked as
the only transfer coding and never with Content-Length — the rules that stop request
smuggling) within the StreamReader's limit (64 KiB), and copies bodies without decoding them,
following chunk sizes only to find the end.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from http import HTTPStatus

from embervm.proxy.limits import HOP_BY_HOP

MAX_FIELDS = 128
MAX_CHUNK_LINE = 4096
_TCHAR = rb"!#$%&'*+\-.^_`|~0-9A-Za-z"
_TOKEN = re.compile(rb"[%s]+" % _TCHAR)
_TARGET = re.compile(rb"[\x21-\x7e]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# chunk-size [BWS ";" chunk-ext] CRLF; a trailer is a field line (nothing else may hide there)
_CHUNK_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?\r\n")
_TRAILER = re.compile(rb"[%s]+:[\t\x20-\x7e\x80-\xff]*\r\n" % _TCHAR)
# A whole head is checked by one regex each for its first line and its fields (the per-line
# checks cost more than the rest of a request): names are tokens right before the colon (no
# obs-fold, no "name :"), values are VCHAR, SP, HTAB and obs-text only (no bare CR or LF).
_REQUEST_LINE = re.compile(rb"([%s]+) ([\x21-\x7e]+) HTTP/1\.([01])\r\n" % _TCHAR)
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [\t\x20-\x7e\x80-\xff]*)?\r\n")
_FIELD_LINES = re.compile(rb"(?:[%s]+:[\t\x20-\x7e\x80-\xff]*\r\n)*\r\n" % _TCHAR)
_FIELD = re.compile(rb"([^:]+):[ \t]*([^\r]*)\r\n")  # on lines _FIELD_LINES passed
# Scans for one field by name start at the LF ending the line before it (a literal first byte
# lets the regex engine skip from LF to LF; ``^`` with MULTILINE and IGNORECASE tried a match
# at every byte of the head, ~1 us each scan). On a head _FIELD_LINES passed, an LF is always
# the end of a line and a value ends at the next CR; a match leaves that CR LF to the next one.
_FRAMING_FIELD = re.compile(rb"\n(?i:(content-length|transfer-encoding|connection)):[ \t]*([^\r]*)")
CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"
_FRAMING_NAMES = frozenset({b"content-length", b"transfer-encoding"})
_SPECIAL = HOP_BY_HOP | _FRAMING_NAMES
_SET_COOKIE = re.compile(rb"\n(?i:set-cookie):")  # see _FRAMING_FIELD


class BadMessage(Exception):
    """A head or body that breaks HTTP/1.1's framing rules: answered 400 (or 431), never relayed."""

    def __init__(self, status: int = 400) -> None:
        super().__init__(status)
        self.status = status


Fields = list[tuple[bytes, bytes]]


@dataclass(slots=True)
class Head:
    """A request (``method``, ``target``) or response (``status``) head; names lowercased."""

    start: bytes  # the first line, as received
    version: bytes  # b"1.1" or b"1.0"
    fields: Fields
    method: bytes = b""
    target: bytes = b""
    status: int = 0

    def get(self, name: bytes) -> bytes | None:
        for key, value in self.fields:
            if key == name:
                return value
        return None

    def tokens(self, name: bytes) -> set[bytes]:
        """Comma-separated values of every ``name`` field, lowercased (Connection, Upgrade...)."""
        found: set[bytes] = set()
        for key, value in self.fields:
            if key == name:
                found.update(v.strip().lower() for v in value.split(b","))
        return found


async def read_head(reader: asyncio.StreamReader) -> bytes | None:
    """The next head (up to and including the blank line), or None at a clean end of stream."""
    try:
        return await reader.readuntil(HEAD_END)
    except asyncio.LimitOverrunError:
        raise BadMessage(431) from None
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise BadMessage(400) from None
        return None


def _fields(raw: bytes, start: int) -> Fields:
    """The fields of a head whose first line ends at ``start`` (``raw`` ends with the blank
    line)."""
    if not _FIELD_LINES.fullmatch(raw, start):
        raise BadMessage()
    found = _FIELD.findall(raw, start)
    if len(found) > MAX_FIELDS:
        raise BadMessage(431)
    return [(name.lower(), value.rstrip(b" \t")) for name, value in found]


_VERSIONS = {b"1": b"1.1", b"0": b"1.0"}


def parse_request(raw: bytes) -> Head:
    """A request head, refused (400) when RFC 9112 says so: a target that is not origin-form
    (or ``*`` for OPTIONS; absolute-form would name a host the ``Host`` field does not, and
    authority-form is CONNECT's), or more than one ``Host`` field (§3.2: which one routes?)."""
    line = _REQUEST_LINE.match(raw)
    if line is None:
        raise _request_line_error(raw)
    start = line.end()
    method, target = line[1], line[2]
    if target[0] != 0x2F and not (target == b"*" and method == b"OPTIONS"):  # "/"
        raise BadMessage()
    fields = _fields(raw, start)
    hosts = 0
    for name, _ in fields:  # a plain loop: sum() over a generator cost 3x as much
        if name == b"host":
            hosts += 1
    if hosts > 1:
        raise BadMessage()
    return Head(raw[: start - 2], _VERSIONS[line[3]], fields, method=method, target=target)


def _request_line_error(raw: bytes) -> BadMessage:
    """505 for a well-formed request line of another HTTP version, else 400."""
    parts = raw.split(CRLF, 1)[0].split(b" ")
    if (
        len(parts) == 3
        and _TOKEN.fullmatch(parts[0])
        and _TARGET.fullmatch(parts[1])
        and parts[2].startswith(b"HTTP/")
    ):
        return BadMessage(505)
    return BadMessage()


def parse_response(raw: bytes) -> Head:
    line = _STATUS_LINE.match(raw)
    if line is None:
        raise BadMessage(502)
    start = line.end()
    return Head(raw[: start - 2], _VERSIONS[line[1]], _fields(raw, start), status=int(line[2]))


def status_line(status: int) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = ""
    return f"HTTP/1.1 {status} {reason}".encode()


def request_head(method: bytes, target: bytes, fields: Fields) -> bytes:
    """A request head built from HTTP/2 fields, checked as strictly as a received one (HPACK
    can carry bytes, such as CR LF, that would otherwise split the head)."""
    if not _TOKEN.fullmatch(method) or not _TARGET.fullmatch(target):
        raise BadMessage()
    for name, value in fields:
        if not _TOKEN.fullmatch(name) or _BAD_VALUE.search(value):
            raise BadMessage()
    return serialize(b"%s %s HTTP/1.1" % (method, target), fields)


def serialize(start: bytes, fields: Fields) -> bytes:
    return b"".join([start, CRLF, *(b"%s: %s\r\n" % kv for kv in fields), CRLF])


def forwarded_fields(head: Head, *, upgrade: bool = False) -> Fields:
    """A request's fields as the app gets them over HTTP/1.1: no connection-specific field and
    none the Connection field names (RFC 9110 §7.6.1), the framing stated once in its canonical
    form (``request_framing`` accepted the head, so ``Content-Length: 5, 5`` is ``5`` and
    ``Transfer-Encoding: ,Chunked`` is ``chunked``: an app reads the length the proxy read), and
    for an upgrade its ``Upgrade`` field with ``Connection: upgrade``. One pass over the fields
    (this is on every request's path), a second only when Connection names other fields."""
    kept: Fields = []
    connection: list[bytes] = []
    framed = False
    for name, value in head.fields:
        if name not in _SPECIAL:
            kept.append((name, value))
        elif name in _FRAMING_NAMES:
            if not framed:
                framed = True
                canonical = b"chunked" if name == b"transfer-encoding" else _length(value)
                kept.append((name, canonical))
        elif name == b"connection":
            connection.append(value)
        elif upgrade and name == b"upgrade":
            kept.append((name, value))
    if connection:
        named = {t.strip().lower() for v in connection for t in v.split(b",")} - _SPECIAL
        named.discard(b"host")  # the routing field stays whatever Connection says
        if named:
            kept = [(name, value) for name, value in kept if name not in named]
    if upgrade:
        kept.append((b"connection", b"upgrade"))
    return kept


def _length(value: bytes) -> bytes:
    """The one length a Content-Length field ``_framing`` accepted states (``5, 5`` → ``5``)."""
    return b"%d" % int(value.split(b",", 1)[0])


def host_only_cookie(value: bytes) -> bytes:
    """A ``Set-Cookie`` value without its ``Domain`` attribute (RFC 6265 §5.2.3), so the cookie
    goes back only to the endpoint that set it: every VM's endpoint shares the proxy's parent
    domain, and an app must not set cookies its neighbours' users would send (cookie tossing)."""
    if b"domain" not in value.lower():
        return value
    name_value, *attributes = value.split(b";")
    kept = [a for a in attributes if a.split(b"=", 1)[0].strip().lower() != b"domain"]
    return b";".join([name_value, *kept])


def host_only_cookies(raw: bytes) -> bytes:
    """A response head as received, but with ``host_only_cookie`` applied to each Set-Cookie
    field (the head is rebuilt only when it has one: most answers pass as they are)."""
    if _SET_COOKIE.search(raw) is None:
        return raw
    head = parse_response(raw)
    fields = [(n, host_only_cookie(v) if n == b"set-cookie" else v) for n, v in head.fields]
    return serialize(head.start, fields)


# -- framing -------------------------------------------------------------------------------

NONE = -1  # no body
CHUNKED = -2
TO_CLOSE = -3  # a response that ends when the app closes the connection


def _framing(lengths: list[bytes], codings: list[bytes]) -> tuple[bool, int | None]:
    """(chunked, content length) from the values of every Content-Length and
    Transfer-Encoding field."""
    if codings:
        found = [c for value in codings for v in value.split(b",") if (c := v.strip().lower())]
        if found:
            if found != [b"chunked"] or lengths:  # the only coding, and never beside a length
                raise BadMessage()
            return True, None
    if not lengths:
        return False, None
    if len(lengths) == 1 and lengths[0].find(b",") < 0:  # find: see h2.fields._values_ok
        length = lengths[0].strip()  # the usual case, without building a set
    else:
        values = {v.strip() for value in lengths for v in value.split(b",")}
        if len(values) != 1:
            raise BadMessage()
        length = values.pop()
    if not length.isdigit() or len(length) > 18:
        raise BadMessage()
    return False, int(length)


def _head_framing(head: Head) -> tuple[bool, int | None]:
    lengths: list[bytes] = []
    codings: list[bytes] = []
    for key, value in head.fields:
        if key == b"content-length":
            lengths.append(value)
        elif key == b"transfer-encoding":
            codings.append(value)
    return _framing(lengths, codings)


def request_framing(head: Head) -> int:
    """Body length, ``CHUNKED`` or ``NONE`` (0 bytes). Transfer-Encoding in an HTTP/1.0
    request is faulty framing (RFC 9112 §6.1): an app that ignores it there would read a
    chunked body as a second request."""
    if head.version == b"1.0" and head.get(b"transfer-encoding") is not None:
        raise BadMessage()
    chunked, length = _head_framing(head)
    if chunked:
        return CHUNKED
    return length if length else NONE


def response_framing(head: Head, method: bytes) -> int:
    return _response_framing(head.status, method, _head_framing(head))


def _response_framing(status: int, method: bytes, framing: tuple[bool, int | None]) -> int:
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return NONE
    chunked, length = framing
    if chunked:
        return CHUNKED
    if length is None:
        return TO_CLOSE
    return NONE if length == 0 else length


def response_summary(raw: bytes, method: bytes) -> tuple[int, int, bool]:
    """``(status, framing, keep-alive)`` of a response head to ``method``, checked as
    ``parse_response`` checks it, without building its field list (the relay forwards the
    head as it is and needs no more)."""
    line = _STATUS_LINE.match(raw)
    if line is None:
        raise BadMessage(502)
    start = line.end()
    if not _FIELD_LINES.fullmatch(raw, start) or raw.count(b"\n", start) > MAX_FIELDS + 1:
        raise BadMessage(502)
    lengths: list[bytes] = []
    codings: list[bytes] = []
    close = False
    for name, value in _FRAMING_FIELD.findall(raw, start - 1):  # from the status line's LF
        name = name.lower()
        if name == b"content-length":
            lengths.append(value.rstrip(b" \t"))
        elif name == b"transfer-encoding":
            codings.append(value)
        else:
            close = close or (
                value.lower().find(b"close") >= 0  # a set only when it may be
                and b"close" in {v.strip().lower() for v in value.split(b",")}
            )
    status = int(line[2])
    framing = _response_framing(status, method, _framing(lengths, codings))
    return status, framing, line[1] == b"1" and not close and framing != TO_CLOSE


def chunk_size(line: bytes) -> int:
    """The size a chunk-size line (CR LF included) announces; BadMessage if malformed."""
    found = _CHUNK_LINE.fullmatch(line)
    if found is None:
        raise BadMessage()
    return int(found[1], 16)


def check_trailer(line: bytes) -> None:
    if not _TRAILER.fullmatch(line):
        raise BadMessage()


# -- copying -------------------------------------------------------------------------------


async def _read(reader: asyncio.StreamReader, size: int, idle: float) -> bytes:
    async with asyncio.timeout(idle):
        return await reader.read(size)


async def copy_body(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    framing: int,
    read_size: int,
    idle: float,
) -> None:
    """Copy one body as it is (each read bounded by ``idle`` seconds); ConnectionError when the
    sender stops short."""
    if framing >= 0:
        left = framing
        while left:
            data = await _read(reader, min(left, read_size), idle)
            if not data:
                raise ConnectionError("body ended early")
            left -= len(data)
            writer.write(data)
            await writer.drain()
    elif framing == CHUNKED:
        await _copy_chunked(reader, writer, read_size, idle)
    elif framing == TO_CLOSE:
        while data := await _read(reader, read_size, idle):
            writer.write(data)
            await writer.drain()


async def _line(reader: asyncio.StreamReader) -> bytes:
    try:
        line = await reader.readuntil(CRLF)
    except asyncio.LimitOverrunError:
        raise BadMessage() from None
    except asyncio.IncompleteReadError:
        raise ConnectionError("body ended early") from None
    if len(line) > MAX_CHUNK_LINE:
        raise BadMessage()
    return line


async def _crlf(reader: asyncio.StreamReader) -> None:
    try:
        if await reader.readexactly(2) != CRLF:
            raise BadMessage()
    except asyncio.IncompleteReadError:
        raise ConnectionError("body ended early") from None


async def _copy_chunked(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, read_size: int, idle: float
) -> None:
    while True:
        async with asyncio.timeout(idle):
            line = await _line(reader)
        size = chunk_size(line)
        writer.write(line)
        if size == 0:
            while (trailer := await _line(reader)) != CRLF:
                check_trailer(trailer)
                writer.write(trailer)
            writer.write(CRLF)
            await writer.drain()
            return
        await copy_body(reader, writer, size, read_size, idle)
        await _crlf(reader)
        writer.write(CRLF)


async def body_chunks(
    reader: asyncio.StreamReader, framing: int, read_size: int, idle: float
) -> AsyncIterator[bytes]:
    """The body's payload (chunk framing removed), for relays that re-frame it (h2)."""
    if framing >= 0:
        left = framing
        while left:
            data = await _read(reader, min(left, read_size), idle)
            if not data:
                raise ConnectionError("body ended early")
            left -= len(data)
            yield data
    elif framing == TO_CLOSE:
        while data := await _read(reader, read_size, idle):
            yield data
    elif framing == CHUNKED:
        while True:
            async with asyncio.timeout(idle):
                line = await _line(reader)
            size = chunk_size(line)
            if size == 0:
                while (trailer := await _line(reader)) != CRLF:
                    check_trailer(trailer)  # request trailers are not relayed to h2 apps
                return
            left = size
            while left:
                data = await _read(reader, min(left, read_size), idle)
                if not data:
                    raise ConnectionError("body ended early")
                left -= len(data)
                yield data
            await _crlf(reader)
