"""Framing: round trips, bounds, and resynchronisation after damage."""

from __future__ import annotations

import struct

import pytest

from embervm.guest.agent.protocol import (
    MAX_BODY,
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
