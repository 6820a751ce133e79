"""The supervisor split of a fleet (docs/FLEET.md), over one SQLite store: an API process's
``Operations`` (``runs_vms=False``, a ``Placement``) only writes intents; a host's
(``fence`` = its id and epoch) takes them with ``supervisor.adopt`` and drives its backend;
a host whose epoch is superseded can change nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests.framework.core_unit_harness import ACCOUNT, Rig, image_params, make_rig, until
from tests.framework.fake_core import FakeBuilder, FakeHost, FakeTokens

from embervm.core import CoreLimits, Operations
from embervm.store import (
    BuildFilter,
    HostFence,
    Page,
    Placement,
    SqlRepository,
    open_repository,
)
from embervm.store.schema import image_versions, microvms


@dataclass
class Fleet:
    rig: Rig  # one process (`embervm server`): only used to build the image
    api: Operations
    host: Operations
    host_backend: FakeHost
    repos: list[SqlRepository]

    async def call(self, operation: str, **params: object) -> dict[str, object]:
        return await self.api.invoke(operation, dict(params), self.rig.caller)  # type: ignore[arg-type]

    async def state(self, vm_id: str) -> str:
        return str((await self.call("GetMicrovm", microvmIdentifier=vm_id))["state"])

    async def host_works(self, ops: Operations | None = None) -> int:
        """The host adopts what is placed on it and finishes it."""
        worker = ops or self.host
        started = await worker.supervisor.adopt()
        await worker.supervisor.idle()
        return started


async def operations(
    rig: Rig,
    repo: SqlRepository,
    backend: FakeHost,
    builder: FakeBuilder | None = None,
    **role: object,
) -> Operations:
    ops = Operations(
        settings=rig.settings,
        repository=repo,
        host=backend,
        builder=builder or FakeBuilder(rig.settings.images_dir),
        tokens=FakeTokens(),
        limits=CoreLimits(rate_limits={}),
        **role,  # type: ignore[arg-type]
    )
    await ops.supervisor.start()
    return ops


@pytest.fixture
async def fleet(tmp_path: Path) -> AsyncIterator[Fleet]:
    rig = await make_rig(tmp_path)
    await rig.image()
    url = rig.settings.effective_database_url
    repos = [await open_repository(url) for _ in range(2)]
    host = await repos[1].register("h1", "10.0.0.5:8790", 100, 16384, {"accelerator": "tcg"}, 60)
    backend = FakeHost()
    api = await operations(
        rig, repos[0], FakeHost(), runs_vms=False, placement=Placement(), host_id="api"
    )
    worker = await operations(
        rig, repos[1], backend, host_id="h1", fence=HostFence("h1", host.epoch)
    )
    yield Fleet(rig, api, worker, backend, repos)
    for ops in (api, worker, rig.ops):
        await ops.stop()
    for repo in (*repos, rig.repo):
        await repo.close()


async def test_the_api_only_writes_intents_and_the_host_carries_them_out(fleet: Fleet) -> None:
    vm = await fleet.call("RunMicrovm", imageIdentifier="web")
    vm_id = str(vm["microvmId"])
    record = await fleet.repos[0].get_microvm(vm_id)
    assert record is not None
    assert (record.state, record.host_id, record.host_epoch) == ("PENDING", "h1", 1)
    assert fleet.host_backend.calls == []  # nothing ran in the API process
    assert await fleet.host_works() == 1
    assert await fleet.state(vm_id) == "RUNNING"
    assert fleet.host_backend.specs[vm_id].snapshot_dir.name == "snapshot"

    await fleet.call("SuspendMicrovm", microvmIdentifier=vm_id)
    assert await fleet.state(vm_id) == "SUSPENDING"
    assert await fleet.host_works() == 1
    assert await fleet.state(vm_id) == "SUSPENDED"

    await fleet.call("ResumeMicrovm", microvmIdentifier=vm_id)
    assert await fleet.state(vm_id) == "PENDING"
    assert await fleet.host_works() == 1
    assert await fleet.state(vm_id) == "RUNNING"

    await fleet.call("TerminateMicrovm", microvmIdentifier=vm_id)
    assert await fleet.host_works() == 1
    assert await fleet.state(vm_id) == "TERMINATED"
    assert [op for op, _ in fleet.host_backend.calls] == [
        "launch",
        "suspend",
        "resume",
        "terminate",
    ]
    assert await fleet.host_works() == 0  # nothing left to adopt


async def test_work_in_flight_is_not_adopted_twice(fleet: Fleet) -> None:
    vm_id = str((await fleet.call("RunMicrovm", imageIdentifier="web"))["microvmId"])
    fleet.host_backend.gates.hold("launch")
    assert await fleet.host.supervisor.adopt() == 1
    assert await fleet.host.supervisor.adopt() == 0  # the launch is still in flight
    fleet.host_backend.gates.release("launch")
    await fleet.host.supervisor.idle()
    assert fleet.host_backend.count("launch", vm_id) == 1
    assert await fleet.state(vm_id) == "RUNNING"


async def test_a_host_whose_epoch_was_superseded_can_change_nothing(fleet: Fleet) -> None:
    vm_id = str((await fleet.call("RunMicrovm", imageIdentifier="web"))["microvmId"])
    await fleet.host_works()
    assert await fleet.state(vm_id) == "RUNNING"
    await fleet.call("SuspendMicrovm", microvmIdentifier=vm_id)
    # The host restarts (a new epoch); the old process, still alive, tries the suspend.
    await fleet.repos[1].register("h1", "10.0.0.5:8790", 100, 16384, {"accelerator": "tcg"}, 60)
    assert await fleet.host_works() == 1  # the VM was placed at its epoch: it does the work
    assert fleet.host_backend.count("suspend", vm_id) == 1
    assert await fleet.state(vm_id) == "SUSPENDING"  # but its SUSPENDED was fenced off


async def test_a_vm_whose_image_version_is_gone_is_not_launched(fleet: Fleet) -> None:
    vm_id = str((await fleet.call("RunMicrovm", imageIdentifier="web"))["microvmId"])
    async with fleet.repos[0].engine.begin() as conn:  # the API refuses this; a bad row does not
        await conn.execute(image_versions.update().values(snapshot_dir=None))
    assert await fleet.host_works() == 0
    assert fleet.host_backend.calls == []
    vm = await fleet.call("GetMicrovm", microvmIdentifier=vm_id)
    assert vm["state"] == "TERMINATED"
    assert str(vm["stateReason"]).startswith("LaunchFailed")


async def test_a_host_adopts_on_its_poll_without_any_wake_up(fleet: Fleet) -> None:
    """SQLite carries no NOTIFY: the poll alone must pick the work up."""
    worker = asyncio.create_task(fleet.host.supervisor.keep_adopting(poll_seconds=0.02))
    try:
        vm_id = str((await fleet.call("RunMicrovm", imageIdentifier="web"))["microvmId"])
        async with asyncio.timeout(10):
            while await fleet.state(vm_id) != "RUNNING":  # noqa: ASYNC110 - the store is the signal
                await asyncio.sleep(0.01)
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker


async def test_an_image_built_in_a_fleet_is_built_by_the_host_that_takes_it(
    fleet: Fleet,
) -> None:
    params = image_params("api-built")
    image = await fleet.call("CreateMicrovmImage", **params)
    assert image["state"] == "CREATING"
    await fleet.api.supervisor.idle()
    version = await fleet.repos[0].get_version(ACCOUNT, "api-built", 1)
    assert version is not None
    assert version.state == "PENDING"  # the API process built nothing
    await fleet.host_works()
    built = await fleet.call("GetMicrovmImage", imageIdentifier="api-built")
    assert built["state"] == "CREATED"
    builds = await fleet.repos[0].list_builds(ACCOUNT, "api-built", 1, Page(limit=5), BuildFilter())
    assert [(b.state, b.host_id, b.host_epoch) for b in builds] == [("SUCCESSFUL", "h1", 1)]


async def test_the_builds_of_a_lost_host_fail_and_a_restarted_host_fails_its_old_ones(
    tmp_path: Path,
) -> None:
    rig = await make_rig(tmp_path)
    url = rig.settings.effective_database_url
    repo = await open_repository(url)
    host = await repo.register("h1", "10.0.0.5:8790", 100, 16384, {}, 60)
    slow = FakeBuilder(rig.settings.images_dir)
    slow.gates.hold("build")
    api = await operations(rig, repo, FakeHost(), runs_vms=False, host_id="api")
    worker = await operations(rig, repo, FakeHost(), slow, host_id="h1", fence=HostFence("h1", 1))
    try:
        await api.invoke("CreateMicrovmImage", image_params("a"), rig.caller)
        await api.invoke("CreateMicrovmImage", image_params("b"), rig.caller)
        assert await worker.supervisor.adopt() == 1  # one build slot (CoreLimits' default)
        assert await worker.supervisor.adopt() == 0  # full: "b" waits for a host
        await until(lambda: len(slow.jobs) == 1)  # "a" is IN_PROGRESS on h1
        await api.supervisor.builds.fail_builds_of(["h2"])  # another host: nothing
        assert await state(api, rig, "a") == "CREATING"
        await api.supervisor.builds.fail_builds_of(["h1"])
        assert (await state(api, rig, "a"), await state(api, rig, "b")) == (
            "CREATE_FAILED",
            "CREATING",  # never taken: it still waits
        )
        slow.gates.release("build")
        await until(lambda: len(slow.jobs) == 1)
        await worker.supervisor.idle()  # "a" ends: its result is refused (it failed meanwhile)
        assert await state(api, rig, "a") == "CREATE_FAILED"
        slow.gates.hold("build")
        assert await worker.supervisor.adopt() == 1  # now "b"
        await until(lambda: len(slow.jobs) == 2)
        restarted = await repo.register("h1", "10.0.0.5:8790", 100, 16384, {}, 60)
        worker.supervisor.set_fence(HostFence("h1", restarted.epoch))
        await worker.supervisor.builds.fail_interrupted()
        assert await state(api, rig, "b") == "CREATE_FAILED"
        assert host.epoch == 1
    finally:
        slow.gates.release("build")
        for ops in (api, worker, rig.ops):
            await ops.stop()
        await repo.close()
        await rig.repo.close()


async def state(ops: Operations, rig: Rig, image: str) -> str:
    got = await ops.invoke("GetMicrovmImage", {"imageIdentifier": image}, rig.caller)
    return str(got["state"])


async def test_terminating_a_suspended_vm_of_a_lost_host_needs_no_host(fleet: Fleet) -> None:
    vm_id = str((await fleet.call("RunMicrovm", imageIdentifier="web"))["microvmId"])
    await fleet.host_works()
    await fleet.call("SuspendMicrovm", microvmIdentifier=vm_id)
    await fleet.host_works()
    async with fleet.repos[0].engine.begin() as conn:  # what the reaper leaves of it
        await conn.execute(microvms.update().values(host_epoch=None))
    await fleet.call("TerminateMicrovm", microvmIdentifier=vm_id)
    assert await fleet.state(vm_id) == "TERMINATED"  # not TERMINATING forever
    assert await fleet.host_works() == 0
