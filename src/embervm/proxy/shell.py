"""``wss://<id>.<domain>/shell``: a PTY in the VM over a WebSocket.

Binary frames carry terminal bytes both ways; text frames carry JSON control messages:
``{"type": "resize", "cols": C, "rows": R}`` from the client, ``{"type": "exit", "status": N,
"code": N}`` from the proxy when the shell ends (then a normal close; ``code`` is the name the
``embervm shell`` client of the first release reads). Frames are parsed by wsproto;
a message is capped at ``MAX_MESSAGE`` bytes and a control message must be valid JSON with
sane sizes, or it is ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol

from wsproto.connection import Connection, ConnectionType
from wsproto.events import BytesMessage, CloseConnection, Ping, TextMessage
from wsproto.utilities import generate_accept_token

from embervm.errors import EmbervmError
from embervm.proxy.admission import SUBPROTOCOL_PREFIX, Admission, Target, subprotocols
from embervm.proxy.h1.wire import serialize
from embervm.proxy.limits import READ_SIZE
from embervm.proxy.streams import Ending, SessionLease

log = logging.getLogger("embervm.proxy.shell")

MAX_MESSAGE = 1024 * 1024
MAX_TERMINAL = 1000
EXIT_WAIT = 10.0


class ShellClient(Protocol):
    """What ``/shell`` needs of the client's HTTP/1.1 connection (``h1.session``'s
    ``Http1Session``, which imports this module: typed by shape, not by its class)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    admission: Admission

    async def refuse(self, status: int, message: str) -> None: ...


class Pty(Protocol):
    """A terminal in the VM (``embervm.guest.PtySession``): iterate it for output bytes."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def write(self, data: bytes) -> None: ...

    async def resize(self, cols: int, rows: int) -> None: ...

    async def wait(self, timeout: float | None = None) -> int: ...  # noqa: ASYNC109

    async def close(self) -> None: ...


class ShellOpener(Protocol):
    """What the proxy needs of the host (``embervm.host.LocalHost``)."""

    async def open_shell(self, vm_id: str, *, cols: int, rows: int) -> Pty: ...


def _accept_headers(fields: dict[bytes, bytes]) -> list[tuple[bytes, bytes]]:
    key = fields.get(b"sec-websocket-key", b"")
    out = [(b"upgrade", b"websocket"), (b"connection", b"Upgrade"),
           (b"sec-websocket-accept", generate_accept_token(key))]  # fmt: skip
    if SUBPROTOCOL_PREFIX in subprotocols(fields.get(b"sec-websocket-protocol")):
        out.append((b"sec-websocket-protocol", SUBPROTOCOL_PREFIX.encode()))
    return out


async def serve_shell_h1(
    session: ShellClient,
    fields: dict[bytes, bytes],
    target: Target,
    shells: ShellOpener,
    lease: SessionLease,
) -> None:
    """Answer the upgrade, open the PTY, and bridge them until either side or ``lease``
    ends."""
    if not fields.get(b"sec-websocket-key"):
        await session.refuse(400, "Bad request")
        return
    try:
        pty = await shells.open_shell(target.microvm_id, cols=80, rows=24)
    except EmbervmError as exc:
        log.warning("shell for %s failed to open: %s", target.microvm_id, exc)
        await session.refuse(502, "The shell could not be opened")
        return
    session.writer.write(serialize(b"HTTP/1.1 101 Switching Protocols", _accept_headers(fields)))
    ws = Connection(ConnectionType.SERVER)
    routes = session.admission.routes

    def on_input() -> None:
        routes.record_activity(target.microvm_id)
        lease.touch()

    ended = await _bridge(ws, pty, session.reader, session.writer, on_input, lease)
    if ended is not None:
        log.info("shell on %s closed: %s", target.microvm_id, ended)


async def _bridge(
    ws: Connection,
    pty: Pty,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    on_input: Callable[[], None],
    lease: SessionLease,
) -> Ending | None:
    """Relay until the shell or the client ends (None), or the lease does (its reason: the
    client gets a close frame saying so)."""

    async def to_client() -> None:
        async for chunk in pty:
            lease.touch()
            writer.write(ws.send(BytesMessage(data=chunk)))
            await writer.drain()
        code = await pty.wait(EXIT_WAIT)  # the output ended: the exit status follows at once
        exit_message = json.dumps({"type": "exit", "status": code, "code": code})
        writer.write(ws.send(TextMessage(data=exit_message)))
        writer.write(ws.send(CloseConnection(code=1000)))
        await writer.drain()

    async def from_client() -> None:
        pending: list[Any] = []
        while True:
            for event in ws.events():
                if isinstance(event, BytesMessage):
                    pending.append(event.data)
                    if event.message_finished:
                        await pty.write(b"".join(pending))
                        pending.clear()
                elif isinstance(event, TextMessage):
                    await _control(pty, event.data)
                elif isinstance(event, Ping):
                    writer.write(ws.send(event.response()))
                elif isinstance(event, CloseConnection):
                    with contextlib.suppress(Exception):
                        writer.write(ws.send(event.response()))
                    return
                if sum(len(p) for p in pending) > MAX_MESSAGE:
                    return
            data = await reader.read(READ_SIZE)
            if not data:
                return
            on_input()
            ws.receive_data(data)

    out = asyncio.create_task(to_client())
    inp = asyncio.create_task(from_client())
    watch = asyncio.create_task(lease.ended())
    try:
        await asyncio.wait({out, inp, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch.done():
            reason = watch.result()
            code = 1001 if reason == Ending.IDLE else 1008  # going away; policy violation
            with contextlib.suppress(Exception):  # wsproto refuses if a close went out already
                writer.write(ws.send(CloseConnection(code=code, reason=reason)))
                async with asyncio.timeout(5):
                    await writer.drain()
            return reason
        if inp.done() and not out.done():  # the client left: end the shell
            with contextlib.suppress(Exception):
                await pty.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(5):
                await out
        return None
    finally:
        for task in (out, inp, watch):
            task.cancel()
        with contextlib.suppress(Exception):
            await pty.close()


async def _control(pty: Pty, text: str) -> None:
    if len(text) > 4096:
        return
    try:
        message = json.loads(text)
    except ValueError:
        return
    if not isinstance(message, dict) or message.get("type") != "resize":
        return
    cols, rows = message.get("cols"), message.get("rows")
    if not (isinstance(cols, int) and isinstance(rows, int)):
        return
    if 0 < cols <= MAX_TERMINAL and 0 < rows <= MAX_TERMINAL:
        await pty.resize(cols, rows)
