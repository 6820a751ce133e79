"""What a fleet's proxy reads of core's ``Lifecycle`` (over a real SQLite store): the host a VM
is placed on, and ``Admission.reresolve``, which reads the store again where ``admit`` would
have kept answering from the cache."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.framework.core_unit_harness import Rig, make_rig

from embervm.contracts import PortGrant
from embervm.core.tokens import TokenAuthority
from embervm.proxy.admission import Admission, Ask, Refusal

pytestmark = pytest.mark.timeout(60)

DOMAIN = "microvm.localhost"


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[Rig]:
    rig = await make_rig(tmp_path)
    try:
        yield rig
    finally:
        await rig.ops.stop()
        await rig.repo.close()


async def test_reresolve_reads_the_store_where_admit_answers_from_the_cache(
    core: Rig, tmp_path: Path
) -> None:
    await core.image()
    vm_id = (await core.run())["microvmId"]
    lifecycle = core.ops.lifecycle
    lifecycle._monotonic = lambda: 0.0  # what core resolved stays fresh: only forget drops it
    tokens = TokenAuthority(tmp_path / "tokens.json")
    admission = Admission(DOMAIN, lifecycle, tokens)
    token = tokens.issue(vm_id, kind="endpoint", ports=PortGrant(all_ports=True),
                         expires_in_minutes=5)  # fmt: skip
    ask = Ask(vm_id, 8080, token, "http")

    first = await admission.admit(ask)
    assert (first.host_id, first.address) == ("local", core.host.address(vm_id))

    # the VM moved (as a fleet's resume elsewhere would write it); core's cache has not heard
    await core.repo.update_microvm(vm_id, {"host_id": "host-b", "address": "10.0.0.9"})
    assert await admission.admit(ask) == first
    assert admission.admit_now(ask) == first

    moved = await admission.reresolve(first)
    assert (moved.host_id, moved.address, moved.port) == ("host-b", "10.0.0.9", 8080)
    assert admission.admit_now(ask) == moved  # the cache holds what the store said

    await core.repo.update_microvm(vm_id, {"host_id": "host-c"})
    lifecycle.forget("mvm-00000000000000000000")  # not known: nothing to drop
    lifecycle.forget(vm_id)
    assert lifecycle.resolved(vm_id) is None
    assert (await lifecycle.resolve(vm_id)).host_id == "host-c"

    await core.call("TerminateMicrovm", {"microvmIdentifier": vm_id})
    await core.settle()
    with pytest.raises(Refusal) as gone:
        await admission.reresolve(moved)
    assert (gone.value.status, gone.value.message) == (404, "MicroVM not found")
