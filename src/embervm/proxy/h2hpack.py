"""HPACK (RFC 7541) for the HTTP/2 server side, from jh2's compiled codec.

jh2 (a fork of h2) ships HPACK compiled in ``jh2._hazmat``, the module its own connection uses;
it decodes a request's header block in ~1 µs where the pure-Python ``hpack`` takes ~36 µs (more
than the proxy's whole budget per request). Its decoder bounds the decoded header list and the
dynamic table (the size our SETTINGS allow); on malformed input it raises, and on some inputs
its Rust core panics, which pyo3 raises as ``PanicException`` (a BaseException, with a line on
stderr from Rust's panic hook): every one of these becomes ``HpackError``, a connection error.
"""

from __future__ import annotations

import importlib
from typing import Protocol, cast

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


class HeaderDecoder:
    """One connection's decoding context (its dynamic table)."""

    __slots__ = ("_decoder",)

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = _codec.Decoder(max_header_list_size)

    def decode(self, block: bytes) -> list[Header]:
        try:
            return [(name, value) for name, value, _ in self._decoder.decode(block)]
        except Exception as exc:  # HPACKError, OversizedHeaderListError
            raise HpackError(str(exc)) from None
        except BaseException as exc:  # pyo3's PanicException only; anything else goes on
            if type(exc).__name__ != "PanicException":
                raise
            raise HpackError("malformed header block") from None


class HeaderEncoder:
    """One connection's encoding context; ``table_size`` follows the peer's setting."""

    __slots__ = ("_encoder",)

    def __init__(self) -> None:
        self._encoder = _codec.Encoder()

    def set_table_size(self, size: int) -> None:
        self._encoder.header_table_size = size

    def encode(self, headers: list[Header]) -> bytes:
        return self._encoder.encode([(name, value, False) for name, value in headers])
