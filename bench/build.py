"""Rebuild after an app-only change vs first build (target, docs/PERFORMANCE.md: ≤ 0.25x).

Builds examples/flask-counter twice with one layer cache: first with an empty cache, then after
appending a comment to app.py, so the second build reuses every step before ``COPY app.py``.
Prints both times and the ratio. Uses the runtime's own build machines
(``embervm.host.open_machine_provider``: real microVMs, real ``pip install`` through the VM's
network, layers frozen with QMP, a real memory snapshot at the end), with the guest artifacts
of the integration-test cache and a network tag of its own. ``--self-test`` runs the same
harness on the fake VMs of ``tests.framework.fake_imagebuild`` (its times measure only the harness).

    .venv/bin/python bench/build.py [--self-test] [--example grpc-websocket]

``BENCH_TRACE=1`` prints each build's log with the time of every line (stderr).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

from embervm.config import Settings
from embervm.host import open_machine_provider
from embervm.imagebuild import (
    BuildSpec,
    ImageBuild,
    LocalLayerCache,
    MachineProvider,
    MemoryBuildLog,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]  # `python bench/build.py`: the fakes are ``tests.framework``
EXAMPLE = ROOT / "examples" / "flask-counter"
ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"
TARGET_RATIO = 0.25
BENCH_POOL = "10.225.0.0/16"  # its own addresses: a server may run beside it


def zip_dir(folder: Path, dest: Path) -> Path:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(folder).as_posix())
    return dest


@contextlib.asynccontextmanager
async def fake_provider(settings: Settings) -> AsyncIterator[MachineProvider]:
    from tests.framework.fake_imagebuild import FakeMachineProvider

    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield FakeMachineProvider(port_map={8080: port})
    finally:
        server.close()
        await server.wait_closed()


async def timed_build(
    provider: MachineProvider, archive: Path, work: Path, cache: Path, name: str, egress: bool
) -> tuple[float, Any]:
    spec = BuildSpec(
        base_image_arn=ARN,
        code_artifact=archive,
        snapshot_dir=work / name / "snapshot",
        work_dir=work / "scratch",
        egress=egress,
        step_timeout=600,
    )
    log = MemoryBuildLog()
    started = time.perf_counter()
    result = await ImageBuild(spec, provider=provider, cache=LocalLayerCache(cache), log=log).run()
    elapsed = time.perf_counter() - started
    if os.environ.get("BENCH_TRACE"):  # where a build's time goes: its log, timed
        first = datetime.datetime.fromisoformat(log.records[0].ts)
        for record in log.records:
            at = (datetime.datetime.fromisoformat(record.ts) - first).total_seconds()
            print(f"  {name} +{at:6.2f}s [{record.stream}] {record.message[:110]}", file=sys.stderr)
    return elapsed, result


async def measure(
    opener: Callable[[Settings], AbstractAsyncContextManager[MachineProvider]],
    *,
    egress: bool = True,
    example: Path = EXAMPLE,
) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="embervm-bench-build-"))
    try:
        app = work / "app"
        shutil.copytree(example, app)
        first_zip = zip_dir(app, work / "v1.zip")
        with (app / "app.py").open("a") as fh:
            fh.write("\n# app-only change for the rebuild benchmark\n")
        second_zip = zip_dir(app, work / "v2.zip")
        settings = Settings(data_dir=work / "data", network_tag="bld", network_pool=BENCH_POOL)
        settings.data_dir.mkdir()
        cache_env = os.environ.get("EMBERVM_TEST_CACHE")
        shared = Path(cache_env) if cache_env else Path.home() / ".cache" / "embervm-test"
        (settings.data_dir / "artifacts").symlink_to(shared / "artifacts")
        async with opener(settings) as provider:
            cache = work / "cache"
            first, r1 = await timed_build(provider, first_zip, work, cache, "v1", egress)
            second, r2 = await timed_build(provider, second_zip, work, cache, "v2", egress)
        return {
            "first_build_s": round(first, 3),
            "rebuild_s": round(second, 3),
            "ratio": round(second / first, 3),
            "target_ratio": TARGET_RATIO,
            "steps": r1.steps_total,
            "steps_cached_on_rebuild": r2.steps_cached,
            "snapshot": r2.snapshot_build(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--self-test", action="store_true", help="run the harness on fake VMs")
    parser.add_argument("--example", default=EXAMPLE.name, help="folder under examples/")
    args = parser.parse_args()
    example = ROOT / "examples" / args.example
    if args.self_test:
        out = asyncio.run(measure(fake_provider, example=example))
        print("build bench SELF-TEST on fake VMs (measures only the harness, not Embervm):")
        print(json.dumps(out, indent=2))
        return 0
    out = asyncio.run(measure(open_machine_provider, example=example))
    verdict = "meets" if out["ratio"] <= TARGET_RATIO else "MISSES"
    print(
        f"build bench: first build {out['first_build_s']} s, rebuild after app-only change "
        f"{out['rebuild_s']} s, ratio {out['ratio']} ({verdict} the ≤ {TARGET_RATIO}x target; "
        f"{out['steps_cached_on_rebuild']}/{out['steps']} steps cached)"
    )
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
