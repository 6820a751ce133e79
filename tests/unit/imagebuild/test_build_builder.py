"""ImageBuild against fake VMs: steps, cache reuse, failures, hung VMs, cleanup, sizes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import zipfile
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from tests.framework.fake_imagebuild import (
    ExecCall,
    FakeAppMachine,
    FakeBuildMachine,
    FakeMachineProvider,
)

from embervm.errors import BuildFailure, VmmError
from embervm.imagebuild.builder import ImageBuild
from embervm.imagebuild.cache import LayerRef, LocalLayerCache
from embervm.imagebuild.log import MemoryBuildLog
from embervm.imagebuild.machine import OutputSink
from embervm.imagebuild.ready import HookSettings
from embervm.imagebuild.spec import BuildResult, BuildSpec

ARN = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"
DOCKERFILE = """FROM embervm/debian12
WORKDIR /app
COPY requirements.txt .
RUN pip install -r requirements.txt
COPY app.py .
ENV GREETING=hello MODE=image
EXPOSE 8080
CMD ["python3", "app.py"]
"""


def write_zip(path: Path, files: dict[str, str]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in files.items():
            zf.writestr(name, text)
    return path


@pytest.fixture
async def app_port() -> AsyncIterator[int]:
    """A real listener on 127.0.0.1 standing in for the app's port 8080."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


def spec(tmp_path: Path, archive: Path, **kw: object) -> BuildSpec:
    return BuildSpec(
        base_image_arn=ARN,
        code_artifact=archive,
        snapshot_dir=tmp_path / "image" / "snapshot",
        work_dir=tmp_path / "work",
        **kw,  # type: ignore[arg-type]
    )


def files(app: str = "print('v1')") -> dict[str, str]:
    return {"Dockerfile": DOCKERFILE, "requirements.txt": "flask\n", "app.py": app}


async def build(
    tmp_path: Path, provider: FakeMachineProvider, archive: Path, **kw: object
) -> tuple[BuildResult, MemoryBuildLog]:
    log = MemoryBuildLog()
    cache = LocalLayerCache(tmp_path / "cache")
    result = await ImageBuild(
        spec(tmp_path, archive, **kw), provider=provider, cache=cache, log=log
    ).run()
    return result, log


async def test_build_runs_steps_starts_app_and_snapshots(tmp_path: Path, app_port: int) -> None:
    provider = FakeMachineProvider(port_map={8080: app_port})
    archive = write_zip(tmp_path / "a.zip", files())
    result, log = await build(
        tmp_path, provider, archive, environment={"MODE": "override", "EXTRA": "1"}
    )
    assert [c.argv for c in provider.exec_calls] == [
        ["mkdir", "-p", "/app"],
        ["/bin/sh", "-c", "pip install -r requirements.txt"],
    ]
    run = provider.exec_calls[1]
    assert run.cwd == "/app"
    assert run.user is None
    (machine,) = provider.build_machines
    assert machine.files["/app/app.py"].data == b"print('v1')"
    launch = provider.app_machines[0].launch
    assert launch is not None
    assert launch.argv == ("python3", "app.py")
    assert launch.env["MODE"] == "override"
    assert launch.env["GREETING"] == "hello"
    assert launch.env["EXTRA"] == "1"
    assert launch.cwd == "/app"
    assert result.snapshot_build() == {
        "memorySnapshotSizeInBytes": provider.memory_bytes,
        "diskSnapshotSizeInBytes": provider.disk_bytes,
        "codeInstallSizeInBytes": len("flask\n") + len("print('v1')"),
    }
    assert (tmp_path / "image" / "snapshot" / "manifest.json").exists()
    assert "ran pip install -r requirements.txt" in log.messages("stdout")
    assert "app starting" in log.messages("stdout")
    assert all(r.ts.endswith("Z") for r in log.records)
    assert log.closed == "SUCCESSFUL"
    assert provider.all_shut_down()
    assert list((tmp_path / "work").iterdir()) == []


