"""A fleet's API process wakes the VM's host with ``NOTIFY`` (real PostgreSQL): the host, whose
poll is set to a minute here, runs the VM at once — the wake-up did it, not the poll."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from tests.framework.core_unit_harness import ACCOUNT, REGION, image_params
from tests.framework.fake_core import FakeBuilder, FakeHost, FakeTokens

from embervm.config import Settings
from embervm.core import Caller, CoreLimits, Operations
from embervm.store import HostFence, Placement, open_repository

CALLER = Caller("AKIDTEST", ACCOUNT, REGION)


async def test_the_api_wakes_the_host_and_it_runs_the_vm_without_waiting_for_its_poll(
    postgres_url: str, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", region=REGION, account_id=ACCOUNT, database_url=postgres_url
    )
    api_repo = await open_repository(postgres_url)
    host_repo = await open_repository(postgres_url)
    host = await host_repo.register("h1", "10.0.0.5:8790", 1, 16384, {}, 60.0)
    common = {
        "settings": settings,
        "builder": FakeBuilder(settings.images_dir),
        "tokens": FakeTokens(),
        "limits": CoreLimits(rate_limits={}),
    }
    api = Operations(
        repository=api_repo, host=FakeHost(), runs_vms=False, placement=Placement(),
        hosts=api_repo, host_id="api", **common,  # type: ignore[arg-type]
    )  # fmt: skip
    backend = FakeHost()
    worker = Operations(
        repository=host_repo, host=backend, host_id="h1", hosts=host_repo,
        fence=HostFence("h1", host.epoch), **common,  # type: ignore[arg-type]
    )  # fmt: skip
    # The image is built by a process that runs builds itself (builds in a fleet come later).
    builder = Operations(repository=api_repo, host=FakeHost(), **common)  # type: ignore[arg-type]
    adopting: asyncio.Task[None] | None = None
    try:
        await builder.invoke("CreateMicrovmImage", image_params(), CALLER)
        await builder.supervisor.idle()
        adopting = asyncio.create_task(worker.supervisor.keep_adopting(poll_seconds=60.0))
        await asyncio.sleep(0.5)  # the first look after LISTEN is done
        vm = await api.invoke("RunMicrovm", {"imageIdentifier": "web"}, CALLER)
        async with asyncio.timeout(10):
            while backend.count("launch") == 0:  # noqa: ASYNC110 - counting a fake's calls
                await asyncio.sleep(0.02)
        await worker.supervisor.idle()
        got = await api.invoke("GetMicrovm", {"microvmIdentifier": vm["microvmId"]}, CALLER)
        assert got["state"] == "RUNNING"
    finally:
        if adopting is not None:
            adopting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await adopting
        for ops in (api, worker, builder):
            await ops.stop()
        await api_repo.close()
        await host_repo.close()
