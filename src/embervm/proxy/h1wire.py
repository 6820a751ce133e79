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

MAX_FIELDS = 128
MAX_CHUNK_LINE = 4096
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"[\x21-\x7e]+")
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
CRLF = b"\r\n"
HEAD_END = b"\r\n\r\n"


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


def _fields(lines: list[bytes]) -> Fields:
    if len(lines) > MAX_FIELDS:
        raise BadMessage(431)
    fields: Fields = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):  # also refuses obs-fold and "name :"
            raise BadMessage()
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise BadMessage()
        fields.append((name.lower(), value))
    return fields


def _version(text: bytes) -> bytes:
    if text == b"HTTP/1.1":
        return b"1.1"
    if text == b"HTTP/1.0":
        return b"1.0"
    raise BadMessage(505 if text.startswith(b"HTTP/") else 400)


def parse_request(raw: bytes) -> Head:
    lines = raw[: -len(HEAD_END)].split(CRLF)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]) or not _TARGET.fullmatch(parts[1]):
        raise BadMessage()
    return Head(lines[0], _version(parts[2]), _fields(lines[1:]), method=parts[0],
                target=parts[1])  # fmt: skip


def parse_response(raw: bytes) -> Head:
    lines = raw[: -len(HEAD_END)].split(CRLF)
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or len(parts[1]) != 3 or not parts[1].isdigit():
        raise BadMessage(502)
    return Head(lines[0], _version(parts[0]), _fields(lines[1:]), status=int(parts[1]))


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


# -- framing -------------------------------------------------------------------------------

NONE = -1  # no body
CHUNKED = -2
TO_CLOSE = -3  # a response that ends when the app closes the connection


def _content_length(head: Head) -> int | None:
    values = {v.strip() for key, raw in head.fields if key == b"content-length"
              for v in raw.split(b",")}  # fmt: skip
    if not values:
        return None
    if len(values) != 1:
        raise BadMessage()
    value = values.pop()
    if not value.isdigit() or len(value) > 18:
        raise BadMessage()
    return int(value)


def _chunked(head: Head) -> bool:
    codings = [c for c in head.tokens(b"transfer-encoding") if c]
    if not codings:
        return False
    if codings != [b"chunked"] or head.get(b"content-length") is not None:
        raise BadMessage()
    return True


def request_framing(head: Head) -> int:
    """Body length, ``CHUNKED`` or ``NONE`` (0 bytes)."""
    if _chunked(head):
        return CHUNKED
    length = _content_length(head)
    return length if length else NONE


def response_framing(head: Head, method: bytes) -> int:
    if method == b"HEAD" or head.status < 200 or head.status in (204, 304):
        return NONE
    if _chunked(head):
        return CHUNKED
    length = _content_length(head)
    if length is None:
        return TO_CLOSE
    return NONE if length == 0 else length


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
        size_text = line[:-2].split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_text):
            raise BadMessage()
        size = int(size_text, 16)
        writer.write(line)
        if size == 0:
            while (trailer := await _line(reader)) != CRLF:
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
            size_text = line[:-2].split(b";", 1)[0].strip()
            if not _HEX.fullmatch(size_text):
                raise BadMessage()
            size = int(size_text, 16)
            if size == 0:
                while await _line(reader) != CRLF:
                    pass  # request trailers are not relayed to h2 apps
                return
            left = size
            while left:
                data = await _read(reader, min(left, read_size), idle)
                if not data:
                    raise ConnectionError("body ended early")
                left -= len(data)
                yield data
            await _crlf(reader)