async def test_rebuild_after_app_change_reruns_only_later_steps(
    tmp_path: Path, app_port: int
) -> None:
    provider = FakeMachineProvider(port_map={8080: app_port})
    await build(tmp_path, provider, write_zip(tmp_path / "a.zip", files()))
    first_execs = len(provider.exec_calls)
    provider.exec_calls.clear()
    build_vms = len(provider.build_machines)
    (tmp_path / "image" / "snapshot").rename(tmp_path / "v1")
    result, log = await build(
        tmp_path, provider, write_zip(tmp_path / "b.zip", files("print('v2')"))
    )
    assert first_execs == 2
    assert provider.exec_calls == []
    assert result.steps_cached == 3
    assert result.steps_total == 4
    # The only step to run is a COPY after the last RUN: it runs in the app VM (no build VM).
    assert len(provider.build_machines) == build_vms
    app = provider.app_machines[-1]
    assert app.files["/app/app.py"].data == b"print('v2')"
    assert "/app/requirements.txt" in app.files  # booted from the cached layer
    assert app.launch is not None  # ... and the app then started in that VM
    snapshot = json.loads((tmp_path / "image" / "snapshot" / "manifest.json").read_text())
    assert snapshot["layer"] == result.layer.id  # of the layer holding the new app.py
    assert provider.layer_files[result.layer.id]["/app/app.py"].data == b"print('v2')"
    assert sum("(cached)" in m for m in log.messages("build")) == 3
    assert provider.all_shut_down()


async def test_first_build_runs_steps_after_the_last_run_in_the_build_vm(
    tmp_path: Path, app_port: int
) -> None:
    """A build VM that is already up takes the COPY after the last RUN too (no extra boot)."""
    provider = FakeMachineProvider(port_map={8080: app_port})
    result, _ = await build(tmp_path, provider, write_zip(tmp_path / "a.zip", files()))
    assert result.steps_cached == 0
    assert len(provider.build_machines) == 1
    assert provider.build_machines[0].files["/app/app.py"].data == b"print('v1')"
    assert len(provider.app_machines) == 1
    assert "/app/app.py" in provider.app_machines[0].files  # booted on the final layer


async def test_garbage_collected_cached_layer_is_rebuilt(tmp_path: Path, app_port: int) -> None:
    provider = FakeMachineProvider(port_map={8080: app_port})
    await build(tmp_path, provider, write_zip(tmp_path / "a.zip", files()))
    (tmp_path / "image" / "snapshot").rename(tmp_path / "v1")
    provider.missing_layers = {"layer-1"}
    provider.exec_calls.clear()
    result, _ = await build(tmp_path, provider, write_zip(tmp_path / "b.zip", files()))
    assert result.steps_cached == 0
    assert len(provider.exec_calls) == 2


def failing_pip(machine: FakeBuildMachine, call: ExecCall, out: OutputSink) -> int | None:
    if "pip" in call.argv[-1]:
        out("stdout", b"Collecting flask\n")
        out("stderr", b"ERROR: No matching distribution found for flask\n")
        return 1
    return 0


async def test_failing_run_names_instruction_line_and_exit_code(tmp_path: Path) -> None:
    provider = FakeMachineProvider(exec_script=failing_pip)
    log = MemoryBuildLog()
    build_ = ImageBuild(
        spec(tmp_path, write_zip(tmp_path / "a.zip", files())),
        provider=provider,
        cache=LocalLayerCache(tmp_path / "cache"),
        log=log,
    )
    with pytest.raises(BuildFailure) as err:
        await build_.run()
    assert err.value.reason == (
        "`RUN pip install -r requirements.txt` at line 4 failed with exit code 1: "
        "ERROR: No matching distribution found for flask"
    )
    assert "ERROR: No matching distribution found for flask" in log.messages("stderr")
    assert log.messages("error") == [f"build failed: {err.value.reason}"]
    assert log.closed == "FAILED"
    assert provider.all_shut_down()
    assert provider.app_machines == []
    assert list((tmp_path / "work").iterdir()) == []
    assert not (tmp_path / "image" / "snapshot").exists()


