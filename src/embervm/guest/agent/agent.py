"""The guest agent: one dispatcher over the host channel.

Requests carry an ``id`` chosen by the host; replies are ``result``/``error`` frames with the
same id, and long-running operations (exec, PTY) stream events tagged with it. Until the host
has said ``hello`` nothing else is served; every ``hello`` ends the sessions of the previous
connection (they have no reader any more) but leaves apps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from . import children, files, relay, system
from .apps import RESTART_POLICIES, AppSpec, Supervisor
from .channel import Channel
from .protocol import (
    CHUNK,
    MAX_BODY,
    PROTOCOL_VERSIONS,
    Frame,
    ProtocolError,
    encode,
    get_argv,
    get_env,
    get_int,
    get_num,
    get_opt_int,
    get_opt_str,
    get_str,
)
from .sessions import MAX_TIMEOUT, ExecSession, PtySession

AGENT_VERSION = "1.0"
MAX_SESSIONS = 64
MAX_UPLOADS = 8
#: Requests being handled at once (each PTY input frame is one until written).
MAX_TASKS = 1024
MAX_ID = 2**53
#: A freeze is undone after this long even if the host never says thaw.
MAX_FREEZE = 600.0
DEFAULT_FREEZE = 30.0


_CONN_GEN: contextvars.ContextVar[int] = contextvars.ContextVar("embervm_conn_gen", default=-1)


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Agent:
    def __init__(self, fd: int, *, reconnectable: bool, freeze_path: str = "/") -> None:
        self._fd = fd
        self._reconnectable = reconnectable
        self._freeze_path = freeze_path
        self._greeted = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._sessions: dict[int, ExecSession | PtySession] = {}
        self._uploads: dict[int, files.Upload] = {}
        self._thaw_timer: threading.Timer | None = None
        self._frozen = False
        self._generation = 0
        self._started = time.monotonic()
        #: Called once the channel is open (boot profiling with ``vmdebug=1``).
        self.on_ready: Callable[[], None] | None = None
        self.chan: Channel
        self.reaper: children.Reaper
        self.apps: Supervisor

    async def run(self) -> None:
        self.reaper = children.Reaper()
        self.chan = Channel(
            self._fd,
            self._on_frame,
            self._on_connect,
            self._on_disconnect,
            reconnectable=self._reconnectable,
        )
        self.apps = Supervisor(self._send_event, self.reaper)
        self.chan.start()
        if self.on_ready is not None:
            self.on_ready()
        try:
            await self.chan.closed.wait()
        finally:
            self._reset_sessions()
            for app in list(self.apps.apps):
                with contextlib.suppress(Exception):
                    await self.apps.stop(app, signal.SIGTERM, 2.0)
            for t in list(self._tasks):
                t.cancel()
            self._thaw_now()
            self.reaper.close()
            self.chan.close()

    # --- plumbing ------------------------------------------------------------------------

    def _send(self, header: dict[str, Any], body: bytes = b"") -> bool:
        """Send on behalf of a request: dropped if that request's connection is gone.

        Each request's task carries the connection generation it arrived on (a context
        variable, inherited by the tasks it starts), so output of a session that belonged to
        an earlier connection can never reach the next host with a recycled request id.
        """
        if _CONN_GEN.get() != self._generation:
            return False
        return self.chan.send(encode(header, body))

    def _send_event(self, header: dict[str, Any], body: bytes = b"") -> bool:
        """Send an event that belongs to no connection (app logs)."""
        return self.chan.send(encode(header, body))

    def _send_session(self, header: dict[str, Any], body: bytes) -> None:
        self._send(header, body)

    def _reply(self, rid: int, **fields: Any) -> None:
        self._send({"op": "result", "id": rid, **fields})

    def _error(self, rid: int | None, code: str, message: str) -> None:
        self._send({"op": "error", "id": rid, "code": code, "message": message[:2000]})

    def _on_connect(self) -> None:
        self._greeted = False
        self._generation += 1

    def _on_disconnect(self) -> None:
        self._greeted = False
        self._generation += 1

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_frame(self, frame: Frame) -> None:
        _CONN_GEN.set(self._generation)
        h = frame.header
        raw_id = h.get("id")
        rid = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
        if rid is not None and not 0 <= rid < MAX_ID:
            rid = None
        handler = _HANDLERS.get(frame.op)
        if handler is None:
            self._error(rid, "unknown_op", f"unknown op {frame.op[:64]!r}")
            return
        if rid is None:
            self._error(None, "bad_request", "missing or bad 'id'")
            return
        if frame.op == "hello":
            # Synchronously: requests right behind the hello in the same read must see it.
            try:
                self._hello(rid, h)
            except ProtocolError as exc:
                self._error(rid, "bad_request", str(exc))
            except RequestError as exc:
                self._error(rid, exc.code, str(exc))
            return
        if not self._greeted:
            self._error(rid, "no_hello", "say hello first")
            return
        if len(self._tasks) >= MAX_TASKS:
            self._error(rid, "busy", f"more than {MAX_TASKS} requests in flight")
            return
        self._spawn(self._handle(handler, rid, h, frame.body))

    async def _handle(self, handler: _Handler, rid: int, h: dict[str, Any], body: bytes) -> None:
        try:
            await handler(self, rid, h, body)
        except ProtocolError as exc:
            self._error(rid, "bad_request", str(exc))
        except RequestError as exc:
            self._error(rid, exc.code, str(exc))
        except files.FileError as exc:
            self._error(rid, exc.code, str(exc))
        except children.SpawnError as exc:
            self._error(rid, "spawn_failed", str(exc))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._error(rid, "internal", f"{type(exc).__name__}: {exc}")

    def _reset_sessions(self) -> None:
        for s in self._sessions.values():
            s.kill()
        self._sessions.clear()
        for up in self._uploads.values():
            up.abort()
        self._uploads.clear()

    def _session(self, rid: int, h: dict[str, Any], kind: type[Any]) -> Any:
        sid = get_int(h, "session", lo=0, hi=MAX_ID, default=rid)
        s = self._sessions.get(sid)
        if not isinstance(s, kind):
            raise RequestError("not_found", f"no such session {sid}")
        return s

    def _new_session_slot(self, rid: int) -> None:
        if rid in self._sessions:
            raise RequestError("conflict", f"session {rid} exists")
        if len(self._sessions) >= MAX_SESSIONS:
            raise RequestError("busy", f"at most {MAX_SESSIONS} sessions")

    # --- handlers ------------------------------------------------------------------------

    async def op_hello(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        self._hello(rid, h)

    def _hello(self, rid: int, h: dict[str, Any]) -> None:
        offered = h.get("versions")
        if not isinstance(offered, list):
            raise ProtocolError("'versions' must be a list")
        common = [v for v in PROTOCOL_VERSIONS if v in offered]
        if not common:
            raise RequestError("version", f"agent speaks {list(PROTOCOL_VERSIONS)}")
        nonce = get_str(h, "nonce", max_len=128, default="")
        self._reset_sessions()
        self._generation += 1
        _CONN_GEN.set(self._generation)
        self._greeted = True
        self._reply(
            rid,
            version=max(common),
            nonce=nonce,
            agent_version=AGENT_VERSION,
            kernel_release=system.kernel_release(),
            boot_id=system.boot_id(),
            pid=os.getpid(),
            uptime=system.uptime(),
        )
        self.apps.flush_ring()

    async def op_health(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        self._reply(
            rid,
            status="ok",
            agent_version=AGENT_VERSION,
            pid=os.getpid(),
            uptime=system.uptime(),
            agent_uptime=time.monotonic() - self._started,
            kernel_release=system.kernel_release(),
            memory_kib=system.meminfo(),
            loadavg=list(os.getloadavg()),
            sessions=len(self._sessions),
            frozen=self._frozen,
            wall_clock_ns=time.time_ns(),
            apps=[a.status() for a in self.apps.apps.values()],
            discarded_bytes=self.chan.discarded_bytes,
        )

    async def op_exec(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        argv = get_argv(h)
        assert argv is not None
        env, cwd, user = get_env(h), get_opt_str(h, "cwd"), get_opt_str(h, "user", max_len=256)
        timeout = get_num(h, "timeout", lo=0.0, hi=MAX_TIMEOUT)
        self._new_session_slot(rid)
        s = ExecSession(rid, self._send_session, self.chan.drain, self.reaper)
        self._sessions[rid] = s
        try:
            await s.run(argv, env=env, cwd=cwd, user=user, timeout=timeout, stdin=body)
        finally:
            if self._sessions.get(rid) is s:
                del self._sessions[rid]

    async def op_exec_kill(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        s = self._session(rid, h, ExecSession)
        s.kill(get_int(h, "signal", lo=1, hi=64, default=signal.SIGKILL))
        self._reply(rid)

    async def op_pty_open(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        argv = get_argv(h, required=False)
        cols = get_int(h, "cols", lo=1, hi=1000, default=80)
        rows = get_int(h, "rows", lo=1, hi=1000, default=24)
        env, cwd, user = get_env(h), get_opt_str(h, "cwd"), get_opt_str(h, "user", max_len=256)
        self._new_session_slot(rid)
        s = PtySession(rid, self._send_session, self.chan.drain, self.reaper)
        pid = s.open(argv, cols=cols, rows=rows, env=env, cwd=cwd, user=user)
        self._sessions[rid] = s
        self._reply(rid, pid=pid)
        try:
            await s.run()
        finally:
            if self._sessions.get(rid) is s:
                del self._sessions[rid]

    async def op_pty_input(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        s: PtySession = self._session(rid, h, PtySession)
        await s.write(body)

    async def op_pty_resize(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        s: PtySession = self._session(rid, h, PtySession)
        s.resize(get_int(h, "cols", lo=1, hi=1000), get_int(h, "rows", lo=1, hi=1000))

    async def op_pty_signal(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        s: PtySession = self._session(rid, h, PtySession)
        s.signal(get_int(h, "signal", lo=1, hi=64))

    async def op_pty_close(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        s: PtySession = self._session(rid, h, PtySession)
        s.hangup()

    async def op_file_put(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        offset = get_int(h, "offset", lo=0, hi=files.MAX_FILE, default=0)
        last = h.get("last", True) is True
        up = self._uploads.get(rid)
        if up is None:
            if offset != 0:
                raise RequestError("not_found", f"no upload {rid} in progress")
            if self._frozen:
                raise RequestError("frozen", "the filesystem is frozen")
            if len(self._uploads) >= MAX_UPLOADS:
                raise RequestError("busy", f"at most {MAX_UPLOADS} uploads")
            up = files.Upload.begin(get_str(h, "path"), rid)
            self._uploads[rid] = up
        try:
            up.write(offset, body)
            if last:
                del self._uploads[rid]
                size = up.commit(
                    get_int(h, "mode", lo=0, hi=0o7777, default=0o644),
                    get_int(h, "uid", lo=0, hi=2**32 - 2, default=0),
                    get_int(h, "gid", lo=0, hi=2**32 - 2, default=0),
                )
                self._reply(rid, size=size)
        except BaseException:
            self._uploads.pop(rid, None)
            up.abort()
            raise

    async def op_file_get(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        max_bytes = get_int(h, "max_bytes", lo=0, hi=files.MAX_FILE)
        _size, chunks = files.read_chunks(get_str(h, "path"), max_bytes, CHUNK)
        sent = 0
        for data in chunks:
            self._send({"op": "file.data", "id": rid, "offset": sent}, data)
            sent += len(data)
            await self.chan.drain()
        self._reply(rid, size=sent)

    async def op_app_start(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        restart = get_str(h, "restart", max_len=16, default="no")
        if restart not in RESTART_POLICIES:
            raise ProtocolError(f"'restart' must be one of {RESTART_POLICIES}")
        argv = get_argv(h)
        assert argv is not None
        spec = AppSpec(
            name=get_str(h, "name", max_len=64, default="app"),
            argv=argv,
            env=get_env(h),
            cwd=get_opt_str(h, "cwd"),
            user=get_opt_str(h, "user", max_len=256),
            restart=restart,
            max_restarts=get_opt_int(h, "max_restarts", lo=0, hi=10**6),
        )
        try:
            app = self.apps.start(spec)
        except ValueError as exc:
            raise RequestError("conflict", str(exc)) from exc
        await asyncio.sleep(0)
        self._reply(rid, **app.status())

    async def op_app_stop(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        name = get_str(h, "name", max_len=64, default="app")
        if name not in self.apps.apps:
            raise RequestError("not_found", f"no app {name!r}")
        grace = get_num(h, "grace", lo=0.0, hi=300.0)
        app = await self.apps.stop(
            name,
            get_int(h, "signal", lo=1, hi=64, default=signal.SIGTERM),
            10.0 if grace is None else grace,
        )
        self._reply(rid, **app.status())

    async def op_app_status(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        self._reply(rid, apps=[a.status() for a in self.apps.apps.values()])

    async def op_after_restore(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        ns = get_int(h, "wall_clock_ns", lo=0, hi=2**63 - 1)
        if len(body) > system.MAX_ENTROPY:
            raise ProtocolError(f"at most {system.MAX_ENTROPY} bytes of entropy")
        try:
            system.set_wall_clock(ns)
            clock_set = True
        except OSError:
            clock_set = False
        credited = system.reseed_rng(body) if body else False
        # A snapshot is normally taken quiesced; the restored VM must not stay frozen.
        thawed = self._frozen
        self._thaw_now()
        self._reply(
            rid,
            clock_set=clock_set,
            rng_reseeded=credited,
            thawed=thawed,
            wall_clock_ns=time.time_ns(),
        )

    async def op_quiesce(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        limit = get_num(h, "auto_thaw", lo=1.0, hi=MAX_FREEZE) or DEFAULT_FREEZE
        if self._frozen:
            self._arm_thaw(limit)
            self._reply(rid, frozen=True, auto_thaw=limit)
            return
        try:
            await asyncio.get_running_loop().run_in_executor(None, system.freeze, self._freeze_path)
        except OSError as exc:
            # Synced at least; not every filesystem can freeze (e.g. a tmpfs root in tests).
            self._reply(rid, frozen=False, synced=True, reason=exc.strerror or str(exc))
            return
        self._frozen = True
        self._arm_thaw(limit)
        self._reply(rid, frozen=True, auto_thaw=limit)

    async def op_thaw(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        was = self._frozen
        self._thaw_now()
        self._reply(rid, thawed=was)

    async def op_http(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        hdrs = h.get("headers") or []
        if not isinstance(hdrs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in hdrs
        ):
            raise ProtocolError("'headers' must be a list of [name, value] strings")
        try:
            resp = await relay.http_request(
                get_str(h, "method", max_len=16, default="GET"),
                get_int(h, "port", lo=1, hi=65535), get_str(h, "path", max_len=8192),
                [(k, v) for k, v in hdrs], body,
                get_num(h, "timeout", lo=0.01, hi=3600.0) or 30.0,
            )  # fmt: skip
        except relay.RelayError as exc:
            raise RequestError(exc.code, str(exc)) from exc
        self._send({"op": "result", "id": rid, "status": resp.status,
                    "headers": [list(p) for p in resp.headers], "truncated": resp.truncated},
                   resp.body)  # fmt: skip

    async def op_tcp_probe(self, rid: int, h: dict[str, Any], body: bytes) -> None:
        port = get_int(h, "port", lo=1, hi=65535)
        limit = get_num(h, "timeout", lo=0.01, hi=60.0) or 1.0
        self._reply(rid, open=await relay.tcp_probe(port, limit))

    def _arm_thaw(self, limit: float) -> None:
        # A thread, not the event loop: if anything in the loop blocked on the frozen
        # filesystem, the timer must still fire.
        if self._thaw_timer is not None:
            self._thaw_timer.cancel()
        self._thaw_timer = threading.Timer(limit, self._thaw_now)
        self._thaw_timer.daemon = True
        self._thaw_timer.start()

    def _thaw_now(self) -> None:
        if self._thaw_timer is not None:
            self._thaw_timer.cancel()
            self._thaw_timer = None
        if self._frozen:
            system.thaw(self._freeze_path)
            self._frozen = False


_Handler = Callable[[Agent, int, dict[str, Any], bytes], Awaitable[None]]

_HANDLERS: dict[str, _Handler] = {
    "hello": Agent.op_hello,
    "health": Agent.op_health,
    "exec": Agent.op_exec,
    "exec.kill": Agent.op_exec_kill,
    "pty.open": Agent.op_pty_open,
    "pty.input": Agent.op_pty_input,
    "pty.resize": Agent.op_pty_resize,
    "pty.signal": Agent.op_pty_signal,
    "pty.close": Agent.op_pty_close,
    "file.put": Agent.op_file_put,
    "file.get": Agent.op_file_get,
    "app.start": Agent.op_app_start,
    "app.stop": Agent.op_app_stop,
    "app.status": Agent.op_app_status,
    "after_restore": Agent.op_after_restore,
    "quiesce": Agent.op_quiesce,
    "thaw": Agent.op_thaw,
    "http": Agent.op_http,
    "tcp.probe": Agent.op_tcp_probe,
}

assert MAX_BODY >= CHUNK
