"""Fleet tunnel benchmark: what the host's tunnel adds to an HTTP/1.1 keep-alive client.

    .venv/bin/python bench/tunnel.py            # human table
    .venv/bin/python bench/tunnel.py --json     # machine-readable

Loopback only. The upstream stands in for a guest's app: nginx serving a small static file
(one worker; faster than the tunnel, so the tunnel's own cost shows). The client is an asyncio
HTTP/1.1 keep-alive client on uvloop (this process) that sends a request, reads the whole
answer, and sends the next, on each of its connections. Measured in one run, same client each
time: (a) client → upstream directly (``asyncio.open_connection``, what the proxy does on one
host), (b) client → ``TunnelListener`` (a child process on uvloop, as ``embervm server`` runs)
→ upstream, the connections opened with ``dial_via_host`` (preamble, HMAC, answer). Printed:
requests/s of (b) / (a) with 32 connections, the p50 latency (b) adds on one connection, the
tunnel process's CPU per request, and what opening a connection costs each way.
Runs in about 30 s; every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from benchprocs import cpu_seconds, free_port, process

VM_ID = "mvm-0123456789abcdef0123"
DURATION = 5.0
CONNECTIONS = 32
DIALS = 500
REQUEST = b"GET /index.html HTTP/1.1\r\nHost: app\r\n\r\n"

NGINX_UPSTREAM = """
worker_processes 1; daemon off; pid {root}/up.pid; error_log {root}/up.err;
events {{ worker_connections 4096; }}
http {{ access_log off;
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000; keepalive_timeout 600s;
    location / {{ root {root}/www; }} }} }}
"""

Streams = tuple[asyncio.StreamReader, asyncio.StreamWriter]
Opener = Callable[[], Awaitable[Streams]]


def serve_tunnel(port: int, key_hex: str) -> None:
    """Child process: a TunnelListener whose only VM's guest is 127.0.0.1 (the upstream)."""
    from embervm.host.tunnel import TunnelListener
    from embervm.server.app import event_loop_factory

    async def main() -> None:
        listener = TunnelListener(
            bytes.fromhex(key_hex),
            lambda vm: "127.0.0.1" if vm == VM_ID else None,
            host="127.0.0.1",
            port=port,
            on_activity=lambda vm: None,  # as a host would: a cheap call, once a second
        )
        await listener.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await listener.stop()

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # as `embervm server`
        runner.run(main())


async def exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """One request, its whole answer (a Content-Length body)."""
    writer.write(REQUEST)
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200 "):
        raise RuntimeError(f"upstream answered {head[:40]!r}")
    at = head.lower().index(b"content-length:") + len(b"content-length:")
    await reader.readexactly(int(head[at : head.index(b"\r\n", at)]))


async def load(open_: Opener, connections: int, seconds: float) -> dict[str, float]:
    """Requests on ``connections`` kept-alive connections for ``seconds``: req/s, p50."""
    streams = [await open_() for _ in range(connections)]
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clock = time.perf_counter
        while (started := clock()) < deadline:
            await exchange(reader, writer)
            latencies.append(clock() - started)

    began = time.perf_counter()
    await asyncio.gather(*(client(r, w) for r, w in streams))
    elapsed = time.perf_counter() - began
    for _, writer in streams:
        writer.close()
    return {"rps": len(latencies) / elapsed, "p50_ms": statistics.median(latencies) * 1e3,
            "requests": float(len(latencies))}  # fmt: skip


async def dials(open_: Opener, count: int) -> dict[str, float]:
    """Open ``count`` connections one after the other, each with one exchange: p50 of the
    opening alone, and of the opening plus the first exchange."""
    opened, first = [], []
    for _ in range(count):
        started = time.perf_counter()
        reader, writer = await open_()
        opened.append(time.perf_counter() - started)
        await exchange(reader, writer)
        first.append(time.perf_counter() - started)
        writer.close()
    return {"open_p50_ms": statistics.median(opened) * 1e3,
            "first_byte_p50_ms": statistics.median(first) * 1e3}  # fmt: skip


