"""Server-level chaos: a real ``embervm server`` killed with SIGKILL, and what must be true of
the host after it restarts on the same data dir (``check_reality``).

``hold_connections`` keeps many HTTP/1.1 client connections open through the endpoint proxy.
Used by ``test_chaos_server_*.py`` and ``bench/chaos_server.py``. The app is a stdlib HTTP/1.1
server (keep-alive, a request counter in memory): its image builds in one VM boot, no ``RUN``,
so a chaos test pays no package download.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.framework.integration_cache import test_cache_dir
from tests.framework.server_harness import LiveServer, free_port, token, zip_dir

from embervm.host._boot import vm_dir_name
from embervm.network._names import VmNames, netns_prefix
from embervm.vmm.snapshot import load_manifest

APP_NAME = "chaos-counter"
STABLE = ("RUNNING", "SUSPENDED", "TERMINATED")
RECOVERY_TIMEOUT = 120.0

APP_DOCKERFILE = """\
FROM embervm/debian12
COPY app.py /app/app.py
EXPOSE 8080
CMD ["python3", "-u", "/app/app.py"]
"""

APP_SOURCE = """\
import itertools
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COUNT = itertools.count(1)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: the 1,000-connection bench holds them open

    def do_GET(self):
        body = f"count:{next(COUNT)}".encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer.request_queue_size = 2048
ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def write_app(folder: Path, *, marker: str = "") -> Path:
    """The app's build context; a ``marker`` makes its code (and so its build) new."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(APP_DOCKERFILE)
    (folder / "app.py").write_text(APP_SOURCE + (f"# {marker}\n" if marker else ""))
    return folder


def zip_app(server: LiveServer, folder: Path, name: str) -> str:
    """The build context zipped into the server's uploads folder; its ``file://`` URI."""
    return zip_dir(folder, server.data_dir / "uploads" / f"{name}.zip").as_uri()


