"""Framing of the Embervm agent protocol (shared by the guest agent and the host client).

Stdlib only: this file runs inside the guest. See ``docs/GUEST_PROTOCOL.md``.

A frame is a fixed 20-byte prefix, a JSON header and an opaque binary body::

    magic "EMBV" | version u8 | flags u8 | reserved u16 | header_len u32 | body_len u32 | crc32 u32
    header: UTF-8 JSON object with at least "op" (str)
    body:   raw bytes (command output, terminal bytes, file contents, stdin, entropy)

``crc32`` covers header and body. A reader that meets anything else (a torn frame after a
reconnect, garbage, a lying length) skips to the next magic and counts the loss: the stream is
self-synchronising, so neither side ever trusts a length it has not checked. What a reader
skips or checks in vain is budgeted (``RESYNC_BUDGET``): a peer that spends it loses the stream.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"EMBV"
FRAME_VERSION = 1
#: Message-level protocol versions this code speaks; negotiated by ``hello``.
PROTOCOL_VERSIONS = (1,)
_PREFIX = struct.Struct(">4sBBHIII")
PREFIX_SIZE = _PREFIX.size

MAX_HEADER = 64 * 1024
MAX_BODY = 1024 * 1024
#: Payload size senders use for streamed data (output, file chunks), well under MAX_BODY.
CHUNK = 256 * 1024


class ProtocolError(Exception):
    """A frame or message is malformed (raised by ``encode``/``check_*``; readers resync)."""


@dataclass
class Frame:
    """One decoded message: its JSON header and binary body."""

    header: dict[str, Any]
    body: bytes = b""

    @property
    def op(self) -> str:
        return str(self.header["op"])


def encode(header: dict[str, Any], body: bytes = b"") -> bytes:
    """Serialise one frame, refusing anything the peer would have to reject."""
    if not isinstance(header.get("op"), str):
        raise ProtocolError("header needs a string 'op'")
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(raw) > MAX_HEADER:
        raise ProtocolError(f"header of {len(raw)} bytes exceeds {MAX_HEADER}")
    if len(body) > MAX_BODY:
        raise ProtocolError(f"body of {len(body)} bytes exceeds {MAX_BODY}")
    crc = zlib.crc32(body, zlib.crc32(raw))
    return _PREFIX.pack(MAGIC, FRAME_VERSION, 0, 0, len(raw), len(body), crc) + raw + body


#: Bytes a decoder may skip or check in vain (garbage plus candidate frames whose CRC failed)
#: before it gives the stream up. Each byte costs at most one CRC pass, so this bounds the CPU a
#: peer can make the reader spend on frames it never delivers.
RESYNC_BUDGET = 4 * 1024 * 1024


@dataclass
class Decoder:
    """Incremental, self-resynchronising frame decoder.

    Feed it bytes as they arrive; it yields complete, checksummed frames whose header is a JSON
    object with a string ``op``. Everything else is skipped and counted in ``discarded``; bytes
    skipped plus bytes checksummed in vain are charged to ``resync_budget`` (``None``: no limit,
    for a peer that is trusted), and a stream that spends it raises ``ProtocolError``. Once the
    stream is known to be in sync, ``require_clean_stream`` makes the first bad byte fatal.
    """

    max_header: int = MAX_HEADER
    max_body: int = MAX_BODY
    resync_budget: int | None = RESYNC_BUDGET
    discarded: int = 0
    wasted: int = 0
    _buf: bytearray = field(default_factory=bytearray)

    def reset(self) -> None:
        """Forget buffered bytes (a new connection starts a new stream)."""
        self._buf.clear()

    def require_clean_stream(self) -> None:
        """From now on, any skipped byte or failed checksum ends the stream."""
        self.resync_budget = self.wasted

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames: list[Frame] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _charge(self, n: int) -> None:
        self.wasted += n
        if self.resync_budget is not None and self.wasted > self.resync_budget:
            self._buf.clear()
            raise ProtocolError(
                f"stream out of sync: {self.wasted} bytes skipped or failing their checksum"
            )

    def _skip(self, n: int) -> None:
        del self._buf[:n]
        self.discarded += n
        self._charge(n)

    def _next(self) -> Frame | None:
        buf = self._buf
        while True:
            start = buf.find(MAGIC)
            if start < 0:
                # Keep a possible partial magic at the end, drop the rest.
                keep = next((k for k in (3, 2, 1) if buf.endswith(MAGIC[:k])), 0)
                self._skip(len(buf) - keep)
                return None
            if start:
                self._skip(start)
            if len(buf) < PREFIX_SIZE:
                return None
            _, version, _flags, _res, hlen, blen, crc = _PREFIX.unpack_from(buf)
            if (
                version != FRAME_VERSION
                or hlen == 0
                or hlen > self.max_header
                or blen > self.max_body
            ):
                self._skip(len(MAGIC))  # the magic cannot overlap itself
                continue
            total = PREFIX_SIZE + hlen + blen
            if len(buf) < total:
                return None
            with memoryview(buf) as view:  # checksum in place: nothing copied before it matches
                ok = (
                    zlib.crc32(
                        view[PREFIX_SIZE + hlen : total],
                        zlib.crc32(view[PREFIX_SIZE : PREFIX_SIZE + hlen]),
                    )
                    == crc
                )
            if not ok:
                self._charge(hlen + blen)
                self._skip(len(MAGIC))
                continue
            raw = bytes(buf[PREFIX_SIZE : PREFIX_SIZE + hlen])
            body = bytes(buf[PREFIX_SIZE + hlen : total])
            try:
                header = json.loads(raw)
            except (UnicodeDecodeError, ValueError, RecursionError):
                header = None
            if not isinstance(header, dict) or not isinstance(header.get("op"), str):
                self._skip(total)
                continue
            del buf[:total]
            return Frame(header, body)


# --- validation helpers: every field read from the peer goes through one of these ----------


def get_int(h: dict[str, Any], key: str, *, lo: int, hi: int, default: int | None = None) -> int:
    v = h.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ProtocolError(f"{key!r} must be an integer in [{lo}, {hi}]")
    return v


def get_opt_int(h: dict[str, Any], key: str, *, lo: int, hi: int) -> int | None:
    return None if h.get(key) is None else get_int(h, key, lo=lo, hi=hi)


def get_num(h: dict[str, Any], key: str, *, lo: float, hi: float) -> float | None:
    v = h.get(key)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
        raise ProtocolError(f"{key!r} must be a number in [{lo}, {hi}]")
    return float(v)


def get_str(h: dict[str, Any], key: str, *, max_len: int = 4096, default: str | None = None) -> str:
    v = h.get(key, default)
    if not isinstance(v, str) or len(v) > max_len or "\0" in v:
        raise ProtocolError(f"{key!r} must be a string of at most {max_len} characters")
    return v


def get_opt_str(h: dict[str, Any], key: str, *, max_len: int = 4096) -> str | None:
    return None if h.get(key) is None else get_str(h, key, max_len=max_len)


def get_argv(h: dict[str, Any], key: str = "argv", *, required: bool = True) -> list[str] | None:
    v = h.get(key)
    if v is None and not required:
        return None
    if (
        not isinstance(v, list)
        or not 1 <= len(v) <= 4096
        or not all(isinstance(a, str) and "\0" not in a and len(a) <= 131072 for a in v)
    ):
        raise ProtocolError(f"{key!r} must be a non-empty list of strings")
    return list(v)


def get_env(h: dict[str, Any], key: str = "env") -> dict[str, str]:
    v = h.get(key) or {}
    if not isinstance(v, dict) or len(v) > 4096:
        raise ProtocolError(f"{key!r} must be an object of strings")
    for k, val in v.items():
        if (
            not isinstance(k, str)
            or not isinstance(val, str)
            or not k
            or "=" in k
            or "\0" in k
            or "\0" in val
            or len(k) + len(val) > 131072
        ):
            raise ProtocolError(f"{key!r} has a bad entry")
    return dict(v)
