"""The fleet tunnel's wire format: how an endpoint proxy asks a host for a guest's port.

In a fleet the proxy (``--role proxy``) and the VMs (``--role host``) run on different
machines. The proxy dials the host's tunnel listener (``--advertise ADDR:PORT``) and opens the
connection with one preamble line; the host answers with one line; after ``OK`` the connection
carries raw bytes both ways, between the proxy and the guest's port. The host has the final
word on where a VM runs: ``NOT_HERE`` sends the proxy back to the store. Endpoint tokens are
checked at the proxy; this line only proves that the dialer holds the fleet's shared key.

The preamble, ASCII, fields separated by one space, ended by one LF (no CR), at most
``MAX_PREAMBLE`` (512) bytes with the LF — version 1 uses at most 159::

    EMBERVM-TUNNEL/1 <microvm id> <port> <timestamp> <nonce> <mac>\\n

- ``EMBERVM-TUNNEL/1``: the protocol tag and version, byte for byte;
- the MicroVM id, as ``embervm.contracts.MICROVM_ID_RE`` has it (``mvm-`` + 20 lowercase hex);
- the guest's port, decimal 1 to 65535, no leading zero;
- the dialer's clock, whole seconds since the Unix epoch, decimal, 1 to 12 digits, no leading
  zero;
- a random nonce, 16 bytes as 32 lowercase hex digits;
- HMAC-SHA256 with the fleet's key over every byte of the line before it (the tag and the
  space after the nonce included), 64 lowercase hex digits.

Anything else is refused: another tag or version, a field too long or short, upper-case hex,
``+``/``-`` signs, leading zeros, tabs, two spaces, CR, non-ASCII bytes, bytes after the LF.
The checks run in this order: the shape, the MAC (``hmac.compare_digest``), the timestamp
(within ``WINDOW`` = ±30 s of the host's clock), the nonce (not seen within the window:
``ReplayCache``). Only a line that passed the MAC can put a nonce in the cache, so a peer
without the key cannot fill it; when it is full (``capacity`` nonces within the window) a
preamble is refused rather than the cache grown.

The answer, one line from the host, at most ``MAX_ANSWER`` bytes with the LF: ``OK``,
``NOT_HERE`` (no such VM running on this host: re-resolve), ``REFUSED`` (a bad preamble: shape,
key, clock or replay, never said which) or ``UNREACHABLE`` (the VM is here but its port did not
accept a connection). After any answer but ``OK`` the host closes the connection. The answer
carries no MAC: the connection is not encrypted either (docs/SECURITY.md, "Fleet tunnel").

Parsing is total: any bytes given to ``parse_preamble``, ``PreambleVerifier.verify`` or
``parse_answer`` give a value (a ``Refusal`` or None for what is not valid), never an exception.
"""

from __future__ import annotations

import enum
import hashlib
import heapq
import hmac
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from embervm.contracts import MICROVM_ID_RE

TAG = b"EMBERVM-TUNNEL/1"
MAX_PREAMBLE = 512  # bytes, the LF included: what a listener reads before it gives up
MAX_ANSWER = 16  # bytes, the LF included ("UNREACHABLE\n" is 12)
WINDOW = 30  # seconds: how far a preamble's timestamp may be from the host's clock
NONCE_BYTES = 16
MIN_KEY_BYTES = 32  # the fleet key: random bytes, as many as the MAC's output
REPLAY_CAPACITY = 100_000  # nonces held at once (~15 MB): ~1 600 new tunnels/s for 60 s

_MAC_HEX = 2 * hashlib.sha256().digest_size  # 64
_PORT = re.compile(rb"[1-9][0-9]{0,4}")
_TIMESTAMP = re.compile(rb"[1-9][0-9]{0,11}")
_NONCE = re.compile(rb"[0-9a-f]{%d}" % (2 * NONCE_BYTES))
_MAC = re.compile(rb"[0-9a-f]{%d}" % _MAC_HEX)


class Refusal(enum.Enum):
    """Why a preamble was refused (for the host's log; the dialer only hears ``REFUSED``)."""

    MALFORMED = "malformed preamble"
    BAD_MAC = "bad MAC (another fleet's key?)"
    STALE = "timestamp outside the window (clock skew or a replay)"
    REPLAY = "nonce seen before (a replay)"
    BUSY = "replay cache full"


class Answer(enum.Enum):
    """The host's answer to a preamble; ``.line`` is what goes on the wire."""

    OK = "OK"
    NOT_HERE = "NOT_HERE"
    REFUSED = "REFUSED"
    UNREACHABLE = "UNREACHABLE"

    @property
    def line(self) -> bytes:
        return self.value.encode("ascii") + b"\n"


_ANSWERS = {answer.line: answer for answer in Answer}


@dataclass(frozen=True)
class Preamble:
    """A well-formed preamble's fields (its MAC not yet checked, if ``parse_preamble`` made
    it; checked, if ``PreambleVerifier.verify`` did)."""

    microvm_id: str
    port: int
    timestamp: int
    nonce: bytes


def check_key(key: bytes) -> bytes:
    """``key`` if it can be a fleet key (bytes, at least ``MIN_KEY_BYTES``); else ValueError."""
    if not isinstance(key, bytes) or len(key) < MIN_KEY_BYTES:
        raise ValueError(f"a fleet tunnel key is at least {MIN_KEY_BYTES} random bytes")
    return key


