"""Framing: round trips, bounds, and resynchronisation after damage."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from embervm.guest.agent import protocol
from embervm.guest.agent.protocol import (
    MAX_BODY,
    PREFIX_SIZE,
    Decoder,
    ProtocolError,
    encode,
    get_argv,
    get_env,
    get_int,
)


def test_frames_round_trip_even_byte_by_byte() -> None:
    raw = encode({"op": "a", "id": 1}, b"body") + encode({"op": "b"})
    dec = Decoder()
    frames = [f for i in range(len(raw)) for f in dec.feed(raw[i : i + 1])]
    assert [(f.op, f.body) for f in frames] == [("a", b"body"), ("b", b"")]
    assert dec.discarded == 0


def test_encode_refuses_oversized_body_and_missing_op() -> None:
    with pytest.raises(ProtocolError):
        encode({"op": "x"}, b"x" * (MAX_BODY + 1))
    with pytest.raises(ProtocolError):
        encode({"id": 1})


def test_lying_length_is_skipped_and_stream_resyncs() -> None:
    liar = struct.pack(">4sBBHIII", b"EMBV", 1, 0, 0, 10, 2**31, 0)
    frames = Decoder().feed(liar + encode({"op": "ok"}))
    assert [f.op for f in frames] == ["ok"]


def test_corrupted_frame_is_dropped_but_next_survives() -> None:
    bad = bytearray(encode({"op": "bad"}, b"zzzz"))
    bad[-2] ^= 1
    dec = Decoder()
    frames = dec.feed(bytes(bad) + encode({"op": "good"}))
    assert [f.op for f in frames] == ["good"]
    assert dec.discarded > 0


def test_non_object_header_is_dropped() -> None:
    raw = encode({"op": "x"})
    tampered = raw.replace(b'{"op":"x"}', b"[1,2,3,4,5]")[: len(raw)]
    assert Decoder().feed(tampered + encode({"op": "y"}))[-1].op == "y"


def test_deeply_nested_json_does_not_crash_the_decoder() -> None:
    header = b"[" * 50000 + b"]" * 50000
    import zlib

    prefix = struct.pack(">4sBBHIII", b"EMBV", 1, 0, 0, len(header), 0, zlib.crc32(header))
    assert [f.op for f in Decoder().feed(prefix + header + encode({"op": "z"}))] == ["z"]


def test_validators_reject_wrong_types() -> None:
    with pytest.raises(ProtocolError):
        get_int({"n": True}, "n", lo=0, hi=5)
    with pytest.raises(ProtocolError):
        get_int({"n": 6}, "n", lo=0, hi=5)
    with pytest.raises(ProtocolError):
        get_argv({"argv": ["ok", 3]})
    with pytest.raises(ProtocolError):
        get_argv({"argv": []})
    with pytest.raises(ProtocolError):
        get_env({"env": {"A=B": "c"}})
    assert get_env({"env": None}) == {}


def _lying_prefix() -> bytes:
    """A frame prefix claiming the largest header and body, with a CRC that never matches."""
    return struct.pack(">4sBBHIII", b"EMBV", 1, 0, 0, 64 * 1024, MAX_BODY, 0)


def test_bad_candidates_cost_a_bounded_amount_of_hashing(monkeypatch: pytest.MonkeyPatch) -> None:
    # A1: each 20-byte lying prefix used to cost two copies and a CRC over 1.1 MiB.
    hashed = [0]
    real_crc32 = protocol.zlib.crc32

    def counting_crc32(data: Any, value: int = 0) -> int:
        hashed[0] += len(data)
        return real_crc32(data, value)

    monkeypatch.setattr(protocol.zlib, "crc32", counting_crc32)
    dec = Decoder()
    with pytest.raises(ProtocolError, match="out of sync"):
        dec.feed(_lying_prefix() * 60_000)
    assert hashed[0] <= protocol.RESYNC_BUDGET + PREFIX_SIZE + 64 * 1024 + MAX_BODY


def test_garbage_beyond_the_budget_ends_the_stream() -> None:
    with pytest.raises(ProtocolError, match="out of sync"):
        Decoder(resync_budget=1000).feed(b"x" * 2000)


def test_a_strict_decoder_refuses_the_first_damaged_frame() -> None:
    bad = bytearray(encode({"op": "bad"}, b"zzzz"))
    bad[-2] ^= 1
    dec = Decoder()
    assert [f.op for f in dec.feed(b"junk" + encode({"op": "ok"}))] == ["ok"]
    dec.require_clean_stream()
    with pytest.raises(ProtocolError, match="out of sync"):
        dec.feed(bytes(bad))
