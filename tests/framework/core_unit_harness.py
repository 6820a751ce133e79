"""The rig of core's unit tests: ``Operations`` over a real SQLite store in a tmp dir, with the
fakes of ``tests.framework.fake_core`` behind every seam and a clock moved by hand."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from tests.framework.fake_core import (
    FakeAppLogs,
    FakeBuilder,
    FakeBuildLogs,
    FakeClock,
    FakeHost,
    FakeTokens,
)

from embervm.config import Settings
from embervm.core import Caller, CoreLimits, Operations
from embervm.model import validate_output
from embervm.store import SqlRepository, open_repository

ACCOUNT = "123456789012"
REGION = "us-east-1"
BASE = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian12"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/build"
ALL_INGRESS = "arn:aws:lambda:us-east-1:aws:network-connector:aws-network-connector:ALL_INGRESS"


def image_params(name: str = "web", **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "baseImageArn": BASE,
        "buildRoleArn": ROLE,
        "codeArtifact": {"uri": "file:///tmp/app.zip"},
        **extra,
    }


@dataclasses.dataclass
class Rig:
    ops: Operations
    repo: SqlRepository
    host: FakeHost
    builder: FakeBuilder
    tokens: FakeTokens
    clock: FakeClock
    settings: Settings
    build_logs: FakeBuildLogs
    app_logs: FakeAppLogs
    caller: Caller = dataclasses.field(
        default_factory=lambda: Caller("AKIDEXAMPLE", ACCOUNT, REGION)
    )

    async def call(
        self, operation: str, params: dict[str, Any] | None = None, caller: Caller | None = None
    ) -> dict[str, Any]:
        out = await self.ops.invoke(operation, dict(params or {}), caller or self.caller)
        violations = validate_output(operation, out)
        assert violations == [], violations
        return out

    async def settle(self) -> None:
        await self.ops.supervisor.idle()

    async def image(self, name: str = "web", **extra: Any) -> dict[str, Any]:
        """An image whose first build has finished."""
        await self.call("CreateMicrovmImage", image_params(name, **extra))
        await self.settle()
        return await self.call("GetMicrovmImage", {"imageIdentifier": name})

    async def run(self, image: str = "web", **params: Any) -> dict[str, Any]:
        """A VM that has finished launching (RUNNING unless the launch failed)."""
        out = await self.call("RunMicrovm", {"imageIdentifier": image, **params})
        await self.settle()
        return await self.call("GetMicrovm", {"microvmIdentifier": out["microvmId"]})

    async def state(self, vm_id: str) -> str:
        return str((await self.call("GetMicrovm", {"microvmIdentifier": vm_id}))["state"])


async def make_rig(
    tmp_path: Path,
    *,
    limits: CoreLimits | None = None,
    clock: FakeClock | None = None,
    host: FakeHost | None = None,
) -> Rig:
    settings = Settings(data_dir=tmp_path / "data", region=REGION, account_id=ACCOUNT)
    repo = await open_repository(settings.effective_database_url)
    host = host or FakeHost()
    builder = FakeBuilder(settings.images_dir)
    tokens = FakeTokens()
    clock = clock or FakeClock()
    build_logs = FakeBuildLogs()
    app_logs = FakeAppLogs()
    ops = Operations(
        settings=settings,
        repository=repo,
        host=host,
        builder=builder,
        tokens=tokens,
        clock=clock,
        limits=limits or CoreLimits(rate_limits={}),
        build_logs=build_logs,
        app_logs=app_logs,
    )
    await ops.supervisor.start()  # recovery only; tests drive lifecycle ticks by hand
    return Rig(ops, repo, host, builder, tokens, clock, settings, build_logs, app_logs)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    r = await make_rig(tmp_path)
    try:
        yield r
    finally:
        await r.ops.stop()
        await r.repo.close()


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until ``predicate`` holds (gates count waiters; no event to await)."""
    while not predicate():  # noqa: ASYNC110 - polling a fake's counter, bounded by the test timeout
        await asyncio.sleep(0.001)