def hang_on_pip(machine: FakeBuildMachine, call: ExecCall, out: OutputSink) -> int | None:
    return None if "pip" in call.argv[-1] else 0


async def test_hung_step_is_killed_at_its_timeout(tmp_path: Path) -> None:
    provider = FakeMachineProvider(exec_script=hang_on_pip)
    archive = write_zip(tmp_path / "a.zip", files())
    with pytest.raises(BuildFailure, match=r"`RUN pip install.*` at line 4 did not finish"):
        await build(tmp_path, provider, archive, step_timeout=0.1, grace=0.1)
    (machine,) = provider.build_machines
    assert machine.shut_down
    assert list((tmp_path / "work").iterdir()) == []


async def test_whole_build_is_bounded(tmp_path: Path) -> None:
    provider = FakeMachineProvider(exec_script=hang_on_pip)
    archive = write_zip(tmp_path / "a.zip", files())
    with pytest.raises(BuildFailure, match=r"the build did not finish within 0.3 s"):
        await build(tmp_path, provider, archive, build_timeout=0.3, step_timeout=60)
    assert provider.all_shut_down()


async def test_app_that_never_listens_fails_at_the_ready_timeout(tmp_path: Path) -> None:
    provider = FakeMachineProvider(port_map={8080: 1})  # nothing listens on port 1
    archive = write_zip(tmp_path / "a.zip", files())
    with pytest.raises(BuildFailure, match=r"did not accept connections on port 8080 within 0.3 s"):
        await build(tmp_path, provider, archive, hooks=HookSettings(ready_timeout=0.3))
    assert provider.all_shut_down()
    assert not (tmp_path / "image" / "snapshot").exists()


async def test_app_that_exits_fails_fast_with_its_code(tmp_path: Path) -> None:
    provider = FakeMachineProvider(port_map={8080: 1}, app_exit_code=3)
    archive = write_zip(tmp_path / "a.zip", files())
    with pytest.raises(BuildFailure, match="the app exited with code 3"):
        await build(tmp_path, provider, archive)


async def test_chown_names_are_resolved_in_the_vm(tmp_path: Path, app_port: int) -> None:
    def ids(machine: FakeBuildMachine, call: ExecCall, out: OutputSink) -> int | None:
        answers = {"-u": b"1000\n", "-g": b"1001\n"}
        if call.argv[0] == "id":
            out("stdout", answers[call.argv[1]])
        if call.argv[0] == "getent":
            out("stdout", b"web:x:2000:\n")
        return 0

    provider = FakeMachineProvider(exec_script=ids, port_map={8080: app_port})
    dockerfile = (
        "FROM embervm/debian12\nCOPY --chown=app a.txt /a/\nCOPY --chown=app:web a.txt /b/\nCMD x\n"
    )
    archive = write_zip(tmp_path / "a.zip", {"Dockerfile": dockerfile, "a.txt": "a"})
    await build(tmp_path, provider, archive)
    machine = provider.app_machines[0]  # no RUN: the COPY steps ran in the app VM
    assert provider.build_machines == []
    assert (machine.files["/a/a.txt"].uid, machine.files["/a/a.txt"].gid) == (1000, 1001)
    assert (machine.files["/b/a.txt"].uid, machine.files["/b/a.txt"].gid) == (1000, 2000)


