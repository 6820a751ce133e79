"""The server's real backends on real TCG microVMs: PipelineImageBuilder builds an image with the
runtime's own build machines, LocalHostBackend runs it with its runtime hooks, BuildLogFiles and
AppLogFiles read what they wrote.

One image (``hooks_app``: records the hooks it gets, counts requests in memory) is built once
for the module; each test launches its own VMs from it and terminates them.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import zipfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from tests.framework.integration_cache import test_cache_dir

from embervm.config import Settings
from embervm.contracts import BuildJob, BuiltImage, VmSpec
from embervm.core.ids import new_microvm_id
from embervm.errors import BuildFailure, RuntimeFailure
from embervm.guest.artifacts import GuestArtifacts
from embervm.host import LocalHost, open_machine_provider
from embervm.host._boot import BootInputs
from embervm.host.applogs import AppLogFiles
from embervm.host.backend import LocalHostBackend
from embervm.host.imagebuilder import BuildLogFiles, PipelineImageBuilder
from embervm.network import NetworkManager
from embervm.vmm.accel import detect_accelerator

pytestmark = [
    pytest.mark.integration,
    pytest.mark.slow,
    pytest.mark.timeout(900),
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (netns, nftables, cgroups)"),
]

HERE = Path(__file__).parent
BASE_ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"
# Addresses of its own (a server, other tests or another run may be beside it).
POOL = f"10.217.{4 * secrets.randbelow(64)}.0/22"
HOOKS = {
    "port": 8080,
    "microvmHooks": {
        "run": "ENABLED", "runTimeoutInSeconds": 3,
        "resume": "ENABLED", "resumeTimeoutInSeconds": 5,
        "suspend": "ENABLED", "suspendTimeoutInSeconds": 5,
        "terminate": "ENABLED", "terminateTimeoutInSeconds": 5,
    },
}  # fmt: skip


@dataclass
class World:
    root: Path
    settings: Settings
    host: LocalHost
    backend: LocalHostBackend
    builder: PipelineImageBuilder
    build_logs: BuildLogFiles
    app_logs: AppLogFiles


def _shared_artifacts_dir() -> Path:
    return test_cache_dir() / "artifacts"


def _prepare(settings: Settings) -> None:
    settings.run_dir.mkdir(parents=True)
    (settings.data_dir / "artifacts").symlink_to(_shared_artifacts_dir())  # guest_artifacts'


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def world(guest_artifacts: GuestArtifacts) -> AsyncIterator[World]:
    root = Path(f"/tmp/emb-bk-{os.getpid()}")  # short: unix socket paths stay < 108 bytes
    settings = Settings(data_dir=root, network_tag="k" + secrets.token_hex(1), network_pool=POOL)
    await asyncio.to_thread(_prepare, settings)
    try:
        accel = await detect_accelerator(
            settings.run_dir / "accel.json", kernel=guest_artifacts.kernel
        )
        network = NetworkManager(root / "network", pool=POOL, tag=settings.network_tag)
        await network.start()
        try:
            host = LocalHost(
                settings.vms_dir, boot=BootInputs(guest_artifacts, accel), network=network
            )
            app_logs = AppLogFiles(root / "microvm-logs")
            async with open_machine_provider(settings, network=network) as machines:
                try:
                    yield World(
                        root=root,
                        settings=settings,
                        host=host,
                        backend=LocalHostBackend(host, app_logs),
                        builder=PipelineImageBuilder(settings, machines),
                        build_logs=BuildLogFiles(settings),
                        app_logs=app_logs,
                    )
                finally:
                    await host.shutdown()
                    await app_logs.close()
        finally:
            await network.stop()
    finally:
        await asyncio.to_thread(shutil.rmtree, root, True)


def zip_app(folder: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w") as zf:
        for path in sorted(folder.iterdir()):
            zf.write(path, path.name)
    return dest


def job(world: World, name: str, app: str, **request: Any) -> BuildJob:
    archive = zip_app(HERE / app, world.settings.uploads_dir / f"{name}.zip")
    return BuildJob(
        account_id=world.settings.account_id,
        image_name=name,
        image_arn=f"arn:aws:lambda:us-east-1:{world.settings.account_id}:microvm-image:{name}",
        version="1",
        build_id=secrets.token_hex(8),
        request={
            "baseImageArn": BASE_ARN,
            "codeArtifact": {"uri": archive.as_uri()},
            "resources": [{"minimumMemoryInMiB": 512}],
            "egressNetworkConnectors": [],
            **request,
        },
        memory_mib=512,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def image(world: World) -> BuiltImage:
    return await world.builder.build(job(world, "hooks", "hooks_app", hooks=HOOKS))


def vm_spec(image: BuiltImage, payload: str | None = None) -> VmSpec:
    return VmSpec(
        microvm_id=new_microvm_id(),
        snapshot_dir=image.snapshot_dir,
        egress=False,
        hooks=HOOKS,
        run_hook_payload=payload,
    )


async def get(world: World, vm_id: str, path: str = "/") -> httpx.Response:
    address = world.backend.address(vm_id)
    assert address is not None
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"http://{address}:8080{path}")
    assert response.status_code == 200, response.text
    return response


async def calls(world: World, vm_id: str) -> list[tuple[str, str, object]]:
    body = (await get(world, vm_id, "/calls")).json()
    return [(c["hook"], c["payload"], c["status"]) for c in body]


async def eventually(check: Callable[[], Any], what: str, limit: float = 60) -> None:
    """Poll ``check`` (sync or async) until it is truthy, at most ``limit`` seconds."""
    try:
        async with asyncio.timeout(limit):
            while True:
                result = check()
                if asyncio.iscoroutine(result):
                    result = await result
                if result:
                    return
                await asyncio.sleep(0.2)
    except TimeoutError:
        raise AssertionError(what) from None


async def app_log(world: World, vm_id: str) -> list[str]:
    return [line async for line in world.app_logs.lines(vm_id, follow=False)]


async def test_the_built_image_serves_at_the_vm_address_and_run_gets_the_payload(
    world: World, image: BuiltImage
) -> None:
    assert (image.snapshot_dir / "manifest.json").is_file()
    assert image.memory_mib == 512
    assert image.memory_snapshot_bytes > 0
    vm = vm_spec(image, payload="hello-payload")
    await world.backend.launch(vm)
    try:
        assert world.backend.is_running(vm.microvm_id)
        assert (await get(world, vm.microvm_id)).text == "count 1"
        assert await calls(world, vm.microvm_id) == [("run", "hello-payload", 200)]
    finally:
        await world.backend.terminate(vm.microvm_id)
    assert not world.backend.is_running(vm.microvm_id)
    assert world.backend.address(vm.microvm_id) is None
    await world.backend.terminate(vm.microvm_id)  # idempotent


async def test_suspend_then_resume_keeps_memory_and_calls_the_hooks_in_order(
    world: World, image: BuiltImage
) -> None:
    vm = vm_spec(image, payload="p")
    await world.backend.launch(vm)
    try:
        assert (await get(world, vm.microvm_id)).text == "count 1"
        outcome = await world.backend.suspend(vm.microvm_id, cancel=asyncio.Event())
        assert outcome.completed
        assert outcome.snapshot_bytes > 0
        assert not world.backend.is_running(vm.microvm_id)
        await world.backend.resume(vm.microvm_id)
        assert (await get(world, vm.microvm_id)).text == "count 2"
        assert await calls(world, vm.microvm_id) == [
            ("run", "p", 200),
            ("suspend", "", 503),  # not ready yet: retried within its timeout
            ("suspend", "", 200),
            ("resume", "", 200),
        ]
    finally:
        await world.backend.terminate(vm.microvm_id)


async def test_a_cancelled_suspend_keeps_the_vm_running(world: World, image: BuiltImage) -> None:
    vm = vm_spec(image)
    await world.backend.launch(vm)
    try:
        await get(world, vm.microvm_id, "/slow-suspend")  # the next /suspend takes 30 s
        cancel = asyncio.Event()
        suspend = asyncio.create_task(world.backend.suspend(vm.microvm_id, cancel=cancel))

        async def hook_started() -> bool:
            return ("suspend", "", "slow") in await calls(world, vm.microvm_id)

        await eventually(hook_started, "the /suspend hook was never called")
        cancel.set()
        outcome = await asyncio.wait_for(suspend, 60)
        assert not outcome.completed
        assert world.backend.is_running(vm.microvm_id)
        assert (await get(world, vm.microvm_id)).text == "count 1"
        already = asyncio.Event()
        already.set()
        assert not (await world.backend.suspend(vm.microvm_id, cancel=already)).completed
        assert (await get(world, vm.microvm_id)).text == "count 2"
    finally:
        await world.backend.terminate(vm.microvm_id)


async def test_a_suspend_cancelled_at_any_moment_leaves_a_whole_vm(
    world: World, image: BuiltImage
) -> None:
    """Cancels land in the hook, mid-snapshot or after the commit: whichever, the VM either
    runs on or is suspended and resumes, with its memory either way."""
    vm = vm_spec(image)
    await world.backend.launch(vm)
    try:
        for count, delay in enumerate((0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0), start=1):
            cancel = asyncio.Event()
            asyncio.get_running_loop().call_later(delay, cancel.set)
            outcome = await world.backend.suspend(vm.microvm_id, cancel=cancel)
            assert world.backend.is_running(vm.microvm_id) is not outcome.completed
            if outcome.completed:
                await world.backend.resume(vm.microvm_id)
            assert (await get(world, vm.microvm_id)).text == f"count {count}"
    finally:
        await world.backend.terminate(vm.microvm_id)


async def test_a_failing_resume_hook_terminates_the_vm(world: World, image: BuiltImage) -> None:
    vm = vm_spec(image)
    await world.backend.launch(vm)
    await get(world, vm.microvm_id, "/fail-resume")  # /resume will answer 500
    assert (await world.backend.suspend(vm.microvm_id, cancel=asyncio.Event())).completed
    with pytest.raises(RuntimeFailure) as failure:
        await world.backend.resume(vm.microvm_id)
    assert "resume hook" in str(failure.value)
    assert "HTTP 500" in str(failure.value)
    assert not world.backend.is_running(vm.microvm_id)
    assert world.backend.address(vm.microvm_id) is None
    await world.backend.terminate(vm.microvm_id)  # what core does next: nothing left to do
    assert list(world.settings.vms_dir.iterdir()) == []


async def test_a_run_hook_past_its_timeout_fails_the_launch_and_leaves_nothing(
    world: World, image: BuiltImage
) -> None:
    vm = vm_spec(image, payload="slow")  # the app answers /run after 6 s; the timeout is 3 s
    with pytest.raises(RuntimeFailure) as failure:
        await world.backend.launch(vm)
    assert "run hook" in str(failure.value)
    assert "3 s" in str(failure.value)
    assert not world.backend.is_running(vm.microvm_id)
    assert world.backend.address(vm.microvm_id) is None
    assert not (world.root / "microvm-logs" / f"{vm.microvm_id}.hooks.json").exists()
    assert list(world.settings.vms_dir.iterdir()) == []


async def test_app_logs_keep_the_last_lines_after_terminate(
    world: World, image: BuiltImage
) -> None:
    vm = vm_spec(image, payload="logged")
    await world.backend.launch(vm)

    async def run_logged() -> bool:
        return "hook run payload='logged' status=200" in await app_log(world, vm.microvm_id)

    await eventually(run_logged, "the app's output never reached the log")
    await world.backend.terminate(vm.microvm_id)
    lines = [line async for line in world.app_logs.lines(vm.microvm_id, follow=True)]
    assert "hook terminate payload='' status=200" in lines  # its last words, kept
    assert lines == await app_log(world, vm.microvm_id)  # follow ends: the VM is gone


async def test_build_logs_are_json_records_ending_with_the_outcome(
    world: World, image: BuiltImage
) -> None:
    followed = [json.loads(r) async for r in world.build_logs.lines("hooks", "1", follow=True)]
    read = [json.loads(r) async for r in world.build_logs.lines("hooks", "1", follow=False)]
    assert followed == read
    assert followed[-1]["stream"] == "end"
    assert followed[-1]["message"] == "SUCCESSFUL"
    assert any(r["step"] and "COPY app.py" in r["message"] for r in followed), followed[:5]
    assert [r async for r in world.build_logs.lines("hooks", "9", follow=False)] == []


async def test_a_failing_run_step_fails_the_build_with_a_readable_reason(world: World) -> None:
    with pytest.raises(BuildFailure) as failure:
        await world.builder.build(job(world, "broken", "failing_app"))
    reason = failure.value.reason
    assert "RUN" in reason
    assert "3" in reason
    version_dir = world.settings.images_dir / world.settings.account_id / "broken" / "1"
    assert not (version_dir / "snapshot").exists()
    assert not (version_dir / "work").exists()
    records = [json.loads(r) async for r in world.build_logs.lines("broken", "1", follow=True)]
    assert any("about to fail" in r["message"] for r in records)
    assert records[-1] == {**records[-1], "stream": "end", "message": "FAILED"}
    await world.builder.discard("broken", None)
    assert not version_dir.parent.exists()


async def test_a_build_without_logging_still_ends_its_log(world: World) -> None:
    no_logs = job(world, "quiet", "failing_app", logging={"disabled": {}})
    with pytest.raises(BuildFailure):
        await world.builder.build(no_logs)
    records = [json.loads(r) async for r in world.build_logs.lines("quiet", "1", follow=True)]
    assert [(r["stream"], r["message"]) for r in records] == [("end", "FAILED")]
    await world.builder.discard("quiet", "1")
    assert not (world.settings.images_dir / world.settings.account_id / "quiet" / "1").exists()
