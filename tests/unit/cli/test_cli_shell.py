"""``embervm shell``: the terminal's raw mode (always restored), the WebSocket's subprotocols,
stdin pumped to the VM, the VM's output and exit code, with a fake WebSocket."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import signal
import socket
import ssl
import sys
import termios
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import typer
from botocore.stub import Stubber

from embervm.cli import shell
from embervm.cli._context import CliError

VM = "mvm-0123456789abcdef"
ENDPOINT = f"https://{VM}.microvm.localhost:8443"


class FakeWs:
    """A WebSocket: ``incoming`` is what the VM sends, ``sent`` what we sent."""

    def __init__(self, incoming: list[bytes | str] | None = None, fail_send: bool = False):
        self.incoming = incoming or []
        self.sent: list[bytes | str] = []
        self.closed = False
        self.fail_send = fail_send

    def send(self, message: bytes | str) -> None:
        if self.fail_send:
            raise ConnectionError("closed")
        self.sent.append(message)

    def close(self) -> None:
        self.closed = True

    def __iter__(self) -> Iterator[bytes | str]:
        return iter(self.incoming)


class _Stdin:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


@pytest.fixture
def stdin_pipe(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """``sys.stdin`` is a pipe; yields the end the test writes to."""
    read, write = os.pipe()
    monkeypatch.setattr(sys, "stdin", _Stdin(read))
    yield write
    with contextlib.suppress(OSError):  # closed by the test already
        os.close(write)
    os.close(read)


# -- the terminal ----------------------------------------------------------------------------


def test_raw_mode_is_set_inside_and_restored_after_an_error() -> None:
    leader, follower = os.openpty()
    try:
        before = termios.tcgetattr(follower)
        assert before[3] & termios.ICANON
        inside: list[int] = []

        def session() -> None:
            with shell.raw_terminal(follower):
                inside.append(termios.tcgetattr(follower)[3])
                raise RuntimeError("the VM went away")

        with pytest.raises(RuntimeError):
            session()
        assert not inside[0] & termios.ICANON
        assert termios.tcgetattr(follower) == before
    finally:
        os.close(leader)
        os.close(follower)


def test_raw_mode_leaves_a_pipe_alone() -> None:
    read, write = os.pipe()
    try:
        with shell.raw_terminal(read):
            pass
    finally:
        os.close(read)
        os.close(write)


def test_terminal_size_falls_back_to_80_by_24(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_terminal(_fd: int) -> os.terminal_size:
        raise OSError("not a tty")

    monkeypatch.setattr(sys, "stdout", _Stdin(1))
    monkeypatch.setattr(os, "get_terminal_size", no_terminal)
    assert shell.terminal_size() == (80, 24)
    monkeypatch.setattr(os, "get_terminal_size", lambda _fd: os.terminal_size((132, 50)))
    assert shell.terminal_size() == (132, 50)


# -- stdin -----------------------------------------------------------------------------------


def test_stdin_goes_to_the_vm_as_bytes_then_an_eof_message(stdin_pipe: int) -> None:
    ws = FakeWs()
    os.write(stdin_pipe, b"ls -l\n")
    os.close(stdin_pipe)
    shell._pump_stdin(ws, threading.Event())
    assert ws.sent == [b"ls -l\n", json.dumps({"type": "eof"})]


def test_stdin_pumping_ends_when_the_socket_refuses(stdin_pipe: int) -> None:
    ws = FakeWs(fail_send=True)
    os.write(stdin_pipe, b"x")
    shell._pump_stdin(ws, threading.Event())  # returns although stdin is still open
    assert ws.sent == []


def test_a_stopped_pump_reads_nothing(stdin_pipe: int) -> None:
    ws = FakeWs()
    os.write(stdin_pipe, b"typed after the end")
    stop = threading.Event()
    stop.set()
    shell._pump_stdin(ws, stop)
    assert ws.sent == []


# -- connecting ------------------------------------------------------------------------------


def _get_vm(stub: Stubber) -> None:
    stub.add_response(
        "get_microvm",
        {
            "microvmId": VM,
            "state": "RUNNING",
            "endpoint": ENDPOINT,
            "imageArn": "arn:aws:lambda:us-east-1:000000000000:microvm-image:web",
            "imageVersion": "1",
            "maximumDurationInSeconds": 60,
            "startedAt": dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
        },
        {"microvmIdentifier": VM},
    )


def test_connect_offers_the_shell_port_and_the_token_as_subprotocols(
    stub: Stubber, monkeypatch: pytest.MonkeyPatch
) -> None:
    import websockets.sync.client

    _get_vm(stub)
    dialled: list[tuple[str, int]] = []
    opened: dict[str, Any] = {}
    fake_sock = object()

    def create_connection(address: tuple[str, int], timeout: float) -> object:
        dialled.append(address)
        return fake_sock

    def connect(url: str, **kwargs: Any) -> str:
        opened.update(kwargs, url=url)
        return "ws"

    monkeypatch.setattr(ssl, "create_default_context", lambda **_kw: "tls")
    monkeypatch.setattr(socket, "create_connection", create_connection)
    monkeypatch.setattr(websockets.sync.client, "connect", connect)
    assert shell.connect_shell(VM, "tok") == "ws"
    assert dialled == [("127.0.0.1", 8443)]
    assert opened["url"] == f"wss://{VM}.microvm.localhost:8443/shell"
    assert opened["sock"] is fake_sock
    assert opened["ssl"] == "tls"
    assert opened["server_hostname"] == f"{VM}.microvm.localhost"
    assert opened["subprotocols"] == [
        "lambda-microvms",
        "lambda-microvms.port.8022",
        "lambda-microvms.authentication.tok",
    ]


def test_a_proxy_that_does_not_answer_is_exit_3(
    stub: Stubber, monkeypatch: pytest.MonkeyPatch
) -> None:
    _get_vm(stub)

    def refuse(address: tuple[str, int], timeout: float) -> object:
        raise ConnectionRefusedError("refused")

    monkeypatch.setattr(ssl, "create_default_context", lambda **_kw: "tls")
    monkeypatch.setattr(socket, "create_connection", refuse)
    with pytest.raises(CliError, match="cannot reach the endpoint proxy on port 8443") as raised:
        shell.connect_shell(VM, "tok")
    assert raised.value.exit_code == 3


# -- the session -----------------------------------------------------------------------------


@pytest.mark.usefixtures("ctx")
def test_a_session_writes_the_vms_bytes_and_exits_with_its_code(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str], stdin_pipe: int
) -> None:
    os.close(stdin_pipe)  # the reader thread ends at once
    ws = FakeWs(
        [
            b"$ ",
            "not json",
            json.dumps({"type": "other"}),
            b"bye\r\n",
            json.dumps({"type": "exit", "code": 3}),
            b"never written",
        ]
    )
    tokens: list[tuple[str, bool]] = []

    def issue(vm_id: str, *, minutes: int, port: int | None, for_shell: bool) -> str:
        tokens.append((vm_id, for_shell))
        return "tok"

    monkeypatch.setattr(shell, "issue_token", issue)
    monkeypatch.setattr(shell, "connect_shell", lambda vm_id, token: ws)
    monkeypatch.setattr(shell, "terminal_size", lambda: (100, 30))
    handler_before = signal.getsignal(signal.SIGWINCH)
    with pytest.raises(typer.Exit) as raised:
        shell.shell(VM)
    assert raised.value.exit_code == 3
    assert tokens == [(VM, True)]
    assert ws.sent[0] == json.dumps({"type": "resize", "cols": 100, "rows": 30})
    assert ws.closed
    assert signal.getsignal(signal.SIGWINCH) == handler_before
    assert capfd.readouterr().out == "$ bye\r\n"


@pytest.mark.usefixtures("ctx")
def test_a_session_the_vm_ends_without_a_code_is_exit_0(
    monkeypatch: pytest.MonkeyPatch, stdin_pipe: int
) -> None:
    os.close(stdin_pipe)
    ws = FakeWs([json.dumps({"type": "exit"})])
    monkeypatch.setattr(shell, "issue_token", lambda *_a, **_kw: "tok")
    monkeypatch.setattr(shell, "connect_shell", lambda vm_id, token: ws)
    with pytest.raises(typer.Exit) as raised:
        shell.shell(VM)
    assert raised.value.exit_code == 0