async def test_fetcher_is_used_and_its_failure_cleans_up(tmp_path: Path) -> None:
    async def fetch(dest: Path) -> Path:
        raise BuildFailure("code artifact 's3://b/k' does not exist")

    provider = FakeMachineProvider()
    log = MemoryBuildLog()
    with pytest.raises(BuildFailure, match="does not exist"):
        await ImageBuild(
            spec(tmp_path, fetch),  # type: ignore[arg-type]
            provider=provider,
            cache=LocalLayerCache(tmp_path / "c"),
            log=log,
        ).run()
    assert list((tmp_path / "work").iterdir()) == []
    assert log.closed == "FAILED"
    assert provider.build_machines == []


async def test_bad_zip_fails_the_build_with_the_unzip_reason(tmp_path: Path) -> None:
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("../escape", "x")
    with pytest.raises(BuildFailure, match=r"contains '..'"):
        await build(tmp_path, FakeMachineProvider(), archive)
    assert not (tmp_path / "escape").exists()


async def test_copy_into_existing_folder_without_trailing_slash(
    tmp_path: Path, app_port: int
) -> None:
    def usr_local_bin_exists(
        machine: FakeBuildMachine, call: ExecCall, out: OutputSink
    ) -> int | None:
        if call.argv[:2] == ["test", "-d"]:
            return 0 if call.argv[2] == "/usr/local/bin" else 1
        return 0

    provider = FakeMachineProvider(exec_script=usr_local_bin_exists, port_map={8080: app_port})
    dockerfile = "FROM embervm/debian12\nCOPY tool /usr/local/bin\nCOPY tool /opt/renamed\nCMD x\n"
    archive = write_zip(tmp_path / "a.zip", {"Dockerfile": dockerfile, "tool": "#!/bin/sh\n"})
    await build(tmp_path, provider, archive)
    machine = provider.app_machines[0]  # no RUN: the COPY steps ran in the app VM
    assert "/usr/local/bin/tool" in machine.files
    assert "/opt/renamed" in machine.files


async def test_untranslated_runtime_error_becomes_a_clean_build_failure(tmp_path: Path) -> None:
    def broken(machine: FakeBuildMachine, call: ExecCall, out: OutputSink) -> int | None:
        raise OSError("qmp socket vanished")

    provider = FakeMachineProvider(exec_script=broken)
    log = MemoryBuildLog()
    with pytest.raises(BuildFailure, match=r"internal error during the build \(OSError\)"):
        await ImageBuild(
            spec(tmp_path, write_zip(tmp_path / "a.zip", files())),
            provider=provider,
            cache=LocalLayerCache(tmp_path / "c"),
            log=log,
        ).run()
    assert provider.all_shut_down()
    assert log.closed == "FAILED"


async def test_a_runtime_failure_reaches_the_caller_as_a_fixed_reason_and_the_detail_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    detail = "qemu-system-x86_64: /var/lib/embervm/vms/build-1/disk.qcow2: Permission denied"

    def broken(machine: FakeBuildMachine, call: ExecCall, out: OutputSink) -> int | None:
        raise VmmError(detail)

    log = MemoryBuildLog()
    with pytest.raises(BuildFailure) as err:
        await ImageBuild(
            spec(tmp_path, write_zip(tmp_path / "a.zip", files())),
            provider=FakeMachineProvider(exec_script=broken),
            cache=LocalLayerCache(tmp_path / "c"),
            log=log,
        ).run()
    assert err.value.reason == "the build machine failed (VmmError)"
    assert not any("/var/lib" in message for message in log.messages())  # the API shows these
    assert detail in caplog.text  # the operator's log has it


class ThreadOfClose(MemoryBuildLog):
    """Records which thread closed the log (closing waits for the writer's last batch)."""

    closed_on: int | None = None

    def close(self, outcome: str) -> None:
        self.closed_on = threading.get_ident()
        super().close(outcome)


