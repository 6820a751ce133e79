"""The agent's protocol logic, end to end over a socketpair: a real agent process, no QEMU."""

from __future__ import annotations

import asyncio
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tests.framework.local_guest_agent import local_agent

from embervm.errors import GuestError
from embervm.guest.agent.protocol import Decoder, encode
from embervm.guest.client import AgentClient, AppSpec

SRC = Path(__file__).resolve().parents[3] / "src"  # for the raw-socket agent fixture


@pytest.fixture
def agent_proc() -> Iterator[tuple[subprocess.Popen[bytes], socket.socket]]:
    host, guest = socket.socketpair()
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "embervm.guest.agent",
            "--fd",
            str(guest.fileno()),
            "--freeze-path",
            "/dev/shm",
        ],
        pass_fds=[guest.fileno()],
        env=env,
        start_new_session=True,
    )
    guest.close()
    try:
        yield proc, host
    finally:
        host.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture
async def client() -> AsyncIterator[AgentClient]:
    async with local_agent() as c:
        yield c


async def test_hello_reports_versions_and_kernel(client: AgentClient) -> None:
    assert client.hello["version"] == 1
    assert client.hello["kernel_release"] == os.uname().release


async def test_health_answers_ok(client: AgentClient) -> None:
    h = await client.health()
    assert h["status"] == "ok"
    assert h["sessions"] == 0


async def test_exec_returns_exit_code_and_separate_streams(client: AgentClient) -> None:
    r = await client.exec(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.exit_code, r.stdout, r.stderr, r.timed_out) == (7, b"out\n", b"err\n", False)


async def test_exec_streams_output_chunks_as_they_come(client: AgentClient) -> None:
    seen: list[tuple[str, bytes]] = []
    r = await client.exec(
        ["sh", "-c", "echo a; sleep 0.2; echo b >&2; sleep 0.2; echo c"],
        on_output=lambda s, b: seen.append((s, b)),
    )
    assert r.exit_code == 0
    assert [s for s, _ in seen] == ["stdout", "stderr", "stdout"]
    assert b"".join(b for s, b in seen if s == "stdout") == b"a\nc\n"


async def test_exec_passes_stdin_env_and_cwd(client: AgentClient, tmp_path: Path) -> None:
    r = await client.exec(
        ["sh", "-c", 'cat; echo "$FOO"; pwd'], stdin=b"in\n", env={"FOO": "bar"}, cwd=str(tmp_path)
    )
    assert r.stdout == f"in\nbar\n{tmp_path}\n".encode()


async def test_exec_does_not_leak_agent_environment(client: AgentClient) -> None:
    r = await client.exec(["sh", "-c", 'echo "[$PYTHONPATH]"'])
    assert r.stdout == b"[]\n"


async def test_exec_timeout_kills_the_process_group(client: AgentClient) -> None:
    r = await client.exec(["sh", "-c", "sleep 30 & sleep 30"], timeout=0.5)
    assert r.timed_out
    assert r.signal == signal.SIGKILL
    assert r.exit_code == 128 + signal.SIGKILL


@pytest.mark.skipif(os.getuid() != 0, reason="switching users needs root")
async def test_exec_runs_as_the_requested_user(client: AgentClient) -> None:
    r = await client.exec(["id", "-un"], user="nobody")
    assert r.stdout == b"nobody\n"


async def test_exec_of_missing_program_is_an_error(client: AgentClient) -> None:
    with pytest.raises(GuestError, match="spawn_failed"):
        await client.exec(["/nonexistent/prog"])


async def test_exec_output_is_capped(client: AgentClient) -> None:
    r = await client.exec(["head", "-c", "100000", "/dev/zero"], max_output=1000)
    assert r.truncated
    assert len(r.stdout) == 1000


async def test_large_exec_output_arrives_intact(client: AgentClient) -> None:
    r = await client.exec(["head", "-c", "3000000", "/dev/urandom"])
    assert len(r.stdout) == 3_000_000


async def test_concurrent_execs_are_multiplexed(client: AgentClient) -> None:
    rs = await asyncio.gather(
        *(client.exec(["sh", "-c", f"sleep 0.1; echo {i}"]) for i in range(8))
    )
    assert [r.stdout for r in rs] == [f"{i}\n".encode() for i in range(8)]


async def test_pty_echoes_input_and_reports_exit(client: AgentClient) -> None:
    pty = await client.open_pty(["sh"], cols=100, rows=30)
    await pty.write(b"stty size; exit 5\n")
    out = b""
    async for chunk in pty:
        out += chunk
    assert b"30 100" in out
    assert await pty.wait(timeout=10) == 5


async def test_pty_resize_is_seen_by_the_program(client: AgentClient) -> None:
    pty = await client.open_pty(["sh"], cols=80, rows=24)
    await pty.resize(120, 40)
    await pty.write(b"stty size; exit\n")
    out = b""
    async for chunk in pty:
        out += chunk
    assert b"40 120" in out


