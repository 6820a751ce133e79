"""The fleet tunnel's preamble and answers (embervm.tunnel_wire): a round trip, every field
malformed, oversize, a wrong key, stale and future timestamps, replays, a full replay cache,
and random bytes, which give a refusal and never an exception."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from embervm.contracts import MICROVM_ID_RE
from embervm.tunnel_wire import (
    MAX_ANSWER,
    MAX_PREAMBLE,
    TAG,
    WINDOW,
    Answer,
    Preamble,
    PreambleVerifier,
    Refusal,
    ReplayCache,
    encode_preamble,
    new_preamble,
    parse_answer,
    parse_preamble,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
VM = "mvm-0123456789abcdef0123"
NOW = 1_800_000_000
NONCE = bytes(range(16))


def verifier(now: float = NOW, **kwargs: int) -> PreambleVerifier:
    return PreambleVerifier(KEY, clock=lambda: now, **kwargs)


def signed(*fields: bytes, key: bytes = KEY, end: bytes = b"\n") -> bytes:
    """A line of ``fields`` (after the tag) with a correct MAC, whatever the fields are: what
    it is refused for is then its shape, never its MAC."""
    body = b" ".join([TAG, *fields]) + b" "
    return body + hmac.new(key, body, hashlib.sha256).hexdigest().encode() + end


GOOD_FIELDS = (VM.encode(), b"8080", str(NOW).encode(), NONCE.hex().encode())


def test_a_preamble_round_trips() -> None:
    line = encode_preamble(KEY, VM, 8080, timestamp=NOW, nonce=NONCE)
    assert line == signed(*GOOD_FIELDS)  # the documented layout, byte for byte
    expected = Preamble(VM, 8080, NOW, NONCE)
    assert parse_preamble(line) == expected
    assert verifier().verify(line) == expected


def test_new_preamble_uses_the_clock_and_a_fresh_nonce() -> None:
    one, two = new_preamble(KEY, VM, 1), new_preamble(KEY, VM, 1)
    assert one != two
    checker = PreambleVerifier(KEY)  # the real clock
    assert isinstance(checker.verify(one), Preamble)
    assert isinstance(checker.verify(two), Preamble)


def test_the_longest_preamble_fits_well_within_the_bound() -> None:
    line = encode_preamble(KEY, VM, 65535, timestamp=10**12 - 1, nonce=NONCE)
    assert len(line) == 159 <= MAX_PREAMBLE
    assert parse_preamble(line) == Preamble(VM, 65535, 10**12 - 1, NONCE)
    assert parse_preamble(encode_preamble(KEY, VM, 1, timestamp=NOW, nonce=NONCE)) == Preamble(
        VM, 1, NOW, NONCE
    )


BAD_FIELDS = {
    # the MicroVM id
    "id upper-case": (VM.upper().replace("MVM", "mvm").encode(), *GOOD_FIELDS[1:]),
    "id short": (VM[:-1].encode(), *GOOD_FIELDS[1:]),
    "id long": (VM.encode() + b"0", *GOOD_FIELDS[1:]),
    "id prefix": (b"abc-" + VM[4:].encode(), *GOOD_FIELDS[1:]),
    "id empty": (b"", *GOOD_FIELDS[1:]),
    "id non-ascii": (VM[:-1].encode() + "é".encode(), *GOOD_FIELDS[1:]),
    # the port
    "port 0": (GOOD_FIELDS[0], b"0", *GOOD_FIELDS[2:]),
    "port 65536": (GOOD_FIELDS[0], b"65536", *GOOD_FIELDS[2:]),
    "port 99999": (GOOD_FIELDS[0], b"99999", *GOOD_FIELDS[2:]),
    "port 6 digits": (GOOD_FIELDS[0], b"100000", *GOOD_FIELDS[2:]),
    "port leading zero": (GOOD_FIELDS[0], b"08080", *GOOD_FIELDS[2:]),
    "port sign": (GOOD_FIELDS[0], b"+8080", *GOOD_FIELDS[2:]),
    "port negative": (GOOD_FIELDS[0], b"-1", *GOOD_FIELDS[2:]),
    "port hex": (GOOD_FIELDS[0], b"0x50", *GOOD_FIELDS[2:]),
    "port unicode digit": (GOOD_FIELDS[0], "٨٠".encode(), *GOOD_FIELDS[2:]),
    "port empty": (GOOD_FIELDS[0], b"", *GOOD_FIELDS[2:]),
    # the timestamp
    "timestamp leading zero": (*GOOD_FIELDS[:2], b"0" + str(NOW).encode(), GOOD_FIELDS[3]),
    "timestamp zero": (*GOOD_FIELDS[:2], b"0", GOOD_FIELDS[3]),
    "timestamp 13 digits": (*GOOD_FIELDS[:2], b"1" * 13, GOOD_FIELDS[3]),
    "timestamp fraction": (*GOOD_FIELDS[:2], str(NOW).encode() + b".5", GOOD_FIELDS[3]),
    "timestamp negative": (*GOOD_FIELDS[:2], b"-" + str(NOW).encode(), GOOD_FIELDS[3]),
    "timestamp empty": (*GOOD_FIELDS[:2], b"", GOOD_FIELDS[3]),
    # the nonce
    "nonce short": (*GOOD_FIELDS[:3], NONCE.hex()[:-1].encode()),
    "nonce long": (*GOOD_FIELDS[:3], NONCE.hex().encode() + b"0"),
    "nonce upper-case": (*GOOD_FIELDS[:3], NONCE.hex().upper().encode()),
    "nonce not hex": (*GOOD_FIELDS[:3], b"g" * 32),
    # the number of fields
    "a field missing": GOOD_FIELDS[:3],
    "a field more": (*GOOD_FIELDS, b"x"),
    "two spaces": (GOOD_FIELDS[0], b"", *GOOD_FIELDS[1:]),
}


@pytest.mark.parametrize("fields", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_every_malformed_field_is_refused(fields: tuple[bytes, ...]) -> None:
    assert verifier().verify(signed(*GOOD_FIELDS)) == Preamble(VM, 8080, NOW, NONCE)  # control
    line = signed(*fields)
    assert parse_preamble(line) is Refusal.MALFORMED
    assert verifier().verify(line) is Refusal.MALFORMED


GOOD = signed(*GOOD_FIELDS)
BAD_LINES = {
    "other version": GOOD.replace(b"EMBERVM-TUNNEL/1", b"EMBERVM-TUNNEL/2"),
    "tag lower-case": GOOD.replace(b"EMBERVM-TUNNEL", b"embervm-tunnel"),
    "no tag": GOOD[len(TAG) + 1 :],
    "CR LF": GOOD[:-1] + b"\r\n",
    "no LF": GOOD[:-1],
    "bytes after the LF": GOOD + b"x",
    "two lines": GOOD + GOOD,
    "tab": GOOD.replace(b" ", b"\t", 1),
    "leading space": b" " + GOOD,
    "trailing space": GOOD[:-1] + b" \n",
    "MAC upper-case": GOOD[:-65] + GOOD[-65:-1].upper() + b"\n",
    "MAC short": GOOD[:-2] + b"\n",
    "MAC long": GOOD[:-1] + b"0\n",
    "empty": b"",
    "LF only": b"\n",
    "NUL": GOOD.replace(b" ", b"\0", 1),
    "oversize": GOOD[:-1] + b" " * (MAX_PREAMBLE - len(GOOD) + 1) + b"\n",
    "HTTP": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
}


@pytest.mark.parametrize("line", BAD_LINES.values(), ids=BAD_LINES.keys())
def test_malformed_lines_are_refused(line: bytes) -> None:
    assert parse_preamble(line) is Refusal.MALFORMED
    assert verifier().verify(line) is Refusal.MALFORMED


def test_a_line_at_the_bound_is_read_and_one_byte_more_is_not() -> None:
    assert len(BAD_LINES["oversize"]) == MAX_PREAMBLE + 1
    assert len(BAD_LINES["oversize"][1:]) == MAX_PREAMBLE
    # a 512-byte line is judged on its fields (it has too many), not turned away for its size
    assert parse_preamble(BAD_LINES["oversize"][1:]) is Refusal.MALFORMED


def test_non_bytes_are_refused_not_raised() -> None:
    assert parse_preamble(GOOD.decode()) is Refusal.MALFORMED  # type: ignore[arg-type]
    assert verifier().verify(bytearray(GOOD)) is Refusal.MALFORMED  # type: ignore[arg-type]
    assert parse_answer("OK\n") is None  # type: ignore[arg-type]


def test_a_wrong_key_or_a_changed_byte_fails_the_mac() -> None:
    assert verifier().verify(signed(*GOOD_FIELDS, key=OTHER_KEY)) is Refusal.BAD_MAC
    changed_port = GOOD.replace(b" 8080 ", b" 8081 ")
    assert parse_preamble(changed_port) == Preamble(VM, 8081, NOW, NONCE)  # well formed
    assert verifier().verify(changed_port) is Refusal.BAD_MAC
    last = GOOD[-2:-1]
    flipped = GOOD[:-2] + (b"1" if last == b"0" else b"0") + b"\n"
    assert verifier().verify(flipped) is Refusal.BAD_MAC


@pytest.mark.parametrize(
    ("skew", "accepted"),
    [
        (0, True),
        (WINDOW, True),
        (-WINDOW, True),
        (WINDOW + 1, False),
        (-WINDOW - 1, False),
        (10**6, False),
        (-(10**6), False),
    ],
)
def test_timestamps_must_be_within_the_window(skew: int, accepted: bool) -> None:
    line = encode_preamble(KEY, VM, 8080, timestamp=NOW + skew, nonce=NONCE)
    result = verifier(now=NOW).verify(line)
    assert isinstance(result, Preamble) if accepted else result is Refusal.STALE


def test_a_replayed_preamble_is_refused() -> None:
    checker = verifier()
    assert isinstance(checker.verify(GOOD), Preamble)
    assert checker.verify(GOOD) is Refusal.REPLAY
    # the same nonce on another port, properly signed, is a replay too
    again = encode_preamble(KEY, VM, 22, timestamp=NOW, nonce=NONCE)
    assert checker.verify(again) is Refusal.REPLAY
    assert isinstance(checker.verify(new_line(nonce=b"\1" * 16)), Preamble)


def new_line(*, nonce: bytes, timestamp: int = NOW) -> bytes:
    return encode_preamble(KEY, VM, 8080, timestamp=timestamp, nonce=nonce)


def test_only_authenticated_nonces_enter_the_cache() -> None:
    checker = verifier()
    for n in range(50):
        forged = encode_preamble(OTHER_KEY, VM, 8080, timestamp=NOW, nonce=bytes([n]) * 16)
        assert checker.verify(forged) is Refusal.BAD_MAC
        assert checker.verify(new_line(nonce=bytes([n]) * 16, timestamp=NOW - 99)) is (
            Refusal.STALE
        )
    assert len(checker.replays) == 0


def test_a_full_replay_cache_refuses_rather_than_grows() -> None:
    now = [float(NOW)]
    checker = PreambleVerifier(KEY, replay_capacity=3, clock=lambda: now[0])
    for n in range(3):
        assert isinstance(checker.verify(new_line(nonce=bytes([n]) * 16)), Preamble)
    assert checker.verify(new_line(nonce=b"\7" * 16)) is Refusal.BUSY
    assert len(checker.replays) == 3
    # once the first three are out of the window they are forgotten and room comes back
    now[0] = NOW + WINDOW + 1
    fresh = new_line(nonce=b"\7" * 16, timestamp=NOW + WINDOW)
    assert isinstance(checker.verify(fresh), Preamble)
    assert len(checker.replays) == 1


def test_the_replay_cache_keeps_a_nonce_as_long_as_its_timestamp_is_in_the_window() -> None:
    cache = ReplayCache(capacity=10, window=WINDOW)
    assert cache.admit(b"a", NOW + WINDOW, NOW) is None  # from a clock 30 s ahead
    assert cache.admit(b"a", NOW + WINDOW, NOW + 2 * WINDOW) is Refusal.REPLAY  # still valid
    assert cache.admit(b"b", NOW + 2 * WINDOW + 1, NOW + 2 * WINDOW + 1) is None
    assert len(cache) == 1  # "a" expired at NOW + 2 * WINDOW
    with pytest.raises(ValueError, match="at least one"):
        ReplayCache(capacity=0)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((b"short", VM, 80), {}),
        (("k" * 32, VM, 80), {}),  # a str key
        ((KEY, "mvm-x", 80), {}),
        ((KEY, VM + "\n", 80), {}),
        ((KEY, VM, 0), {}),
        ((KEY, VM, 65536), {}),
        ((KEY, VM, True), {}),
        ((KEY, VM, 80), {"timestamp": 0}),
        ((KEY, VM, 80), {"timestamp": 10**12}),
        ((KEY, VM, 80), {"nonce": b"x" * 15}),
    ],
)
def test_encode_refuses_what_the_format_cannot_carry(
    args: tuple[object, ...], kwargs: dict[str, object]
) -> None:
    values: dict[str, object] = {"timestamp": NOW, "nonce": NONCE, **kwargs}
    with pytest.raises(ValueError):  # noqa: PT011
        encode_preamble(*args, **values)  # type: ignore[arg-type]


def test_the_verifier_wants_a_real_key() -> None:
    with pytest.raises(ValueError, match="32 random bytes"):
        PreambleVerifier(b"x" * 31)


def test_answers() -> None:
    for answer in Answer:
        assert answer.line.endswith(b"\n")
        assert len(answer.line) <= MAX_ANSWER
        assert parse_answer(answer.line) is answer
    for line in (b"OK", b"ok\n", b"OK\r\n", b" OK\n", b"OK\n\n", b"", b"NOT HERE\n"):
        assert parse_answer(line) is None


def test_the_id_rule_is_the_contracts_one() -> None:
    assert MICROVM_ID_RE.fullmatch(VM)
    other = "mvm-" + "a" * 20
    assert parse_preamble(signed(other.encode(), *GOOD_FIELDS[1:])) == Preamble(
        other, 8080, NOW, NONCE
    )


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2 * MAX_PREAMBLE))
def test_random_bytes_give_a_refusal_never_an_exception(data: bytes) -> None:
    assert isinstance(verifier().verify(data), Refusal)
    assert isinstance(parse_preamble(data), Refusal)
    assert parse_answer(data) is None or data in {a.line for a in Answer}


@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, len(GOOD) - 1), st.integers(0, 255)), min_size=1, max_size=4)
)
def test_a_valid_line_with_bytes_changed_is_refused_or_unchanged(
    changes: list[tuple[int, int]],
) -> None:
    line = bytearray(GOOD)
    for where, byte in changes:
        line[where] = byte
    result = verifier().verify(bytes(line))
    if bytes(line) == GOOD:
        assert result == Preamble(VM, 8080, NOW, NONCE)
    else:
        assert isinstance(result, Refusal)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=40), min_size=5, max_size=7))
def test_random_fields_behind_the_tag_are_refused_not_raised(fields: list[bytes]) -> None:
    line = b" ".join([TAG, *fields]) + b"\n"
    result = verifier().verify(line)
    assert isinstance(result, Refusal)
    result = verifier().verify(signed(*fields[:4]))  # correctly signed, random shape
    assert isinstance(result, Refusal | Preamble)
