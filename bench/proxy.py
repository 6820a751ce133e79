"""Endpoint proxy benchmark: requests/s and latency with wrk (HTTP/1.1) and h2load (HTTP/2).

    .venv/bin/python bench/proxy.py            # human table
    .venv/bin/python bench/proxy.py --json     # machine-readable

Loopback only. The upstream is nginx serving a small static file (faster than the proxy, so
the proxy's own cost shows). Measured in one run, same client settings each time:
  (a) straight to the upstream, (b) through Embervm's EndpointProxy (real token checks, header
  stripping, keep-alive upstream), (c) through nginx configured as a reverse proxy to the same
  upstream. Targets (docs/PERFORMANCE.md): (b) ≥ 0.5x (c) requests/s, and (b) adds ≤ 1 ms at p50
  over (a). nginx and the proxy each get one worker process (the proxy is one asyncio loop).
Runs in about a minute; every process it starts is stopped before it exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchprocs import cpu_seconds, free_port, process

VM_ID = "mvm-0123456789abcdef0123"
DOMAIN = "microvm.localhost"
DURATION = 8
CONNECTIONS = 32


NGINX_UPSTREAM = """
worker_processes 1; daemon off; pid {root}/up.pid; error_log {root}/up.err;
events {{ worker_connections 4096; }}
http {{ access_log off;
  server {{ listen 127.0.0.1:{port}; keepalive_requests 1000000;
    location / {{ root {root}/www; }} }}
  server {{ listen 127.0.0.1:{h2port} http2; keepalive_requests 1000000;
    location / {{ root {root}/www; }} }} }}
"""

NGINX_PROXY = """
worker_processes 1; daemon off; pid {root}/px.pid; error_log {root}/px.err;
events {{ worker_connections 4096; }}
http {{ access_log off;
  upstream app {{ server 127.0.0.1:{upstream}; keepalive 64; }}
  server {{ listen 127.0.0.1:{port}; listen 127.0.0.1:{h2port} http2;
    keepalive_requests 1000000;
    location / {{ proxy_pass http://app; proxy_http_version 1.1;
      proxy_set_header Connection ""; proxy_set_header X-aws-proxy-auth ""; }} }} }}
"""


def nginx(root: Path, name: str, conf: str) -> list[str]:
    path = root / f"{name}.conf"
    path.write_text(conf)
    return ["nginx", "-c", str(path), "-p", str(root)]


def wrk(port: int, headers: dict[str, str], connections: int = CONNECTIONS) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{DURATION}s", "--latency"]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    out = subprocess.run([*argv, f"http://127.0.0.1:{port}/index.html"], capture_output=True,
                         text=True, check=True, timeout=DURATION + 30).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"50%\s+([\d.]+)(us|ms|s)", out)
    assert p50 is not None, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p50.group(2)]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": float(p50.group(1)) * scale,
            "non_2xx": float(errors.group(1)) if errors else 0.0}  # fmt: skip


def h2load(port: int, headers: dict[str, str]) -> dict[str, float]:
    argv = ["h2load", "-c8", "-m16", f"-D{DURATION}", "--warm-up-time=1"]
    for key, value in headers.items():
        argv += ["-H", f"{key}: {value}"]
    out = subprocess.run([*argv, f"http://127.0.0.1:{port}/index.html"], capture_output=True,
                         text=True, check=True, timeout=DURATION + 30).stdout  # fmt: skip
    rps = float(re.search(r"finished in .*?, ([\d.]+) req/s", out).group(1))  # type: ignore[union-attr]
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    assert codes is not None, out
    return {"rps": rps, "ok": float(codes.group(1)),
            "non_2xx": float(sum(int(n) for n in codes.groups()[1:]))}  # fmt: skip


def nginx_worker(root: Path, name: str) -> int:
    master = int((root / f"{name}.pid").read_text())
    return int(Path(f"/proc/{master}/task/{master}/children").read_text().split()[0])


def with_cpu(
    pid: int, measure: Callable[[], dict[str, float]], seconds: float = DURATION
) -> dict[str, float]:
    """``measure`` plus the CPU µs process ``pid`` spent per request meanwhile (``seconds`` of
    load at the measured rate): steadier than requests/s on a machine that others share."""
    before = cpu_seconds(pid)
    row = measure()
    row["cpu_us_per_request"] = (cpu_seconds(pid) - before) / (row["rps"] * seconds) * 1e6
    return row


def serve_proxy(port: int, upstream: int, keys: Path) -> None:
    """Child process: an EndpointProxy whose only VM is the upstream on 127.0.0.1."""
    from embervm.config import Settings
    from embervm.core.lifecycle import RESOLVE_TTL, ResolvedVm
    from embervm.core.tokens import TokenAuthority
    from embervm.proxy import EndpointProxy
    from embervm.server.app import event_loop_factory

    # 4 GiB: its connection limit (256) is above h2load's 8 x 16 streams, each of which takes
    # its own app connection (a smaller VM answers most of them 429, and that is not relaying)
    vm = ResolvedVm(VM_ID, "RUNNING", frozenset({"ALL_INGRESS"}), "127.0.0.1", False, "", 4096)

    class Routes:
        """Like core's Lifecycle: a lookup is fresh for RESOLVE_TTL, then awaited again."""

        fetched = -RESOLVE_TTL

        async def resolve(self, microvm_id: str) -> ResolvedVm:
            self.fetched = time.monotonic()
            return vm

        def resolved(self, microvm_id: str) -> ResolvedVm | None:
            return vm if time.monotonic() - self.fetched < RESOLVE_TTL else None

        async def ensure_running(self, microvm_id: str) -> ResolvedVm:
            return vm

        def record_activity(self, microvm_id: str) -> None:
            return None

    class NoShells:
        async def open_shell(self, vm_id: str, *, cols: int, rows: int) -> Any:
            raise RuntimeError("no shells here")

    async def main() -> None:
        settings = Settings(data_dir=keys.parent, proxy_port=free_port(), proxy_http_port=port)
        proxy = EndpointProxy(settings, lifecycle=Routes(), tokens=TokenAuthority(keys),
                              shells=NoShells())  # fmt: skip
        await proxy.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await proxy.stop()

    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:  # as `embervm server`
        runner.run(main())


