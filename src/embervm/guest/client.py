"""Host side of the agent protocol: ``AgentClient`` over QEMU's unix-socket chardev.

QEMU is the chardev *server* (``server=on,wait=off``); we connect, say ``hello`` with a nonce and
ignore everything until the matching reply (bytes left over from an earlier connection or from
before a restore are skipped by the self-synchronising decoder). The guest is untrusted: frame
sizes are bounded by the decoder, every field we use is type-checked, accumulated output and file
sizes are capped, and every wait has a deadline or ends when the connection does.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from embervm.errors import GuestError
from embervm.guest._logbuffer import LogBuffer
from embervm.guest._pty import PtySession
from embervm.guest._wire import (
    CLOSED,
    AppSpec,
    ExecResult,
    HttpResponse,
    LogLine,
    check_result,
    get_int,
    get_opt_int,
)
from embervm.guest.agent.protocol import (
    CHUNK,
    PROTOCOL_VERSIONS,
    Decoder,
    Frame,
    ProtocolError,
    encode,
)

_log = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT = 30.0
#: Extra time the host allows past an exec's own timeout for the guest to report the exit.
EXEC_GRACE = 30.0
MAX_OUTPUT = 64 * 1024 * 1024
_HELLO_ATTEMPT = 5.0
_RETRY_DELAY = 0.05


class AgentClient:
    """One connection to one VM's agent. Use ``connect``; ``close`` when done."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, request_timeout: float
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._timeout = request_timeout
        self._decoder = Decoder()
        # Ids start at a random point so that stray frames of an earlier connection (possibly
        # still in QEMU's buffers) cannot match a request of this one.
        self._ids = itertools.count(secrets.randbelow(2**40) + 1)
        self._pending: dict[int, asyncio.Queue[Frame]] = {}
        self._logs = LogBuffer()
        self._log_event = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._closed = False
        self._read_task: asyncio.Task[None] | None = None
        self.hello: dict[str, Any] = {}
        self.restore_result: dict[str, Any] | None = None

    # --- connection ----------------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        socket_path: Path,
        *,
        timeout: float,  # noqa: ASYNC109
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        after_restore: bool = False,
    ) -> AgentClient:
        """Connect (retrying while QEMU or the agent is not up yet) and complete ``hello``.

        With ``after_restore=True`` the ``after_restore`` request (host clock now, 64 random
        bytes) is pipelined right behind the hello, saving a round trip on the restore path;
        its result is in ``restore_result``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: BaseException | None = None
        while loop.time() < deadline:
            left = deadline - loop.time()
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_unix_connection(str(socket_path), limit=2 * CHUNK), left
                )
            except (OSError, TimeoutError) as exc:
                last = exc
                await asyncio.sleep(_RETRY_DELAY)
                continue
            client = cls(reader, writer, request_timeout=request_timeout)
            try:
                await client._greet(
                    min(_HELLO_ATTEMPT, max(deadline - loop.time(), 0.01)), after_restore
                )
                return client
            except (GuestError, OSError, TimeoutError) as exc:
                last = exc
                await client.close()
        raise GuestError(
            f"agent at {socket_path} did not answer within {timeout:.1f} s: {last!r}"
        ) from last

    @classmethod
    async def over_socket(
        cls,
        sock: socket.socket,
        *,
        timeout: float,  # noqa: ASYNC109
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
    ) -> AgentClient:
        """Speak to an agent on an already connected stream socket (tests, other transports)."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=2 * CHUNK)
        client = cls(reader, writer, request_timeout=request_timeout)
        try:
            await client._greet(timeout)
        except BaseException as exc:
            await client.close()
            if isinstance(exc, TimeoutError):
                raise GuestError("agent did not answer hello in time") from exc
            raise
        return client

    async def _greet(self, limit: float, restore: bool = False) -> None:
        nonce = secrets.token_hex(16)
        self._read_task = asyncio.ensure_future(self._read_loop())
        rid, q = self._open_request()
        rrid, rq = self._open_request(maxsize=4) if restore else (0, None)
        try:
            await self._send(
                {"op": "hello", "id": rid, "versions": list(PROTOCOL_VERSIONS), "nonce": nonce}
            )
            if rq is not None:
                await self._send(
                    {"op": "after_restore", "id": rrid, "wall_clock_ns": time.time_ns()},
                    os.urandom(64),
                )
            async with asyncio.timeout(limit):
                while True:
                    frame = await q.get()
                    if frame.op == "result" and frame.header.get("nonce") != nonce:
                        continue  # a reply meant for an earlier connection
                    h = check_result(frame)
                    break
                if h.get("version") not in PROTOCOL_VERSIONS:
                    raise GuestError(f"agent chose unsupported version {h.get('version')!r:.40}")
                if rq is not None:
                    self.restore_result = check_result(await rq.get())
        finally:
            self._forget(rid)
            if rq is not None:
                self._forget(rrid)
        # In sync from here on: a damaged or lying frame is a hostile guest, not a torn stream.
        self._decoder.require_clean_stream()
        self.hello = h

    async def close(self) -> None:
        self._closed = True
        if self._read_task is not None:
            self._read_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._read_task
        self._writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._writer.wait_closed(), 2)
        self._fail_all()

    async def __aenter__(self) -> AgentClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(2 * CHUNK)
                if not data:
                    return
                for frame in self._decoder.feed(data):
                    await self._dispatch(frame)
        except (OSError, asyncio.IncompleteReadError):
            return
        except ProtocolError as exc:
            _log.warning("agent channel closed: %s", exc)
            self._writer.close()
            return
        finally:
            self._closed = True
            self._fail_all()

    async def _dispatch(self, frame: Frame) -> None:
        h = frame.header
        if frame.op == "app.log":
            try:
                self._logs.append(
                    LogLine(
                        str(h.get("name"))[:64],
                        str(h.get("stream"))[:16],
                        frame.body,
                        get_int(h, "ts_ns"),
                        get_int(h, "seq"),
                    )
                )
                self._log_event.set()
            except GuestError:
                pass
            return
        rid = h.get("id")
        q = self._pending.get(rid) if isinstance(rid, int) else None
        if q is not None:
            await q.put(frame)  # bounded: a reader that falls behind slows the guest down

    def _fail_all(self) -> None:
        for q in self._pending.values():
            with contextlib.suppress(asyncio.QueueFull):
                q.put_nowait(CLOSED)
        self._log_event.set()

    def _open_request(self, maxsize: int = 64) -> tuple[int, asyncio.Queue[Frame]]:
        # 64 frames of at most 1 MiB: what one slow consumer can pin before the reader stalls.
        if self._closed:
            raise GuestError("agent connection closed")
        rid = next(self._ids)
        q: asyncio.Queue[Frame] = asyncio.Queue(maxsize)
        self._pending[rid] = q
        return rid, q

    def _forget(self, rid: int) -> None:
        self._pending.pop(rid, None)

    async def _send(self, header: dict[str, Any], body: bytes = b"") -> None:
        try:
            data = encode(header, body)
        except ProtocolError as exc:
            raise GuestError(f"cannot encode {header.get('op')}: {exc}") from exc
        try:
            async with asyncio.timeout(self._timeout), self._write_lock:
                self._writer.write(data)
                await self._writer.drain()
        except (OSError, TimeoutError) as exc:
            raise GuestError(f"sending {header.get('op')} to the agent failed: {exc!r}") from exc

    async def _notify(self, op: str, fields: dict[str, Any], body: bytes = b"") -> None:
        """A request whose success has no reply (PTY input, resize...)."""
        await self._send({"op": op, "id": next(self._ids), **fields}, body)

    async def _call(
        self,
        op: str,
        fields: dict[str, Any] | None = None,
        body: bytes = b"",
        *,
        limit: float | None = None,
    ) -> dict[str, Any]:
        rid, q = self._open_request(maxsize=4)
        try:
            await self._send({"op": op, "id": rid, **(fields or {})}, body)
            async with asyncio.timeout(limit or self._timeout):
                return check_result(await q.get())
        except TimeoutError as exc:
            raise GuestError(f"agent did not answer {op} in time") from exc
        finally:
            self._forget(rid)

    # --- operations ----------------------------------------------------------------------

    async def health(self) -> dict[str, Any]:
        return await self._call("health")

    async def exec(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109
        stdin: bytes | None = None,
        on_output: Callable[[str, bytes], None] | None = None,
        max_output: int = MAX_OUTPUT,
    ) -> ExecResult:
        """Run ``argv`` to completion; the guest kills it after ``timeout`` seconds."""
        if stdin is not None and len(stdin) > CHUNK * 4:
            raise GuestError("stdin larger than 1 MiB: put_file it instead")
        rid, q = self._open_request()
        out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        truncated = False
        try:
            await self._send(
                {
                    "op": "exec",
                    "id": rid,
                    "argv": list(argv),
                    "env": env or {},
                    "cwd": cwd,
                    "user": user,
                    "timeout": timeout,
                },
                stdin or b"",
            )
            limit = None if timeout is None else timeout + EXEC_GRACE
            async with asyncio.timeout(limit):
                while True:
                    frame = await q.get()
                    if frame.op == "exec.out":
                        stream = frame.header.get("stream")
                        if stream not in out:
                            raise GuestError(f"agent sent bad stream {stream!r:.40}")
                        if on_output is not None:
                            on_output(str(stream), frame.body)
                        buf = out[str(stream)]
                        room = max_output - len(out["stdout"]) - len(out["stderr"])
                        truncated = truncated or len(frame.body) > room
                        buf += frame.body[: max(room, 0)]
                    elif frame.op == "exec.exit":
                        h = frame.header
                        return ExecResult(
                            get_int(h, "exit_code"),
                            bytes(out["stdout"]),
                            bytes(out["stderr"]),
                            h.get("timed_out") is True,
                            get_opt_int(h, "signal"),
                            truncated,
                        )
                    elif frame.op != "exec.started":
                        check_result(frame)
                        raise GuestError(f"agent sent unexpected {frame.op[:64]!r} for exec")
        except TimeoutError as exc:
            raise GuestError(f"agent did not finish exec of {argv[0]!r} in time") from exc
        finally:
            self._forget(rid)

    async def open_pty(
        self,
        argv: Sequence[str] | None = None,
        *,
        cols: int = 80,
        rows: int = 24,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> PtySession:
        rid, q = self._open_request()
        try:
            await self._send(
                {
                    "op": "pty.open",
                    "id": rid,
                    "argv": None if argv is None else list(argv),
                    "cols": cols,
                    "rows": rows,
                    "env": env or {},
                    "cwd": cwd,
                    "user": user,
                }
            )
            async with asyncio.timeout(self._timeout):
                h = check_result(await q.get())
        except BaseException:
            self._forget(rid)
            raise
        return PtySession(self, rid, q, get_int(h, "pid"))

    async def put_file(
        self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> None:
        """Write ``data`` to ``path`` atomically (temporary file + rename in the guest)."""
        rid, q = self._open_request(maxsize=4)
        try:
            offset = 0
            while True:
                chunk = data[offset : offset + CHUNK]
                last = offset + len(chunk) >= len(data)
                await self._send(
                    {
                        "op": "file.put",
                        "id": rid,
                        "path": path,
                        "offset": offset,
                        "last": last,
                        "mode": mode,
                        "uid": uid,
                        "gid": gid,
                    },
                    chunk,
                )
                offset += len(chunk)
                if not q.empty():  # an early error stops the upload
                    check_result(q.get_nowait())
                if last:
                    break
            async with asyncio.timeout(self._timeout):
                h = check_result(await q.get())
            if get_int(h, "size") != len(data):
                raise GuestError(f"agent wrote {h.get('size')} of {len(data)} bytes")
        except TimeoutError as exc:
            raise GuestError(f"agent did not confirm writing {path}") from exc
        finally:
            self._forget(rid)

    async def get_file(self, path: str, max_bytes: int) -> bytes:
        rid, q = self._open_request()
        buf = bytearray()
        try:
            await self._send({"op": "file.get", "id": rid, "path": path, "max_bytes": max_bytes})
            while True:
                async with asyncio.timeout(self._timeout):
                    frame = await q.get()
                if frame.op == "file.data":
                    if get_int(frame.header, "offset") != len(buf):
                        raise GuestError("agent sent file data out of order")
                    if len(buf) + len(frame.body) > max_bytes:
                        raise GuestError(f"agent sent more than {max_bytes} bytes")
                    buf += frame.body
                    continue
                h = check_result(frame)
                if get_int(h, "size") != len(buf):
                    raise GuestError("agent's file size disagrees with the data sent")
                return bytes(buf)
        except TimeoutError as exc:
            raise GuestError(f"agent did not send {path} in time") from exc
        finally:
            self._forget(rid)

    async def start_app(self, spec: AppSpec) -> dict[str, Any]:
        return await self._call(
            "app.start",
            {
                "name": spec.name,
                "argv": list(spec.argv),
                "env": dict(spec.env),
                "cwd": spec.cwd,
                "user": spec.user,
                "restart": spec.restart,
                "max_restarts": spec.max_restarts,
            },
        )

    async def stop_app(self, name: str = "app", *, grace: float = 10.0) -> dict[str, Any]:
        return await self._call(
            "app.stop", {"name": name, "grace": grace}, limit=grace + self._timeout
        )

    async def app_status(self) -> list[dict[str, Any]]:
        apps = (await self._call("app.status")).get("apps")
        if not isinstance(apps, list) or not all(isinstance(a, dict) for a in apps):
            raise GuestError("agent sent a bad app list")
        return apps

    async def app_logs(self) -> AsyncIterator[LogLine]:
        """App output lines as they arrive (the newest ``LOG_BUFFER_BYTES`` are kept if unread)."""
        while True:
            while self._logs:
                yield self._logs.popleft()
            if self._closed:
                return
            self._log_event.clear()
            await self._log_event.wait()

    async def after_restore(
        self, *, wall_clock_ns: int | None = None, entropy: bytes | None = None
    ) -> dict[str, Any]:
        """Set the guest clock and reseed its RNG (clones must not share either)."""
        return await self._call(
            "after_restore",
            {"wall_clock_ns": wall_clock_ns or time.time_ns()},
            entropy if entropy is not None else os.urandom(64),
        )

    async def http_request(
        self,
        port: int,
        path: str,
        *,
        method: str = "POST",
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> HttpResponse:
        """An HTTP/1.1 request to ``127.0.0.1:port`` made by the agent inside the guest.

        Used for lifecycle hooks before (or without) any host-to-guest network path. The guest
        gives up after ``timeout``; the response body is capped at 1 MiB (``truncated``).
        """
        rid, q = self._open_request(maxsize=4)
        try:
            await self._send({"op": "http", "id": rid, "method": method, "port": port,
                              "path": path, "headers": [list(p) for p in headers or []],
                              "timeout": timeout}, body)  # fmt: skip
            async with asyncio.timeout(timeout + self._timeout):
                frame = await q.get()
            h = check_result(frame)
        except TimeoutError as exc:
            raise GuestError(f"agent did not relay {method} {path} in time") from exc
        finally:
            self._forget(rid)
        raw = h.get("headers")
        if not isinstance(raw, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in raw
        ):
            raise GuestError("agent sent bad response headers")
        return HttpResponse(get_int(h, "status"), [(k, v) for k, v in raw], frame.body,
                            h.get("truncated") is True)  # fmt: skip

    async def tcp_probe(self, port: int, *, timeout: float = 1.0) -> bool:  # noqa: ASYNC109
        """Whether something in the guest accepts TCP connections on 127.0.0.1:``port``."""
        res = await self._call("tcp.probe", {"port": port, "timeout": timeout},
                               limit=timeout + self._timeout)  # fmt: skip
        return res.get("open") is True

    async def quiesce(self, *, auto_thaw: float = 30.0) -> bool:
        """sync + freeze ``/``; True if frozen. The guest thaws itself after ``auto_thaw`` s."""
        return (await self._call("quiesce", {"auto_thaw": auto_thaw})).get("frozen") is True

    async def thaw(self) -> None:
        await self._call("thaw")


if TYPE_CHECKING:
    from embervm.guest.api import GuestAgent

    def _implements(c: AgentClient) -> GuestAgent:
        return c  # mypy proves AgentClient satisfies the GuestAgent seam


__all__ = ["AgentClient", "AppSpec", "ExecResult", "HttpResponse", "LogLine", "PtySession"]