async def measure(upstream: int, tunnel: int, key: bytes, tunnel_pid: int) -> dict[str, Any]:
    from embervm.proxy.host_dial import dial_via_host

    async def direct() -> Streams:
        return await asyncio.open_connection("127.0.0.1", upstream, limit=64 * 1024)

    async def tunnelled() -> Streams:
        address = f"127.0.0.1:{tunnel}"
        return await dial_via_host(address, key, VM_ID, upstream, timeout=10)

    results: dict[str, Any] = {}
    await load(direct, 4, 0.5)  # warm both paths up
    await load(tunnelled, 4, 0.5)
    results["latency_direct"] = await load(direct, 1, DURATION)
    results["latency_tunnel"] = await load(tunnelled, 1, DURATION)
    results["load_direct"] = await load(direct, CONNECTIONS, DURATION)
    before = cpu_seconds(tunnel_pid)
    row = await load(tunnelled, CONNECTIONS, DURATION)
    row["tunnel_cpu_us_per_request"] = (cpu_seconds(tunnel_pid) - before) / row["requests"] * 1e6
    results["load_tunnel"] = row
    results["dial_direct"] = await dials(direct, DIALS)
    results["dial_tunnel"] = await dials(tunnelled, DIALS)
    results["ratio_rps"] = results["load_tunnel"]["rps"] / results["load_direct"]["rps"]
    results["added_p50_ms"] = (
        results["latency_tunnel"]["p50_ms"] - results["latency_direct"]["p50_ms"]
    )
    results["added_open_p50_ms"] = (
        results["dial_tunnel"]["open_p50_ms"] - results["dial_direct"]["open_p50_ms"]
    )
    return results


def run() -> dict[str, Any]:
    import uvloop

    root = Path(tempfile.mkdtemp(prefix="embervm-bench-tunnel-"))
    try:
        root.chmod(0o755)
        (root / "www").mkdir()
        (root / "www" / "index.html").write_text("hello from the upstream\n")
        upstream, tunnel = free_port(), free_port()
        key = os.urandom(32)
        conf = root / "up.conf"
        conf.write_text(NGINX_UPSTREAM.format(root=root, port=upstream))
        ours = [sys.executable, __file__, "--serve-tunnel", str(tunnel), key.hex()]
        with (
            process(["nginx", "-c", str(conf), "-p", str(root)], upstream),
            process(ours, tunnel) as listener,
        ):
            results = uvloop.run(measure(upstream, tunnel, key, listener.pid))
        results["connections"] = CONNECTIONS
        results["seconds"] = DURATION
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-tunnel", nargs=2, metavar=("PORT", "KEY_HEX"))
    args = parser.parse_args()
    if args.serve_tunnel:
        port, key_hex = args.serve_tunnel
        serve_tunnel(int(port), key_hex)
        return 0
    results = run()
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'case':<16}{'req/s':>10}{'p50 ms':>10}{'tunnel CPU µs/req':>19}")
    for name in ("latency_direct", "latency_tunnel", "load_direct", "load_tunnel"):
        row = results[name]
        cpu = row.get("tunnel_cpu_us_per_request")
        print(f"{name:<16}{row['rps']:>10.0f}{row['p50_ms']:>10.3f}"
              f"{'-' if cpu is None else f'{cpu:.1f}':>19}")  # fmt: skip
    print(f"(latency_*: 1 connection; load_*: {CONNECTIONS} connections; {DURATION:g} s each)")
    for name in ("dial_direct", "dial_tunnel"):
        row = results[name]
        print(f"{name:<16}open p50 {row['open_p50_ms']:.3f} ms, "
              f"open + first answer p50 {row['first_byte_p50_ms']:.3f} ms")  # fmt: skip
    print(f"tunnel/direct req/s ({CONNECTIONS} connections): {results['ratio_rps']:.2f}x")
    print(f"added p50 per request (1 connection): {results['added_p50_ms']:.3f} ms")
    print(f"added p50 to open a connection: {results['added_open_p50_ms']:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