@pytest.mark.parametrize("fails", [False, True])
async def test_the_log_is_closed_off_the_event_loop(
    tmp_path: Path, app_port: int, fails: bool
) -> None:
    def broken(machine: FakeBuildMachine, call: ExecCall, out: OutputSink) -> int | None:
        raise VmmError("gone")

    provider = FakeMachineProvider(port_map={8080: app_port})
    if fails:
        provider = FakeMachineProvider(exec_script=broken)
    log = ThreadOfClose()
    with contextlib.suppress(BuildFailure):
        await ImageBuild(
            spec(tmp_path, write_zip(tmp_path / "a.zip", files())),
            provider=provider,
            cache=LocalLayerCache(tmp_path / "c"),
            log=log,
        ).run()
    assert log.closed == ("FAILED" if fails else "SUCCESSFUL")
    assert log.closed_on not in (None, threading.get_ident())


async def test_cancelled_build_cleans_up_and_propagates(tmp_path: Path) -> None:
    provider = FakeMachineProvider(exec_script=hang_on_pip)
    log = MemoryBuildLog()
    task = asyncio.create_task(
        ImageBuild(
            spec(tmp_path, write_zip(tmp_path / "a.zip", files())),
            provider=provider,
            cache=LocalLayerCache(tmp_path / "c"),
            log=log,
        ).run()
    )
    for _ in range(500):  # until the build hangs in `RUN pip install`
        if any("pip" in c.argv[-1] for c in provider.exec_calls):
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert provider.all_shut_down()
    assert log.messages("error") == ["build interrupted"]
    assert list((tmp_path / "work").iterdir()) == []


class HangingBootProvider(FakeMachineProvider):
    async def start_build_machine(
        self, layer: LayerRef, *, egress: bool, memory_mib: int
    ) -> FakeBuildMachine:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


async def test_a_vm_that_never_boots_fails_at_the_boot_timeout(tmp_path: Path) -> None:
    provider = HangingBootProvider()
    with pytest.raises(BuildFailure, match=r"starting the build VM did not finish within 0.2 s"):
        await build(tmp_path, provider, write_zip(tmp_path / "a.zip", files()), boot_timeout=0.2)
    assert list((tmp_path / "work").iterdir()) == []


async def test_an_app_that_dies_after_opening_its_port_fails_the_build(
    tmp_path: Path, app_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """gunicorn's master listens, then its worker fails to import the app and it exits: the
    port was open once, but the snapshot would hold a dead app."""
    provider = FakeMachineProvider(port_map={8080: app_port})

    async def dies_while_settling(self: FakeAppMachine, *, timeout: float) -> bool:  # noqa: ASYNC109
        self.provider.app_exit_code = 3
        return True

    monkeypatch.setattr(FakeAppMachine, "wait_idle", dies_while_settling)
    log = MemoryBuildLog()
    with pytest.raises(BuildFailure, match="the app exited with code 3 after it opened port 8080"):
        await ImageBuild(
            spec(tmp_path, write_zip(tmp_path / "a.zip", files())),
            provider=provider,
            cache=LocalLayerCache(tmp_path / "cache"),
            log=log,
        ).run()
    assert not (tmp_path / "image" / "snapshot").exists()
    assert provider.all_shut_down()


async def test_an_app_that_stops_listening_before_the_snapshot_fails_the_build(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = await asyncio.start_server(lambda r, w: w.close(), "127.0.0.1", 0)
    provider = FakeMachineProvider(port_map={8080: server.sockets[0].getsockname()[1]})

    async def listener_closes(self: FakeAppMachine, *, timeout: float) -> bool:  # noqa: ASYNC109
        server.close()
        await server.wait_closed()
        return True

    monkeypatch.setattr(FakeAppMachine, "wait_idle", listener_closes)
    with pytest.raises(BuildFailure, match="stopped accepting connections on port 8080"):
        await ImageBuild(
            spec(tmp_path, write_zip(tmp_path / "a.zip", files())),
            provider=provider,
            cache=LocalLayerCache(tmp_path / "cache"),
            log=MemoryBuildLog(),
        ).run()
    assert not (tmp_path / "image" / "snapshot").exists()
