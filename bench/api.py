"""Control API benchmark: latency of GetMicrovm, ListMicrovms and RunMicrovm under 50
concurrent SigV4-signed clients.

    .venv/bin/python bench/api.py            # human table
    .venv/bin/python bench/api.py --json     # machine-readable

The server is the production API + core + SQLite store (WAL) on uvicorn, in its own process on
127.0.0.1; only the runtime behind core is a fake (``FakeHost``: a launch completes at once,
no VM is booted), so RunMicrovm measures what the API call itself costs: validation, SigV4,
admission and the PENDING record in one transaction, the answer. Requests are signed before
the clock starts (the client would otherwise compete with the server for the two cores).
Target (docs/PERFORMANCE.md): RunMicrovm p50 ≤ 20 ms. Two loads: closed loop (each of the 50
clients sends again as soon as it has its answer: the server's saturation, where latency is
50 / throughput) and paced (each client sends one request a second: the latency a client sees
when the server is not saturated). Bounded: about 40 s.
"""

from __future__ import annotations

import argparse
import asyncio
import configparser
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # `python bench/api.py`: the fakes are ``tests.framework``

CONCURRENCY = 50
REQUESTS = 1500
TARGET_MS = 20.0
PACED_ROUNDS = 10  # paced: 50 clients x 1 request/s for about 10 s


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve(port: int, data_dir: Path) -> None:
    """Child process: the API over the real core and a SQLite store."""
    import uvicorn
    from tests.framework.fake_core import FakeBuilder, FakeHost, FakeTokens

    from embervm.api import CredentialStore, create_api_app
    from embervm.config import Settings
    from embervm.core import CoreLimits, Operations
    from embervm.store import open_repository

    async def main() -> None:
        settings = Settings(data_dir=data_dir)
        repo = await open_repository(settings.effective_database_url)
        limits = CoreLimits(rate_limits={}, max_microvms=None, max_total_memory_mib=None)
        ops = Operations(settings=settings, repository=repo, host=FakeHost(),
                         builder=FakeBuilder(settings.images_dir), tokens=FakeTokens(),
                         limits=limits)  # fmt: skip
        await ops.start()
        store = CredentialStore(settings.credentials_file)
        store.ensure()
        app = create_api_app(ops, store, settings=settings)
        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                http="httptools", lifespan="off", access_log=False)  # fmt: skip
        server = uvicorn.Server(config)
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, server.handle_exit, 15, None)
        await server.serve()
        await ops.stop()
        await repo.close()

    asyncio.run(main())


def _credentials(data_dir: Path) -> tuple[str, str]:
    parser = configparser.ConfigParser()
    parser.read(data_dir / "credentials")
    return parser["default"]["aws_access_key_id"], parser["default"]["aws_secret_access_key"]


async def _measure(url: str, requests: list[Any], pace: float = 0.0) -> dict[str, float]:
    """Closed loop (``pace`` 0: each client sends its next request when the last answered)
    or paced (each client sends one request every ``pace`` seconds)."""
    import httpx

    latencies: list[float] = []
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def worker() -> None:
            while not queue.empty():
                request = queue.get_nowait()
                if pace:  # spread the clients' sends over the period
                    await asyncio.sleep(pace * (0.5 + (len(latencies) % 7) / 7))
                started = time.perf_counter()
                response = await client.request(
                    request.method, request.target, headers=request.headers, content=request.body
                )
                latencies.append(time.perf_counter() - started)
                if response.status_code >= 300:
                    raise RuntimeError(f"{response.status_code}: {response.text[:200]}")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": len(latencies),
        "per_second": len(latencies) / elapsed,
        "p50_ms": latencies[len(latencies) // 2] * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99)] * 1000,
    }


def _cpu_seconds(pid: int) -> float:
    """User + system time of process ``pid`` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _measure_with_cpu(
    pid: int, url: str, requests: list[Any], pace: float = 0.0
) -> dict[str, float]:
    """``_measure`` plus the server's CPU time per request (steadier than req/s on a shared
    machine: the clients run on the same cores)."""
    before = _cpu_seconds(pid)
    row = asyncio.run(_measure(url, requests, pace))
    row["server_cpu_ms"] = (_cpu_seconds(pid) - before) / row["requests"] * 1000
    return row


def run() -> dict[str, Any]:
    import boto3
    from tests.framework.fake_api import signed_request

    data_dir = Path(tempfile.mkdtemp(prefix="embervm-bench-api-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    child = subprocess.Popen([sys.executable, __file__, "--serve", str(port), str(data_dir)])
    try:
        deadline = time.monotonic() + 60
        while not (data_dir / "credentials").exists() or _closed(port):
            if child.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start")
            time.sleep(0.1)
        key, secret = _credentials(data_dir)
        client = boto3.client("lambda-microvms", endpoint_url=url, region_name="us-east-1",
                              aws_access_key_id=key, aws_secret_access_key=secret)  # fmt: skip
        client.create_microvm_image(
            name="bench", baseImageArn="arn:aws:lambda:us-east-1:aws:microvm-image:debian12",
            buildRoleArn="arn:aws:iam::000000000000:role/build",
            codeArtifact={"uri": "file:///tmp/app.zip"},
        )  # fmt: skip
        while client.get_microvm_image(imageIdentifier="bench")["state"] == "CREATING":
            time.sleep(0.05)
        vm_id = client.run_microvm(imageIdentifier="bench")["microvmId"]

        def signed(operation: str, params: dict[str, Any]) -> list[Any]:
            return [signed_request(operation, params, access_key_id=key,
                                   secret_access_key=secret, endpoint=url)
                    for _ in range(REQUESTS)]  # fmt: skip

        results: dict[str, Any] = {}
        cases = {
            "GetMicrovm": {"microvmIdentifier": vm_id},
            "ListMicrovms": {"maxResults": 20},
            "RunMicrovm": {"imageIdentifier": "bench"},
        }
        for operation, params in cases.items():
            requests = signed(operation, params)
            results[operation] = _measure_with_cpu(child.pid, url, requests)
        paced = signed("RunMicrovm", cases["RunMicrovm"])[: CONCURRENCY * PACED_ROUNDS]
        results["RunMicrovm paced"] = _measure_with_cpu(child.pid, url, paced, pace=1.0)
        results["run_p50_vs_target"] = results["RunMicrovm"]["p50_ms"] / TARGET_MS
        return results
    finally:
        child.send_signal(signal.SIGTERM)
        try:
            child.wait(30)
        except subprocess.TimeoutExpired:
            child.kill()


def _closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "DATA_DIR"))
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]))
        return 0
    results = run()
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print(f"{CONCURRENCY} concurrent signed clients, {REQUESTS} requests per operation")
    print(f"{'operation':<18}{'req/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'CPU ms/req':>12}")
    for operation in ("GetMicrovm", "ListMicrovms", "RunMicrovm", "RunMicrovm paced"):
        row = results[operation]
        print(f"{operation:<18}{row['per_second']:>8.0f}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"
              f"{row['server_cpu_ms']:>12.2f}")  # fmt: skip
    ratio = results["run_p50_vs_target"]
    verdict = "MET" if ratio <= 1.0 else "MISSED"
    print(f"RunMicrovm p50 (closed loop) / 20 ms target: {ratio:.2f} {verdict}")
    paced = results["RunMicrovm paced"]["p50_ms"] / TARGET_MS
    print(f"RunMicrovm p50 (50 clients x 1/s) / 20 ms target: {paced:.2f} "
          f"{'MET' if paced <= 1.0 else 'MISSED'}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
