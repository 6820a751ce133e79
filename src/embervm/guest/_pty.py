"""``PtySession``: the host's handle on one interactive terminal in the guest."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Protocol

from embervm.errors import GuestError
from embervm.guest._wire import CLOSED, get_int
from embervm.guest.agent.protocol import CHUNK, Frame


class _Notifier(Protocol):
    async def _notify(self, op: str, fields: dict[str, Any], body: bytes = b"") -> None: ...

    def _forget(self, rid: int) -> None: ...


class PtySession:
    """An interactive terminal in the guest. Iterate it for output bytes; ``wait`` for the exit."""

    def __init__(self, client: _Notifier, sid: int, queue: asyncio.Queue[Frame], pid: int) -> None:
        self._client = client
        self.sid = sid
        self.pid = pid
        self._queue = queue
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def write(self, data: bytes) -> None:
        for i in range(0, len(data), CHUNK):
            await self._client._notify("pty.input", {"session": self.sid}, data[i : i + CHUNK])

    async def resize(self, cols: int, rows: int) -> None:
        await self._client._notify("pty.resize", {"session": self.sid, "cols": cols, "rows": rows})

    async def signal(self, sig: int) -> None:
        await self._client._notify("pty.signal", {"session": self.sid, "signal": int(sig)})

    async def close(self) -> None:
        """Hang up the terminal (SIGHUP to its session)."""
        if not self._exit.done():
            await self._client._notify("pty.close", {"session": self.sid})

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._read()

    async def _read(self) -> AsyncIterator[bytes]:
        while not self._exit.done():
            frame = await self._queue.get()
            if frame is CLOSED:
                self._exit.set_exception(GuestError("agent connection closed"))
                self._exit.exception()
                return
            if frame.op == "pty.out":
                yield frame.body
            elif frame.op == "pty.exit":
                self._exit.set_result(get_int(frame.header, "exit_code"))
                self._client._forget(self.sid)
                return

    async def wait(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Exit code of the terminal's process (draining any output not read yet)."""
        async with asyncio.timeout(timeout):
            async for _ in self:
                pass
            return await self._exit