async def test_pty_signal_interrupts_the_foreground_program(client: AgentClient) -> None:
    # The program says it runs before the signal goes out: a fixed pause lost the race under
    # load (the signal reached the child before it became the terminal's foreground).
    pty = await client.open_pty(["sh", "-c", "echo ready; exec sleep 30"])
    seen = b""
    async with asyncio.timeout(10):
        async for chunk in pty:
            seen += chunk
            if b"ready" in seen:
                break
    await pty.signal(signal.SIGINT)
    assert await pty.wait(timeout=10) == 128 + signal.SIGINT


async def test_several_ptys_at_once_are_independent(client: AgentClient) -> None:
    ptys = [await client.open_pty(["sh"]) for _ in range(3)]
    for i, p in enumerate(ptys):
        await p.write(f"exit {i + 1}\n".encode())
    codes = [await p.wait(timeout=10) for p in ptys]
    assert codes == [1, 2, 3]


async def test_put_then_get_file_round_trips(client: AgentClient, tmp_path: Path) -> None:
    data = os.urandom(700_000)  # several chunks
    target = tmp_path / "sub" / "f.bin"
    await client.put_file(str(target), data, mode=0o600)
    assert target.read_bytes() == data
    assert (target.stat().st_mode & 0o777) == 0o600
    assert await client.get_file(str(target), max_bytes=10**6) == data


async def test_get_file_refuses_files_over_the_limit(client: AgentClient, tmp_path: Path) -> None:
    (tmp_path / "big").write_bytes(b"x" * 100)
    with pytest.raises(GuestError, match="too_large"):
        await client.get_file(str(tmp_path / "big"), max_bytes=99)


async def test_get_missing_file_is_not_found(client: AgentClient, tmp_path: Path) -> None:
    with pytest.raises(GuestError, match="not_found"):
        await client.get_file(str(tmp_path / "nope"), max_bytes=10)


async def test_put_file_rejects_relative_paths(client: AgentClient) -> None:
    with pytest.raises(GuestError, match="bad_request"):
        await client.put_file("relative/path", b"x")


async def test_app_logs_lines_and_restarts_on_failure(client: AgentClient) -> None:
    await client.start_app(
        AppSpec(
            argv=["sh", "-c", "echo hello; echo oops >&2; exit 1"],
            restart="on-failure",
            max_restarts=1,
        )
    )
    lines = []
    async for line in client.app_logs():
        lines.append((line.stream, line.line))
        if len(lines) == 4:
            break
    assert lines == [("stdout", b"hello"), ("stderr", b"oops")] * 2
    for _ in range(50):
        [st] = await client.app_status()
        if st["state"] == "exited":
            break
        await asyncio.sleep(0.1)
    assert (st["state"], st["restarts"], st["last_exit_code"]) == ("exited", 1, 1)


async def test_app_stop_terminates_a_running_app(client: AgentClient) -> None:
    await client.start_app(AppSpec(argv=["sleep", "60"], name="sleeper"))
    st = await client.stop_app("sleeper", grace=5)
    assert st["state"] == "stopped"


async def test_starting_a_running_app_twice_conflicts(client: AgentClient) -> None:
    await client.start_app(AppSpec(argv=["sleep", "60"], name="dup"))
    with pytest.raises(GuestError, match="conflict"):
        await client.start_app(AppSpec(argv=["sleep", "60"], name="dup"))
    await client.stop_app("dup", grace=5)


async def test_quiesce_on_an_unfreezable_fs_syncs_and_reports_not_frozen(
    client: AgentClient,
) -> None:
    assert await client.quiesce(auto_thaw=5) is False
    await client.thaw()


async def _raw_request(sock: socket.socket, frame: bytes) -> list[dict[str, object]]:
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, frame)
    dec = Decoder()
    while True:
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        assert data
        frames = dec.feed(data)
        if frames:
            return [f.header for f in frames]


async def test_requests_before_hello_are_refused(
    agent_proc: tuple[subprocess.Popen[bytes], socket.socket],
) -> None:
    sock = agent_proc[1]
    sock.setblocking(False)
    [h] = await _raw_request(sock, encode({"op": "health", "id": 1}))
    assert (h["op"], h["code"]) == ("error", "no_hello")


async def test_garbage_and_malformed_frames_are_skipped(
    agent_proc: tuple[subprocess.Popen[bytes], socket.socket],
) -> None:
    sock = agent_proc[1]
    sock.setblocking(False)
    good = encode({"op": "hello", "id": 2, "versions": [1], "nonce": "n"})
    bad_crc = bytearray(encode({"op": "health", "id": 3}))
    bad_crc[-1] ^= 0xFF
    not_json = encode({"op": "x"}).replace(b'{"op":"x"}', b'["op":"x"]')
    garbage = os.urandom(5000).replace(b"EMBV", b"....")
    [h] = await _raw_request(sock, garbage + bytes(bad_crc) + not_json + b"EMBV\x01" + good)
    assert (h["op"], h["id"], h["nonce"]) == ("result", 2, "n")


