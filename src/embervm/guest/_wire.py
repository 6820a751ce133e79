"""Values and field checks of the host client (split from ``client`` to keep it small).

Every field read from a guest frame goes through ``_int``/``_opt_int``/``check_result``: the
guest is untrusted, and a wrong type must become a ``GuestError``, not a crash elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from embervm.errors import GuestError
from embervm.guest.agent.protocol import Frame

#: Put into every pending queue when the connection ends.
CLOSED = Frame({"op": "_closed"})


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    signal: int | None = None
    truncated: bool = False


@dataclass(frozen=True)
class AppSpec:
    """The app to supervise: CMD/ENTRYPOINT argv, environment, user, restart policy."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: str | None = None
    user: str | None = None
    restart: str = "always"  # "no" | "on-failure" | "always"
    max_restarts: int | None = None
    name: str = "app"


@dataclass(frozen=True)
class HttpResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    truncated: bool


@dataclass(frozen=True)
class LogLine:
    name: str
    stream: str
    line: bytes
    ts_ns: int
    seq: int


def get_int(h: dict[str, Any], key: str) -> int:
    v = h.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise GuestError(f"agent sent a bad {key!r}: {v!r:.80}")
    return v


def get_opt_int(h: dict[str, Any], key: str) -> int | None:
    return None if h.get(key) is None else get_int(h, key)


def check_result(frame: Frame) -> dict[str, Any]:
    """The fields of a ``result`` frame, or GuestError for an ``error`` frame."""
    if frame is CLOSED:
        raise GuestError("agent connection closed")
    if frame.op == "error":
        code = str(frame.header.get("code"))[:64]
        msg = str(frame.header.get("message"))[:2000]
        raise GuestError(f"agent error {code}: {msg}")
    if frame.op != "result":
        raise GuestError(f"agent sent unexpected {frame.op[:64]!r}")
    return frame.header
