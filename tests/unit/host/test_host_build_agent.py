"""AgentOps over a real local agent process (``tests.framework.local_guest_agent``, no QEMU):
exec with env/cwd and streamed output, folder trees with modes, the app's output and exit,
hook calls through the agent's HTTP relay, port probes."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.framework.local_guest_agent import local_agent

from embervm.host.build_agent import AgentOps
from embervm.imagebuild.machine import AppLaunch, TreeEntry

HOOK_APP = """
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def do_POST(self):
        self.send_response(200 if self.path.endswith("/ready") else 503)
        self.send_header("Content-Length", "0")
        self.end_headers()
print("listening", flush=True)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
async def ops() -> AsyncIterator[AgentOps]:
    async with local_agent() as client:
        agent = AgentOps(client)
        try:
            yield agent
        finally:
            await agent.close()
            for app in await client.app_status():
                if app.get("state") in ("starting", "running", "backoff"):
                    await client.stop_app(str(app["name"]), grace=2)


async def test_exec_streams_output_with_env_and_cwd(ops: AgentOps, tmp_path: Path) -> None:
    chunks: list[tuple[str, bytes]] = []
    outcome = await ops.exec(
        ["/bin/sh", "-c", 'echo "$GREETING from $(pwd)"; echo oops >&2; exit 4'],
        env={"GREETING": "hi"},
        cwd=str(tmp_path),
        user=None,
        timeout=30,
        on_output=lambda stream, chunk: chunks.append((stream, chunk)),
    )
    assert (outcome.exit_code, outcome.timed_out) == (4, False)
    out = b"".join(c for s, c in chunks if s == "stdout").decode()
    assert out == f"hi from {tmp_path}\n"
    assert b"".join(c for s, c in chunks if s == "stderr") == b"oops\n"


async def test_exec_timeout_is_reported(ops: AgentOps) -> None:
    outcome = await ops.exec(
        ["sleep", "30"], env={}, cwd="/", user=None, timeout=0.3, on_output=lambda s, c: None
    )
    assert outcome.timed_out


async def test_put_tree_creates_folders_and_files_with_modes(ops: AgentOps, tmp_path: Path) -> None:
    src = tmp_path / "src.txt"
    src.write_text("from host")
    uid, gid = os.getuid(), os.getgid()
    root = tmp_path / "dest"
    await ops.put_tree(
        [
            TreeEntry(str(root / "a" / "b"), True, 0o750, uid, gid),
            TreeEntry(str(root / "a" / "b" / "f.txt"), False, 0o640, uid, gid, source=src),
            TreeEntry(str(root / "new" / "g.txt"), False, 0o600, uid, gid, data=b"inline"),
        ]
    )
    assert (root / "a" / "b").stat().st_mode & 0o777 == 0o750
    assert (root / "a" / "b" / "f.txt").read_text() == "from host"
    assert (root / "a" / "b" / "f.txt").stat().st_mode & 0o777 == 0o640
    assert (root / "new" / "g.txt").read_bytes() == b"inline"


async def test_app_output_hooks_and_ports(ops: AgentOps, tmp_path: Path) -> None:
    port = free_port()
    script = tmp_path / "app.py"
    script.write_text(HOOK_APP)
    lines: list[bytes] = []
    assert not await ops.probe_port(port, timeout=0.5)
    assert await ops.call_hook(port, "ready", timeout=0.5) is None  # nothing listens yet
    await ops.start_app(
        AppLaunch((sys.executable, str(script), str(port)), {}, str(tmp_path)),
        on_output=lambda stream, chunk: lines.append(chunk),
    )
    for _ in range(200):
        if await ops.probe_port(port, timeout=0.5):
            break
        await asyncio.sleep(0.05)
    assert await ops.call_hook(port, "ready", timeout=5) == 200
    assert await ops.call_hook(port, "validate", timeout=5) == 503
    assert await ops.app_exit_code() is None
    for _ in range(100):
        if lines:
            break
        await asyncio.sleep(0.05)
    assert lines[0] == b"listening\n"


async def test_app_exit_code_is_seen(ops: AgentOps, tmp_path: Path) -> None:
    await ops.start_app(
        AppLaunch(("/bin/sh", "-c", "exit 3"), {}, str(tmp_path)), on_output=lambda s, c: None
    )
    code = None
    for _ in range(200):
        code = await ops.app_exit_code()
        if code is not None:
            break
        await asyncio.sleep(0.05)
    assert code == 3