def run() -> dict[str, Any]:
    from embervm.contracts import PortGrant
    from embervm.core.tokens import TokenAuthority

    root = Path(tempfile.mkdtemp(prefix="embervm-bench-proxy-"))
    try:
        root.chmod(0o755)
        (root / "www").mkdir()
        (root / "www" / "index.html").write_text("hello from the upstream\n")
        up, up2, px, px2, ep = (free_port() for _ in range(5))
        keys = root / "keys.json"
        token = TokenAuthority(keys).issue(VM_ID, kind="endpoint", ports=PortGrant(all_ports=True),
                                           expires_in_minutes=60)  # fmt: skip
        auth = {"Host": f"{VM_ID}.{DOMAIN}", "X-aws-proxy-auth": token,
                "X-aws-proxy-port": str(up)}  # fmt: skip
        ours = [sys.executable, __file__, "--serve-proxy", str(ep), str(up), str(keys)]
        results: dict[str, Any] = {}
        with (
            process(nginx(root, "up", NGINX_UPSTREAM.format(root=root, port=up, h2port=up2)), up),
            process(
                nginx(root, "px", NGINX_PROXY.format(root=root, port=px, h2port=px2, upstream=up)),
                px,
            ),
            process(ours, ep) as proxy,
        ):
            worker = nginx_worker(root, "px")
            results["latency_direct"] = wrk(up, {}, connections=1)
            results["latency_embervm"] = wrk(ep, auth, connections=1)
            results["latency_nginx"] = wrk(px, {"X-aws-proxy-auth": token}, connections=1)
            results["http1_direct"] = wrk(up, {})
            results["http1_embervm"] = with_cpu(proxy.pid, lambda: wrk(ep, auth))
            results["http1_nginx"] = with_cpu(worker, lambda: wrk(px, {"X-aws-proxy-auth": token}))
            results["h2c_direct"] = h2load(up2, {})
            h2_auth = {(":authority" if k == "Host" else k): v for k, v in auth.items()}
            warm = DURATION + 1  # h2load's warm-up second is load too
            results["h2c_embervm"] = with_cpu(proxy.pid, lambda: h2load(ep, h2_auth), warm)
            results["h2c_nginx"] = with_cpu(worker, lambda: h2load(px2, {}), warm)
        one, two = results["http1_embervm"], results["http1_nginx"]
        results["ratio_rps_vs_nginx"] = one["rps"] / two["rps"]
        results["added_p50_ms"] = (
            results["latency_embervm"]["p50_ms"] - results["latency_direct"]["p50_ms"]
        )
        results["h2_ratio_rps_vs_nginx"] = (
            results["h2c_embervm"]["rps"] / results["h2c_nginx"]["rps"]
        )
        return results
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve-proxy", nargs=3, metavar=("PORT", "UPSTREAM", "KEYS"))
    args = parser.parse_args()
    if args.serve_proxy:
        port, upstream, keys = args.serve_proxy
        serve_proxy(int(port), int(upstream), Path(keys))
        return 0
    results = run()
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{'case (latency_*: 1 connection; others: 32)':<16}")
    print(f"{'case':<16}{'req/s':>10}{'p50 ms':>10}{'CPU µs/req':>12}")
    for name in ("latency_direct", "latency_embervm", "latency_nginx",
                 "http1_direct", "http1_embervm", "http1_nginx",
                 "h2c_direct", "h2c_embervm", "h2c_nginx"):  # fmt: skip
        row = results[name]
        p50 = f"{row['p50_ms']:.2f}" if "p50_ms" in row else "-"
        cpu = f"{row['cpu_us_per_request']:.1f}" if "cpu_us_per_request" in row else "-"
        bad = row["non_2xx"]
        refused = f"  ({bad:.0f} answers not 2xx: not a valid run)" if bad else ""
        print(f"{name:<16}{row['rps']:>10.0f}{p50:>10}{cpu:>12}{refused}")
    ratio, added = results["ratio_rps_vs_nginx"], results["added_p50_ms"]
    print(f"HTTP/1.1 embervm/nginx req/s: {ratio:.2f}x (target >= 0.5) "
          f"{'MET' if ratio >= 0.5 else 'MISSED'}")  # fmt: skip
    print(f"HTTP/1.1 added p50 vs direct, one connection: {added:.2f} ms (target <= 1 ms) "
          f"{'MET' if added <= 1.0 else 'MISSED'}")  # fmt: skip
    print(f"HTTP/2 (h2c) embervm/nginx req/s: {results['h2_ratio_rps_vs_nginx']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
