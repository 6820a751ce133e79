"""HPACK (RFC 7541) for the HTTP/2 server side, from jh2's compiled codec, behind a structural
check of our own.

jh2 (a fork of h2) ships HPACK compiled in ``jh2._hazmat``, the module its own connection uses;
it decodes a request's header block in ~1 µs where the pure-Python ``hpack`` takes ~36 µs (more
than the proxy's whole budget per request). Its decoder bounds the decoded header list and the
dynamic table (the size our SETTINGS allow) and raises on most malformed input, but:

- a block cut inside an integer or a string makes its Rust core panic (pyo3 raises
  ``PanicException``, and Rust's panic hook writes a message to stderr, a whole backtrace when
  ``RUST_BACKTRACE`` is set: ~10 KB of log for a 10-byte frame);
- it accepts a dynamic table size update after a field (RFC 7541 §4.2 wants it first) and a
  Huffman string padded with zero bits (§5.2 wants the EOS prefix: all ones, under 8 bits).

So ``_walk`` reads the block's structure first (integers, representation kinds, string
lengths, in a few Python steps per field; a block of small indexes only skips it): what it
refuses never reaches jh2. After decoding, each Huffman string's padding is the encoded length
minus the bits of the decoded octets' codes. Every refusal is ``HpackError``, a connection
error (COMPRESSION_ERROR); a panic that still happens is one too.
"""

from __future__ import annotations

import importlib
import re
from typing import Protocol, cast

from hpack.huffman_constants import REQUEST_CODES_LENGTH

Header = tuple[bytes, bytes]


class HpackError(Exception):
    """A header block that cannot be decoded (or one too large): COMPRESSION_ERROR."""


class _Encoder(Protocol):
    header_table_size: int

    def encode(
        self, headers: list[tuple[bytes, bytes, bool]], huffman: bool | None = None
    ) -> bytes: ...


class _Decoder(Protocol):
    max_allowed_table_size: int

    def decode(self, data: bytes) -> list[tuple[bytes, bytes, bool]]: ...


class _Codec(Protocol):
    def Encoder(self) -> _Encoder: ...

    def Decoder(self, max_header_list_size: int) -> _Decoder: ...


_codec = cast(_Codec, importlib.import_module("jh2._hazmat"))  # typed here: jh2 ships no marker

_SMALL_INDEXES = re.compile(rb"[\x81-\xfe]*")  # indexed fields 1-126 only: nothing to walk
_CODE_BITS = bytes(REQUEST_CODES_LENGTH[:256])  # an octet's Huffman code length (5 to 30)
_MAX_INTEGER_SHIFT = 21  # integers below 2**28 (index, length, table size): ample for 64 KiB
HuffmanString = tuple[int, int, int, int]  # field, 0 name / 1 value, encoded length, last octet


def _integer(block: bytes, pos: int, prefix: int) -> tuple[int, int]:
    """The integer at ``pos`` with a ``prefix``-bit prefix (RFC 7541 §5.1), and where it ends."""
    if pos >= len(block):
        raise HpackError("header block cut short")
    mask = (1 << prefix) - 1
    value = block[pos] & mask
    pos += 1
    if value < mask:
        return value, pos
    shift = 0
    while pos < len(block):
        octet = block[pos]
        pos += 1
        value += (octet & 0x7F) << shift
        if not octet & 0x80:
            return value, pos
        shift += 7
        if shift > _MAX_INTEGER_SHIFT:
            raise HpackError("integer too large")
    raise HpackError("header block cut short")


def _string(block: bytes, pos: int, field: int, part: int, huffman: list[HuffmanString]) -> int:
    """Skip the string literal at ``pos`` (noting a Huffman one); where it ends."""
    encoded = pos < len(block) and block[pos] & 0x80
    length, pos = _integer(block, pos, 7)
    end = pos + length
    if end > len(block):
        raise HpackError("string beyond the header block")
    if encoded and length:
        huffman.append((field, part, length, block[end - 1]))
    return end


def _walk(block: bytes) -> list[HuffmanString]:
    """Check a header block's structure (RFC 7541 §6); its Huffman strings, to check later."""
    huffman: list[HuffmanString] = []
    pos = fields = 0
    while pos < len(block):
        first = block[pos]
        if first & 0x80:  # indexed field
            index, pos = _integer(block, pos, 7)
            if not index:
                raise HpackError("index 0")
        elif first & 0xE0 == 0x20:  # dynamic table size update
            if fields:
                raise HpackError("table size update after a field")
            _, pos = _integer(block, pos, 5)
            continue
        else:  # a literal: with incremental indexing (01), without or never indexed (000x)
            index, pos = _integer(block, pos, 6 if first & 0x40 else 4)
            if not index:
                pos = _string(block, pos, fields, 0, huffman)
            pos = _string(block, pos, fields, 1, huffman)
        fields += 1
    return huffman


def _check_padding(headers: list[Header], huffman: list[HuffmanString]) -> None:
    """Each Huffman string ends with under 8 bits, all ones (RFC 7541 §5.2)."""
    if huffman[-1][0] >= len(headers):
        raise HpackError("fewer fields decoded than the block holds")
    for field, part, length, last in huffman:
        padding = 8 * length - sum(headers[field][part].translate(_CODE_BITS))
        mask = (1 << padding) - 1 if 0 <= padding < 8 else -1
        if mask < 0 or last & mask != mask:
            raise HpackError("bad Huffman padding")


class HeaderDecoder:
    """One connection's decoding context (its dynamic table)."""

    __slots__ = ("_decoder",)

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = _codec.Decoder(max_header_list_size)

    def decode(self, block: bytes) -> list[Header]:
        if _SMALL_INDEXES.fullmatch(block):
            return self._decode(block)
        huffman = _walk(block)
        headers = self._decode(block)
        if huffman:
            _check_padding(headers, huffman)
        return headers

    def _decode(self, block: bytes) -> list[Header]:
        try:
            return [(name, value) for name, value, _ in self._decoder.decode(block)]
        except Exception as exc:  # HPACKError, OversizedHeaderListError
            raise HpackError(str(exc)) from None
        except BaseException as exc:  # pyo3's PanicException only; anything else goes on
            if type(exc).__name__ != "PanicException":
                raise
            raise HpackError("a header block that made jh2 panic") from None


class HeaderEncoder:
    """One connection's encoding context; ``table_size`` follows the peer's setting."""

    __slots__ = ("_encoder",)

    def __init__(self) -> None:
        self._encoder = _codec.Encoder()

    def set_table_size(self, size: int) -> None:
        self._encoder.header_table_size = size

    def encode(self, headers: list[Header]) -> bytes:
        return self._encoder.encode([(name, value, False) for name, value in headers])
