"""Many client connections held open against one VM through the real proxy: the control API
still answers, the VM still serves a new connection, and every held connection got its
answers. ``bench/chaos_server.py connections`` holds 1,000 and measures the API's latency."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
from tests.framework.chaos_server_harness import (
    APP_NAME,
    HeldConnections,
    chaos_server,
    hold_connections,
    poll,
    raise_nofile_limit,
    write_app,
)
from tests.framework.server_harness import LiveServer, build_image, run_vm, token

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

HELD = 200
#: A 4 GiB VM accepts 256 app connections (proxy.admission.connection_limit): all 200 held
#: connections keep theirs and one more still fits.
MEMORY_MIB = 4096
TRICKLE = 1.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    with chaos_server(tmp_path_factory.mktemp("chaos-load")) as live:
        image = build_image(
            live,
            APP_NAME,
            write_app(live.data_dir / "app-src"),
            resources=[{"minimumMemoryInMiB": MEMORY_MIB}],
        )
        assert image["state"] == "CREATED", image
        yield live


class HeldInThread:
    """``hold_connections`` on its own event loop in a thread, beside the test's API calls."""

    def __init__(self, server: LiveServer, vm_id: str, auth: str) -> None:
        self.loop = asyncio.new_event_loop()
        self.stop_event = asyncio.Event()
        self.seen = HeldConnections()
        self.holding = hold_connections(
            server, vm_id, auth, count=HELD, trickle=TRICKLE, stop=self.stop_event, seen=self.seen
        )
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self.holding)

    def answers(self) -> int:
        return sum(self.seen.statuses.values())

    def stop(self) -> HeldConnections:
        self.loop.call_soon_threadsafe(self.stop_event.set)
        self.thread.join(120)
        assert not self.thread.is_alive()
        self.loop.close()
        return self.seen


def test_the_server_answers_while_200_connections_are_held_open(server: LiveServer) -> None:
    raise_nofile_limit()
    vm_id = str(run_vm(server, APP_NAME)["microvmId"])
    auth = token(server, vm_id)
    client = server.client()
    held = HeldInThread(server, vm_id, auth)
    held.thread.start()
    try:
        # Every connection has answered at least twice: all are open and trickling.
        poll(lambda: held.answers() >= 2 * HELD, 120, "two rounds")
        for _ in range(10):
            assert client.get_microvm(microvmIdentifier=vm_id)["state"] == "RUNNING"
            assert any(vm["microvmId"] == vm_id for vm in client.list_microvms()["items"])
        fresh = server.get(vm_id, auth, timeout=30)
        assert fresh.status_code == 200, fresh.text
    finally:
        seen = held.stop()
    assert seen.open_most == HELD, seen
    assert set(seen.statuses) == {200}, seen
    assert not seen.errors, seen
    assert seen.reconnects == 0, seen