@contextlib.contextmanager
def chaos_server(data_dir: Path, *extra_args: str) -> Iterator[LiveServer]:
    """A server on free ports over ``data_dir``; at the end every VM is terminated before it
    stops and any QEMU left is killed (running VMs and their networks outlive a server by
    design: left on the host, a network holds its pool's addresses for good)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    if not (data_dir / "artifacts").exists():
        (data_dir / "artifacts").symlink_to(test_cache_dir() / "artifacts")
    server = LiveServer(
        data_dir, free_port(), free_port(), free_port(), extra_args=list(extra_args)
    )
    server.start()
    try:
        yield server
    finally:
        try:
            _terminate_every_vm(server)
        finally:
            server.stop()
            for pid in vmm_pids(data_dir):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


def _terminate_every_vm(server: LiveServer) -> None:
    """Kill every QEMU (the server's watchers release those VMs), terminate the VMs still
    held (suspended ones), and wait until none is left: the server then stops with no VM
    network, so it removes its host table and resolver link too."""
    if server.process is None or server.process.poll() is not None:
        server.start()  # a test ended with it dead: its restart reclaims what the kill left
    for pid in vmm_pids(server.data_dir / "vms"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    client = server.client()
    for vm_id in _all_vm_ids(server):
        with contextlib.suppress(Exception):  # one the watcher ended meanwhile
            client.terminate_microvm(microvmIdentifier=vm_id)
    poll(lambda: not _all_vm_ids(server), RECOVERY_TIMEOUT, "every VM terminated")


def kill_and_restart(server: LiveServer) -> None:
    """SIGKILL the server (no shutdown code runs), then start it again on the same data dir
    and ports; ``start`` returns once it printed its ready line (recovery is done)."""
    assert server.process is not None
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(30)
    server.stop()
    server.start()


def poll(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll fast (20 ms): a chaos test kills the server at a moment that may last ~100 ms."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


# -- reality ------------------------------------------------------------------------------------


def _qemu_cmdlines() -> Iterator[tuple[int, bytes]]:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                cmdline = (proc / "cmdline").read_bytes()
                if b"qemu-system" in cmdline:
                    yield int(proc.name), cmdline


def vmm_pids(under: Path) -> list[int]:
    """Live QEMU processes whose command line names a path under ``under``."""
    needle = str(under).encode()
    return [pid for pid, cmdline in _qemu_cmdlines() if needle in cmdline and _alive(pid)]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def vm_workdir(server: LiveServer, vm_id: str) -> Path:
    return server.data_dir / "vms" / vm_dir_name(vm_id)


def vm_pids(server: LiveServer, vm_id: str) -> list[int]:
    return vmm_pids(vm_workdir(server, vm_id) / "")


def build_vm_pids(server: LiveServer) -> list[int]:
    return vmm_pids(server.data_dir / "build-vms")


def server_netns(server: LiveServer) -> set[str]:
    prefix = netns_prefix(server.network_tag)
    with contextlib.suppress(FileNotFoundError):
        return {name for name in os.listdir("/run/netns") if name.startswith(prefix)}
    return set()


def nft_table(server: LiveServer) -> str:
    table = f"embervm_{server.network_tag}"
    done = subprocess.run(
        ["nft", "list", "table", "inet", table], capture_output=True, text=True, check=False
    )
    return done.stdout


def wait_stable(server: LiveServer, vm_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every VM's record once none is in a transitional state."""
    client = server.client()

    def records() -> list[dict[str, dict[str, Any]]]:
        got = {v: client.get_microvm(microvmIdentifier=v) for v in vm_ids}
        return [got] if all(r["state"] in STABLE for r in got.values()) else []

    found: list[dict[str, dict[str, Any]]] = poll(records, RECOVERY_TIMEOUT, "stable VM states")
    return found[0]


def _all_vm_ids(server: LiveServer) -> list[str]:
    """Every VM of the server not TERMINATED (other tests' VMs too)."""
    client, ids = server.client(), []
    more: dict[str, str] = {}
    while True:
        page = client.list_microvms(**more)
        ids += [vm["microvmId"] for vm in page["items"] if vm["state"] != "TERMINATED"]
        if not page.get("nextToken"):
            return ids
        more = {"nextToken": page["nextToken"]}


def check_reality(server: LiveServer, vm_ids: list[str]) -> dict[str, dict[str, Any]]:
    """Every record stable and true: RUNNING has exactly one live QEMU and serves through the
    proxy, SUSPENDED has a loadable snapshot and no QEMU, TERMINATED has no QEMU, files or
    network; no QEMU, namespace or nftables entry belongs to nobody. Returns the records."""
    records = wait_stable(server, vm_ids)
    holding = [v for v, r in records.items() if r["state"] != "TERMINATED"]
    for vm_id, record in records.items():
        state, pids = record["state"], vm_pids(server, vm_id)
        workdir = vm_workdir(server, vm_id)
        if state == "RUNNING":
            assert len(pids) == 1, (vm_id, state, pids)
            answer = server.get(vm_id, token(server, vm_id), timeout=30)
            assert answer.status_code == 200, answer.text
            assert answer.text.startswith("count:"), answer.text
        elif state == "SUSPENDED":
            assert pids == [], (vm_id, state, pids)
            load_manifest(workdir / "suspend", verify_hashes=True)
        else:
            assert pids == [], (vm_id, state, pids)
            assert not workdir.exists(), (vm_id, sorted(p.name for p in workdir.iterdir()))
            assert record.get("stateReason"), record
    everyone = set(vmm_pids(server.data_dir / ""))
    holding = [v for v in _all_vm_ids(server) if v not in records or v in holding]
    theirs = {pid for v in holding for pid in vm_pids(server, v)}
    assert everyone == theirs, f"QEMU processes of no VM: {sorted(everyone - theirs)}"
    expected_netns = {VmNames.derive(v, server.network_tag).netns for v in holding}
    assert server_netns(server) <= expected_netns, server_netns(server) - expected_netns
    table = nft_table(server)
    for vm_id, record in records.items():
        if record["state"] == "TERMINATED":
            link = VmNames.derive(vm_id, server.network_tag).host_link
            assert link not in table, f"nftables still names {link} of {vm_id}"
    return records


# -- many client connections held open through the proxy ----------------------------------------


@dataclass
class HeldConnections:
    """What ``hold_connections`` saw: answers by status, connections open now and at most,
    how many had to reconnect (the proxy closes a connection it answers 429), errors."""

    statuses: Counter[int] = field(default_factory=Counter)
    open_now: int = 0
    open_most: int = 0
    reconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def opened(self) -> None:
        self.open_now += 1
        self.open_most = max(self.open_most, self.open_now)


def raise_nofile_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (1,000 sockets need more than the usual 1,024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


async def hold_connections(
    server: LiveServer,
    vm_id: str,
    auth: str,
    *,
    count: int,
    trickle: float,
    stop: asyncio.Event,
    seen: HeldConnections,
) -> HeldConnections:
    """``count`` HTTP/1.1 keep-alive client connections to the VM's endpoint through the
    proxy, each sending a request with a valid token every ``trickle`` seconds until ``stop``.
    A connection the proxy answers 429 (the VM's app-connection limit) and closes is opened
    again after ``trickle`` seconds, so ``count`` connections keep trying all along. ``seen``
    is updated as answers come (the caller may read it meanwhile)."""
    request = (
        f"GET / HTTP/1.1\r\nHost: {vm_id}.microvm.localhost\r\nx-aws-proxy-auth: {auth}\r\n\r\n"
    ).encode()

    async def one(index: int) -> None:
        await asyncio.sleep(trickle * index / count)  # spread the first requests
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", server.proxy_http_port)
            except OSError as exc:
                seen.errors[type(exc).__name__] += 1
                await _pause(stop, trickle)
                continue
            seen.opened()
            try:
                while not stop.is_set():
                    writer.write(request)
                    status, close = await _answer(reader)
                    seen.statuses[status] += 1
                    if close:
                        seen.reconnects += 1
                        break
                    await _pause(stop, trickle)
            except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
                seen.errors[type(exc).__name__] += 1
            finally:
                seen.open_now -= 1
                writer.close()
            await _pause(stop, trickle)

    await asyncio.gather(*(one(i) for i in range(count)))
    return seen


async def _pause(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _answer(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """(status, whether the server closes after it) of one answer, its body read."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 60)
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    await reader.readexactly(int(fields.get("content-length", "0")))
    return int(lines[0].split()[1]), fields.get("connection", "").lower() == "close"
