"""``GuestAgent``: the seam other packages type against (``AgentClient`` implements it).

Code in ``host/``, ``imagebuild/`` or ``proxy/`` that needs a guest should accept a ``GuestAgent``
so that unit tests can pass a fake or ``tests.framework.local_guest_agent.local_agent()``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Protocol

from embervm.guest._pty import PtySession
from embervm.guest._wire import AppSpec, ExecResult, HttpResponse, LogLine


class GuestAgent(Protocol):
    @property
    def closed(self) -> bool:
        """The connection to the agent is gone (the VM stopped, or ``close`` was called)."""
        ...

    async def close(self) -> None: ...

    async def health(self) -> dict[str, Any]: ...

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
        max_output: int = ...,
    ) -> ExecResult: ...

    async def open_pty(
        self,
        argv: Sequence[str] | None = None,
        *,
        cols: int = 80,
        rows: int = 24,
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        user: str | None = None,
    ) -> PtySession: ...

    async def put_file(
        self, path: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0
    ) -> None: ...

    async def get_file(self, path: str, max_bytes: int) -> bytes: ...

    async def start_app(self, spec: AppSpec) -> dict[str, Any]: ...

    async def stop_app(self, name: str = "app", *, grace: float = 10.0) -> dict[str, Any]: ...

    async def app_status(self) -> list[dict[str, Any]]: ...

    def app_logs(self) -> AsyncIterator[LogLine]: ...

    async def after_restore(
        self, *, wall_clock_ns: int | None = None, entropy: bytes | None = None
    ) -> dict[str, Any]: ...

    async def http_request(
        self,
        port: int,
        path: str,
        *,
        method: str = "POST",
        body: bytes = b"",
        headers: list[tuple[str, str]] | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109
    ) -> HttpResponse: ...

    async def tcp_probe(self, port: int, *, timeout: float = 1.0) -> bool: ...  # noqa: ASYNC109

    async def quiesce(self, *, auto_thaw: float = 30.0) -> bool: ...

    async def thaw(self) -> None: ...
