"""``embervm shell ID``: an interactive terminal in a MicroVM over the endpoint's /shell WebSocket.

Binary frames carry terminal bytes both ways; text frames carry JSON control messages
(``{"type":"resize","cols":..,"rows":..}`` from us, ``{"type":"exit","code":N}`` from the VM).
The terminal is put in raw mode, so Ctrl-C and friends reach the guest; the VM's exit code
becomes ours.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Annotated, Any
from urllib.parse import urlsplit

import typer

from embervm.cli._app import current
from embervm.cli._context import CliError
from embervm.cli._errors import handle_errors
from embervm.cli.microvms import issue_token
from embervm.wire import SHELL_PORT


@contextlib.contextmanager
def raw_terminal(fd: int) -> Iterator[None]:
    """Raw mode for an interactive terminal; restored whatever happens."""
    if not os.isatty(fd):
        yield
        return
    import termios
    import tty

    saved = termios.tcgetattr(fd)
    try:
        tty.setraw(fd)
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def terminal_size() -> tuple[int, int]:
    try:
        size = os.get_terminal_size(sys.stdout.fileno())
    except OSError:
        return 80, 24
    return size.columns, size.lines


def _pump_stdin(ws: Any, stop: threading.Event) -> None:
    fd = sys.stdin.fileno()
    while not stop.is_set():
        try:
            data = os.read(fd, 4096)
        except OSError:
            break
        if not data:
            with contextlib.suppress(Exception):
                ws.send(json.dumps({"type": "eof"}))
            break
        try:
            ws.send(data)
        except Exception:
            break


def connect_shell(vm_id: str, token: str) -> Any:
    from websockets.sync.client import connect
    from websockets.typing import Subprotocol

    ctx = current()
    vm = ctx.client().get_microvm(microvmIdentifier=vm_id)
    parts = urlsplit(vm["endpoint"])
    host = parts.hostname or ""
    port = parts.port or 443
    tls = ctx.endpoint_tls()
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    except OSError as exc:
        raise CliError(f"cannot reach the endpoint proxy on port {port}: {exc}", 3) from exc
    return connect(
        f"wss://{host}:{port}/shell",
        sock=sock,
        ssl=tls,
        server_hostname=host,
        subprotocols=[
            Subprotocol("lambda-microvms"),
            Subprotocol(f"lambda-microvms.port.{SHELL_PORT}"),
            Subprotocol(f"lambda-microvms.authentication.{token}"),
        ],
        open_timeout=30,
        max_size=2**20,
    )


@handle_errors
def shell(
    vm_id: Annotated[str, typer.Argument(help="MicroVM id.")],
) -> None:
    """Open an interactive shell in a MicroVM (needs --shell at run time)."""
    token = issue_token(vm_id, minutes=60, port=None, for_shell=True)
    ws = connect_shell(vm_id, token)
    exit_code = 0
    stop = threading.Event()
    cols, rows = terminal_size()
    ws.send(json.dumps({"type": "resize", "cols": cols, "rows": rows}))

    def on_resize(_signum: int, _frame: object) -> None:
        c, r = terminal_size()
        with contextlib.suppress(Exception):
            ws.send(json.dumps({"type": "resize", "cols": c, "rows": r}))

    previous = signal.signal(signal.SIGWINCH, on_resize)
    reader = threading.Thread(target=_pump_stdin, args=(ws, stop), daemon=True)
    try:
        with raw_terminal(sys.stdin.fileno()):
            reader.start()
            for message in ws:
                if isinstance(message, bytes):
                    os.write(sys.stdout.fileno(), message)
                    continue
                try:
                    control = json.loads(message)
                except ValueError:
                    continue
                if isinstance(control, dict) and control.get("type") == "exit":
                    exit_code = int(control.get("code", 0))
                    break
    finally:
        stop.set()
        signal.signal(signal.SIGWINCH, previous)
        with contextlib.suppress(Exception):
            ws.close()
    raise typer.Exit(exit_code)


def register(app: typer.Typer) -> None:
    app.command()(shell)
