"""Ready/validate hooks over a real HTTP server on 127.0.0.1 playing the app, driven both
directly and through a whole ImageBuild (fake VMs whose app port forwards to the server)."""

from __future__ import annotations

import asyncio
import zipfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.framework.fake_imagebuild import FakeMachineProvider

from embervm.errors import BuildFailure
from embervm.imagebuild import BuildSpec, ImageBuild
from embervm.imagebuild.cache import LocalLayerCache
from embervm.imagebuild.log import MemoryBuildLog
from embervm.imagebuild.ready import HOOK_PATH, HookSettings, http_hook, wait_for_hook

pytestmark = pytest.mark.integration
ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"


@dataclass
class HookServer:
    """Answers each POST to a hook path with the next scripted status (the last repeats)."""

    statuses: dict[str, list[int]]
    seen: list[str] = field(default_factory=list)
    port: int = 0
    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            method, path, _ = request.split(b"\r\n", 1)[0].decode().split(" ", 2)
            hook = path.removeprefix(HOOK_PATH)
            self.seen.append(f"{method} {hook}")
            script = self.statuses.get(hook, [404])
            status = script[min(self.seen.count(f"{method} {hook}"), len(script)) - 1]
            reason = {200: "OK", 503: "Service Unavailable"}.get(status, "Other")
            head = f"HTTP/1.1 {status} {reason}\r\nContent-Length: 0\r\nConnection: close"
            writer.write(f"{head}\r\n\r\n".encode())
            await writer.drain()
        finally:
            writer.close()

    async def __aenter__(self) -> HookServer:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def caller(port: int):  # type: ignore[no-untyped-def]
    async def call(hook: str, attempt: float) -> int | None:
        return await http_hook(("127.0.0.1", port), hook, attempt)

    return call


@pytest.fixture
async def hooks_503_503_200() -> AsyncIterator[HookServer]:
    async with HookServer({"ready": [503, 503, 200], "validate": [503, 200]}) as server:
        yield server


async def test_ready_hook_503_503_200_is_retried(hooks_503_503_200: HookServer) -> None:
    server = hooks_503_503_200
    await wait_for_hook("ready", caller(server.port), timeout=10, interval=0.05)
    assert server.seen == ["POST ready"] * 3


async def test_never_ready_hook_fails_at_its_timeout() -> None:
    async with HookServer({"ready": [503]}) as server:
        with pytest.raises(BuildFailure, match=r"ready hook did not answer 200 within 0.5 s"):
            await wait_for_hook("ready", caller(server.port), timeout=0.5, interval=0.05)
        assert len(server.seen) >= 2


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(
            "Dockerfile", "FROM embervm/debian12\nCOPY app.py /app/\nCMD python3 /app/app.py\n"
        )
        zf.writestr("app.py", "print('hi')\n")
    return path


async def test_image_build_waits_for_ready_then_validates_the_restored_snapshot(
    tmp_path: Path, hooks_503_503_200: HookServer
) -> None:
    server = hooks_503_503_200
    provider = FakeMachineProvider(port_map={9000: server.port})
    log = MemoryBuildLog()
    spec = BuildSpec(
        base_image_arn=ARN,
        code_artifact=_zip(tmp_path / "a.zip"),
        snapshot_dir=tmp_path / "snapshot",
        work_dir=tmp_path / "work",
        hooks=HookSettings(port=9000, ready=True, ready_timeout=10, validate=True),
    )
    result = await ImageBuild(
        spec, provider=provider, cache=LocalLayerCache(tmp_path / "c"), log=log
    ).run()
    assert server.seen == ["POST ready"] * 3 + ["POST validate"] * 2
    assert [a.restored for a in provider.app_machines] == [False, True]
    assert provider.all_shut_down()
    assert result.snapshot_dir.is_dir()
    assert sum("ready hook: HTTP 503" in m for m in log.messages("build")) == 2


async def test_image_build_with_never_ready_hook_fails_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    async with HookServer({"ready": [503]}) as server:
        provider = FakeMachineProvider(port_map={8080: server.port})
        log = MemoryBuildLog()
        spec = BuildSpec(
            base_image_arn=ARN,
            code_artifact=_zip(tmp_path / "a.zip"),
            snapshot_dir=tmp_path / "snapshot",
            work_dir=tmp_path / "work",
            hooks=HookSettings(ready=True, ready_timeout=0.5),
        )
        with pytest.raises(BuildFailure, match=r"ready hook did not answer 200 within 0.5 s"):
            await ImageBuild(
                spec, provider=provider, cache=LocalLayerCache(tmp_path / "c"), log=log
            ).run()
    assert provider.all_shut_down()
    assert not (tmp_path / "snapshot").exists()
    assert list((tmp_path / "work").iterdir()) == []
    assert log.closed == "FAILED"


async def test_validate_failure_removes_the_snapshot(tmp_path: Path) -> None:
    async with HookServer({"ready": [200], "validate": [500]}) as server:
        provider = FakeMachineProvider(port_map={8080: server.port})
        spec = BuildSpec(
            base_image_arn=ARN,
            code_artifact=_zip(tmp_path / "a.zip"),
            snapshot_dir=tmp_path / "snapshot",
            work_dir=tmp_path / "work",
            hooks=HookSettings(ready=True, validate=True, validate_timeout=5),
        )
        with pytest.raises(BuildFailure, match="validate hook answered HTTP 500"):
            await ImageBuild(
                spec,
                provider=provider,
                cache=LocalLayerCache(tmp_path / "c"),
                log=MemoryBuildLog(),
            ).run()
    assert not (tmp_path / "snapshot").exists()
    assert provider.all_shut_down()