def _mac(key: bytes, signed: bytes) -> bytes:
    return hmac.new(key, signed, hashlib.sha256).hexdigest().encode("ascii")


def encode_preamble(
    key: bytes, microvm_id: str, port: int, *, timestamp: int, nonce: bytes
) -> bytes:
    """The preamble line for ``microvm_id``'s ``port``, signed with ``key``. ValueError for
    values the format cannot carry (the caller's bug, never the peer's)."""
    check_key(key)
    if not isinstance(microvm_id, str) or not MICROVM_ID_RE.fullmatch(microvm_id):
        raise ValueError(f"not a MicroVM id: {microvm_id!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"not a port: {port!r}")
    if isinstance(timestamp, bool) or not isinstance(timestamp, int):
        raise ValueError(f"not a timestamp: {timestamp!r}")
    if not 1 <= timestamp < 10**12:
        raise ValueError(f"timestamp out of range: {timestamp}")
    if not isinstance(nonce, bytes) or len(nonce) != NONCE_BYTES:
        raise ValueError(f"a nonce is {NONCE_BYTES} bytes")
    fields = (microvm_id, str(port), str(timestamp), nonce.hex())
    signed = b" ".join([TAG, *(field.encode("ascii") for field in fields)]) + b" "
    return signed + _mac(key, signed) + b"\n"


def new_preamble(key: bytes, microvm_id: str, port: int) -> bytes:
    """A preamble with the current time and a fresh random nonce: what a dialer sends."""
    return encode_preamble(
        key, microvm_id, port, timestamp=int(time.time()), nonce=os.urandom(NONCE_BYTES)
    )


def _split(line: bytes) -> tuple[Preamble, bytes, bytes] | None:
    """The fields of a well-formed line, the bytes the MAC covers and the MAC; None if the
    line is not one."""
    if not isinstance(line, bytes) or len(line) > MAX_PREAMBLE or not line.endswith(b"\n"):
        return None
    fields = line[:-1].split(b" ")
    if len(fields) != 6 or fields[0] != TAG:
        return None
    _, vm, port, timestamp, nonce, mac = fields
    if not (vm.isascii() and MICROVM_ID_RE.fullmatch(vm.decode("ascii"))):
        return None
    if not (_PORT.fullmatch(port) and int(port) <= 65535):
        return None
    if not (_TIMESTAMP.fullmatch(timestamp) and _NONCE.fullmatch(nonce) and _MAC.fullmatch(mac)):
        return None
    preamble = Preamble(
        vm.decode("ascii"), int(port), int(timestamp), bytes.fromhex(nonce.decode("ascii"))
    )
    return preamble, line[: -1 - _MAC_HEX], mac


def parse_preamble(line: bytes) -> Preamble | Refusal:
    """The fields of ``line`` if it has the preamble's shape (the MAC is not checked), else
    ``Refusal.MALFORMED``. Never raises."""
    split = _split(line)
    return Refusal.MALFORMED if split is None else split[0]


class ReplayCache:
    """The nonces of preambles accepted within the window, each forgotten once its timestamp
    is out of the window; at most ``capacity`` at once."""

    def __init__(self, capacity: int = REPLAY_CAPACITY, window: int = WINDOW) -> None:
        if capacity < 1:
            raise ValueError("a replay cache holds at least one nonce")
        self.capacity = capacity
        self.window = window
        self._seen: set[bytes] = set()
        self._expiry: list[tuple[int, bytes]] = []  # a heap: when each nonce may be forgotten

    def __len__(self) -> int:
        return len(self._seen)

    def admit(self, nonce: bytes, timestamp: int, now: float) -> Refusal | None:
        """None, and ``nonce`` remembered, if it was not seen; else why not."""
        while self._expiry and self._expiry[0][0] < now:
            self._seen.discard(heapq.heappop(self._expiry)[1])
        if nonce in self._seen:
            return Refusal.REPLAY
        if len(self._seen) >= self.capacity:
            return Refusal.BUSY
        self._seen.add(nonce)
        heapq.heappush(self._expiry, (timestamp + self.window, nonce))
        return None


class PreambleVerifier:
    """Checks preambles against one fleet key, one clock and one replay cache (a listener's)."""

    def __init__(
        self,
        key: bytes,
        *,
        window: int = WINDOW,
        replay_capacity: int = REPLAY_CAPACITY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._key = check_key(key)
        self.window = window
        self.clock = clock
        self.replays = ReplayCache(replay_capacity, window)

    def verify(self, line: bytes) -> Preamble | Refusal:
        """The preamble ``line`` carries if it is well formed, signed with the key, timely and
        new; else why not. Never raises."""
        split = _split(line)
        if split is None:
            return Refusal.MALFORMED
        preamble, signed, mac = split
        if not hmac.compare_digest(_mac(self._key, signed), mac):
            return Refusal.BAD_MAC
        now = self.clock()
        if abs(now - preamble.timestamp) > self.window:
            return Refusal.STALE
        refused = self.replays.admit(preamble.nonce, preamble.timestamp, now)
        return preamble if refused is None else refused


def parse_answer(line: bytes) -> Answer | None:
    """The answer ``line`` (LF included) is, or None. Never raises."""
    if not isinstance(line, bytes):
        return None
    return _ANSWERS.get(line)
