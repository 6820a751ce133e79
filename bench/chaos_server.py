"""Server-level chaos (issue #11 §6): the real ``embervm server`` SIGKILLed inside every
operation, and 1,000 client connections held open against one VM.

    .venv/bin/python bench/chaos_server.py kill              # every operation, every moment
    .venv/bin/python bench/chaos_server.py connections       # 1,000 held, API p50/p99
    .venv/bin/python bench/chaos_server.py connections --held 300 --seconds 20

``kill``: launch, suspend, resume, terminate and a build are each started, the server is
SIGKILLed at several moments inside them (right after the API accepted, once the VMM or the
snapshot's temp dir appears, a little later), restarted on the same data dir, and every record
is checked against the host (``check_reality``: RUNNING has one QEMU and serves through the
proxy, SUSPENDED a loadable snapshot and no QEMU, TERMINATED nothing left; no QEMU, netns or
nftables entry of nobody); a VM that survives must keep its memory (its counter goes on), a
killed build must fail with a reason and build again.

``connections``: one VM of 8 GiB (the largest size: 512 app connections), ``--held``
HTTP/1.1 keep-alive client connections (default 1,000) each sending a request with a valid
token every ``--trickle`` s through the proxy; a connection the proxy answers 429 (the VM's
app-connection limit) is closed by it and opened again after ``--trickle`` s, so the held
count stays. The connections run in a child process (the measuring process only measures).
GetMicrovm and ListMicrovms are timed (p50/p99) with no load and while the connections are
held, in the same run; the ratio is printed.

Wrap it in ``flock /tmp/embervm-vm.lock`` on shared machines. ``bench/chaos.py`` lists the
same scenarios (``scenarios()``).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

from chaoslib import Row, Scenario  # noqa: E402
from tests.framework.chaos_server_harness import (  # noqa: E402
    APP_NAME,
    HeldConnections,
    build_vm_pids,
    chaos_server,
    check_reality,
    hold_connections,
    kill_and_restart,
    poll,
    raise_nofile_limit,
    vm_pids,
    vm_workdir,
    write_app,
    zip_app,
)
from tests.framework.server_harness import (  # noqa: E402
    BASE_IMAGE_ARN,
    BUILD_ROLE,
    CONNECTOR,
    LiveServer,
    build_image,
    run_vm,
    token,
    wait_built,
    wait_for,
)

Moment = Callable[[LiveServer, str], object]


def _counter(server: LiveServer, vm_id: str) -> int:
    answer = server.get(vm_id, token(server, vm_id), timeout=30)
    assert answer.status_code == 200, answer.text
    return int(answer.text.split(":")[1])


def _state(server: LiveServer, vm_id: str) -> str:
    return str(server.client().get_microvm(microvmIdentifier=vm_id)["state"])


def _settle(server: LiveServer, vm_id: str, state: str) -> None:
    wait_for(lambda: _state(server, vm_id), lambda s: s == state, 120, state)


def _at_once(server: LiveServer, vm_id: str) -> object:
    return True


def _vmm_started(server: LiveServer, vm_id: str) -> object:
    try:
        return poll(lambda: vm_pids(server, vm_id), 60, "the VMM")
    except AssertionError:
        vm = server.client().get_microvm(microvmIdentifier=vm_id)
        raise AssertionError(
            f"no VMM for {vm_id} within 60 s: {vm.get('state')} {vm.get('stateReason')}"
        ) from None


def _a_little_after_the_vmm(server: LiveServer, vm_id: str) -> object:
    _vmm_started(server, vm_id)
    time.sleep(0.3)
    return True


def _snapshot_writing(server: LiveServer, vm_id: str) -> object:
    workdir = vm_workdir(server, vm_id)
    return poll(lambda: list(workdir.glob(".suspend.tmp-*")), 60, "the snapshot's temp dir")


def _snapshot_committed(server: LiveServer, vm_id: str) -> object:
    manifest = vm_workdir(server, vm_id) / "suspend" / "manifest.json"
    return poll(manifest.exists, 60, "the committed snapshot")


MOMENTS: dict[str, list[Moment]] = {
    "launch": [_at_once, _vmm_started, _a_little_after_the_vmm],
    "suspend": [_at_once, _snapshot_writing, _snapshot_committed],
    "resume": [_at_once, _vmm_started, _a_little_after_the_vmm],
    "terminate": [_at_once, _a_little_after_the_vmm],
}


def _kill_one(server: LiveServer, operation: str, moment: Moment) -> tuple[int, str]:
    """One operation, killed at one moment; returns (records checked, the state it ended in)."""
    client = server.client()
    before = 0
    if operation == "launch":
        vm_id = client.run_microvm(
            imageIdentifier=APP_NAME, ingressNetworkConnectors=[CONNECTOR.format("ALL_INGRESS")]
        )["microvmId"]
    else:
        vm_id = str(run_vm(server, APP_NAME)["microvmId"])
        before = _counter(server, vm_id)
        if operation == "resume":
            client.suspend_microvm(microvmIdentifier=vm_id)
            _settle(server, vm_id, "SUSPENDED")
            client.resume_microvm(microvmIdentifier=vm_id)
        elif operation == "suspend":
            client.suspend_microvm(microvmIdentifier=vm_id)
        else:
            client.terminate_microvm(microvmIdentifier=vm_id)
    moment(server, vm_id)
    kill_and_restart(server)
    state = check_reality(server, [vm_id])[vm_id]["state"]
    if state == "SUSPENDED":
        client.resume_microvm(microvmIdentifier=vm_id)
        _settle(server, vm_id, "RUNNING")
    if before and state != "TERMINATED":
        assert _counter(server, vm_id) > before, f"{vm_id} lost its memory"
    if state != "TERMINATED":
        client.terminate_microvm(microvmIdentifier=vm_id)
        _settle(server, vm_id, "TERMINATED")
    return 1 + len(check_reality(server, [vm_id])), state


def _kill_build(server: LiveServer, moment: str, round_: int) -> int:
    name = f"chaos-build-{moment.replace('+', '-')}-{round_}"  # names: [a-zA-Z0-9-_]+
    source = write_app(server.data_dir / f"src-{name}", marker=name)
    params: dict[str, Any] = {"baseImageArn": BASE_IMAGE_ARN, "buildRoleArn": BUILD_ROLE,
                              "codeArtifact": {"uri": zip_app(server, source, name)}}  # fmt: skip
    server.client().create_microvm_image(name=name, **params)
    if moment != "accepted":
        poll(lambda: build_vm_pids(server), 120, "the build VM")
    if moment == "vm+2s":
        time.sleep(2)
    kill_and_restart(server)
    image = wait_built(server, name)
    if image["state"] == "CREATE_FAILED":
        version = server.client().get_microvm_image_version(
            imageIdentifier=name, imageVersion=image["latestFailedImageVersion"]
        )
        assert version.get("stateReason"), version
        assert not build_vm_pids(server), "a build VM of the killed server runs on"
        server.client().update_microvm_image(imageIdentifier=name, **params)
        assert wait_built(server, name)["state"] == "UPDATED", name
    else:
        assert image["state"] == "CREATED", image
    check_reality(server, [])
    return 3


def kill_scenario(rounds: int) -> Row:
    faults = records = 0
    ended: dict[str, int] = {}
    with chaos_server(Path(tempfile.mkdtemp(prefix="emb-chaos-server-"))) as server:
        assert build_image(server, APP_NAME, write_app(server.data_dir / "app"))["state"] == (
            "CREATED"
        )
        for round_ in range(rounds):
            for operation, moments in MOMENTS.items():
                for moment in moments:
                    checked, state = _kill_one(server, operation, moment)
                    faults, records = faults + 1, records + checked
                    key = f"{operation}:{moment.__name__.strip('_')}->{state}"
                    ended[key] = ended.get(key, 0) + 1
            for when in ("accepted", "vm", "vm+2s"):
                records += _kill_build(server, when, round_)
                faults += 1
    note = ", ".join(f"{k} x{v}" for k, v in sorted(ended.items()))
    return Row("server-kill", faults, faults, records, 0, note)


# -- 1,000 connections ----------------------------------------------------------------------------


def _hold(server: LiveServer, vm_id: str, auth: str, held: int, trickle: float,
          seconds: float, out: Any) -> None:  # fmt: skip
    """Child process: hold the connections for ``seconds``, then report what they saw."""
    raise_nofile_limit()

    async def run() -> HeldConnections:
        stop, seen = asyncio.Event(), HeldConnections()
        holding = asyncio.create_task(
            hold_connections(server, vm_id, auth, count=held, trickle=trickle, stop=stop, seen=seen)
        )
        await asyncio.sleep(seconds)
        out.put(("open", seen.open_now))
        stop.set()
        return await holding

    seen = asyncio.run(run())
    out.put(("seen", {**asdict(seen), "statuses": dict(seen.statuses),
                      "errors": dict(seen.errors)}))  # fmt: skip


def _latencies(server: LiveServer, vm_id: str, calls: int) -> dict[str, list[float]]:
    client = server.client()
    timed: dict[str, list[float]] = {"GetMicrovm": [], "ListMicrovms": []}
    for _ in range(calls):
        started = time.perf_counter()
        client.get_microvm(microvmIdentifier=vm_id)
        timed["GetMicrovm"].append(time.perf_counter() - started)
        started = time.perf_counter()
        client.list_microvms()
        timed["ListMicrovms"].append(time.perf_counter() - started)
    return timed


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000


def connections_scenario(held: int, *, trickle: float = 5.0, seconds: float = 60.0,
                         calls: int = 200) -> Row:  # fmt: skip
    raise_nofile_limit()
    with chaos_server(Path(tempfile.mkdtemp(prefix="emb-chaos-conn-"))) as server:
        image = build_image(server, APP_NAME, write_app(server.data_dir / "app"),
                            resources=[{"minimumMemoryInMiB": 8192}])  # fmt: skip
        assert image["state"] == "CREATED", image
        vm_id = str(run_vm(server, APP_NAME)["microvmId"])
        auth = token(server, vm_id)
        quiet = _latencies(server, vm_id, calls)
        out: Any = multiprocessing.get_context("fork").Queue()
        child = multiprocessing.get_context("fork").Process(
            target=_hold, args=(server, vm_id, auth, held, trickle, seconds, out)
        )
        child.start()
        time.sleep(trickle * 2)  # every connection has opened and sent its first request
        busy = _latencies(server, vm_id, calls)
        fresh = server.get(vm_id, auth, timeout=30).status_code
        open_at_end = out.get(timeout=seconds + 120)[1]
        seen = out.get(timeout=120)[1]
        child.join(60)
    lines = [f"held {held} client connections (open at the end: {open_at_end}; "
             f"answers {dict(seen['statuses'])}, reconnects after 429: {seen['reconnects']}, "
             f"errors {dict(seen['errors'])}); a new request while held: {fresh}"]  # fmt: skip
    for name in quiet:
        q50, q99 = _p(quiet[name], 50), _p(quiet[name], 99)
        b50, b99 = _p(busy[name], 50), _p(busy[name], 99)
        lines.append(f"{name}: p50 {q50:.1f} -> {b50:.1f} ms (x{b50 / q50:.2f}), "
                     f"p99 {q99:.1f} -> {b99:.1f} ms (x{b99 / q99:.2f})")  # fmt: skip
    print("\n".join(lines), flush=True)
    return Row("server-connections", 1, held, calls * 4, 0, "; ".join(lines))


def scenarios() -> list[Scenario]:
    """The server-level scenarios, for ``bench/chaos.py``'s table (``size``: kill rounds, held
    connections)."""

    async def kill(size: int) -> Row:
        return await asyncio.to_thread(kill_scenario, size)

    async def connections(size: int) -> Row:
        return await asyncio.to_thread(connections_scenario, size)

    return [Scenario("server-kill", kill, 1), Scenario("server-connections", connections, 1000)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenario", choices=["kill", "connections"])
    ap.add_argument("--rounds", type=int, default=1, help="kill: rounds over every moment")
    ap.add_argument("--held", type=int, default=1000, help="connections: how many")
    ap.add_argument("--trickle", type=float, default=5.0, help="seconds between requests")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long they are held")
    args = ap.parse_args()
    if args.scenario == "kill":
        row = kill_scenario(args.rounds)
    else:
        row = connections_scenario(args.held, trickle=args.trickle, seconds=args.seconds)
    print(f"{row.scenario}: {row.faults} faults, {row.records} records checked, "
          f"{row.lost} lost\n{row.note}")  # fmt: skip


if __name__ == "__main__":
    main()