async def test_bad_field_types_get_bad_request(client: AgentClient) -> None:
    with pytest.raises(GuestError, match="bad_request"):
        await client._call("exec", {"argv": "not a list"})
    pty = await client.open_pty(["sleep", "30"])
    with pytest.raises(GuestError, match="bad_request"):
        await client._call("pty.resize", {"session": pty.sid, "cols": -1, "rows": 5})
    with pytest.raises(GuestError, match="not_found"):
        await client._call("pty.resize", {"session": 999, "cols": 1, "rows": 5})
    await pty.close()
    assert await pty.wait(timeout=10) == 128 + signal.SIGHUP
    with pytest.raises(GuestError, match="unknown_op"):
        await client._call("no.such.op")
    assert (await client.health())["status"] == "ok"


async def test_new_hello_ends_sessions_of_the_previous_connection(
    client: AgentClient,
) -> None:
    pty = await client.open_pty(["sleep", "60"])
    await client._call("hello", {"versions": [1], "nonce": "again"})
    # The old session is killed and silent (its exit report belongs to the old connection).
    async with asyncio.timeout(10):
        while True:
            try:
                os.kill(pty.pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
    assert (await client.health())["sessions"] == 0


async def test_agent_exits_cleanly_when_host_closes_socketpair(
    agent_proc: tuple[subprocess.Popen[bytes], socket.socket],
) -> None:
    proc, sock = agent_proc
    sock.close()
    assert await asyncio.to_thread(proc.wait, 10) == 0


async def test_request_right_behind_hello_in_one_write_is_served(
    agent_proc: tuple[subprocess.Popen[bytes], socket.socket],
) -> None:
    sock = agent_proc[1]
    sock.setblocking(False)
    both = encode({"op": "hello", "id": 1, "versions": [1], "nonce": "n"}) + encode(
        {"op": "health", "id": 2}
    )
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(sock, both)
    dec, got = Decoder(), []
    while len(got) < 2:
        data = await asyncio.wait_for(loop.sock_recv(sock, 65536), 10)
        assert data
        got += [f.header for f in dec.feed(data)]
    assert [(h["op"], h["id"]) for h in got] == [("result", 1), ("result", 2)]


class _HookHandler(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length", "0"))
        data = self.rfile.read(n)
        status = 200 if self.path.endswith("/ready") else 503
        out = b"echo:" + data + b":" + self.headers.get("X-Test", "").encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, format: str, *args: object) -> None:
        return None


@pytest.fixture
def hook_server() -> Iterator[int]:
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _HookHandler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv.server_address[1]
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(5)


async def test_http_relay_calls_hooks_inside_the_guest(
    client: AgentClient, hook_server: int
) -> None:
    r = await client.http_request(hook_server, "/aws/lambda-microvms/runtime/v1/ready",
                                  body=b"payload", headers=[("X-Test", "yes")])  # fmt: skip
    assert (r.status, r.body, r.truncated) == (200, b"echo:payload:yes", False)
    r = await client.http_request(hook_server, "/aws/lambda-microvms/runtime/v1/validate")
    assert r.status == 503


async def test_http_relay_to_a_closed_port_is_connection_refused(
    client: AgentClient, hook_server: int
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(GuestError, match="connection_refused"):
        await client.http_request(free, "/")
    assert await client.tcp_probe(free) is False
    assert await client.tcp_probe(hook_server) is True


async def test_http_relay_rejects_header_injection(client: AgentClient, hook_server: int) -> None:
    with pytest.raises(GuestError, match="bad_request"):
        await client.http_request(hook_server, "/x", headers=[("X-A", "b\r\nEvil: 1")])


def ignored_mask(status: str) -> int:
    line = next(x for x in status.splitlines() if x.startswith("SigIgn:"))
    return int(line.split()[1], 16)


async def test_a_terminal_starts_with_the_terminal_signals_at_their_defaults() -> None:
    # An agent that inherited SIGINT, SIGTERM and SIGHUP ignored (PID 1 before it learned
    # better; any background job) must not pass that on: Ctrl-C has to stop the shell's
    # programs.
    ignored = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
    async with local_agent(ignored_signals=ignored) as agent:
        pty = await agent.open_pty(["sh", "-c", "cat /proc/self/status"])
        out = b""
        async with asyncio.timeout(10):
            async for chunk in pty:
                out += chunk
        mask = ignored_mask(out.decode(errors="replace"))
        assert [sig for sig in ignored if mask & (1 << (sig - 1))] == []
