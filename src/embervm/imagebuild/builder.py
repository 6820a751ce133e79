"""``ImageBuild``: one image version's build, from code artifact to snapshot.

Phases (each logged): fetch the artifact → unpack it safely → parse the Dockerfile → for each
step, look up its cache key; run the first missing step and every later one in a build VM,
freezing a layer after each → boot the final layer, start the app with the image's environment,
wait for the ready hook (or the app's port) → snapshot → optionally restore and call validate.

Everything acquired (temp folders, VMs, a half-written snapshot) is released through one LIFO
exit stack, on success and on every failure. Every call into a VM is bounded: a step by its
timeout plus a grace period, the whole build by ``build_timeout``; a VM that does not answer in
time is shut down (killed) and the build fails with a reason naming the step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import posixpath
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from embervm.errors import BuildFailure, EmbervmError
from embervm.imagebuild.cache import LayerCache, LayerRef, base_key, describe_step, step_key
from embervm.imagebuild.context import BuildContext, CopyItem, digest_items
from embervm.imagebuild.dockerfile import parse_dockerfile
from embervm.imagebuild.log import BuildLog, LineSplitter
from embervm.imagebuild.machine import (
    AppLaunch,
    AppMachine,
    BuildMachine,
    MachineProvider,
    TreeEntry,
)
from embervm.imagebuild.plan import BuildPlan, CopyStep, ImageConfig, RunStep, Step, WorkdirStep
from embervm.imagebuild.ready import DEFAULT_APP_PORT, wait_for_hook, wait_for_port
from embervm.imagebuild.spec import BuildResult, BuildSpec
from embervm.imagebuild.unzip import safe_extract

logger = logging.getLogger("embervm.build")

T = TypeVar("T")
M = TypeVar("M", bound=BuildMachine)  # a build or app VM
SHUTDOWN_TIMEOUT = 30.0
PROBE_TIMEOUT = 5.0  # one connection attempt to the app's port, after it was ready once
SETTLE_TIMEOUT = 15.0  # after the port opens, wait this long at most for the app to go idle


def _step_text(step: Step) -> str:
    return f"`{step.text}` at line {step.line}"


class ImageBuild:
    """Run with ``await ImageBuild(spec, provider=..., cache=..., log=...).run()``."""

    def __init__(
        self,
        spec: BuildSpec,
        *,
        provider: MachineProvider,
        cache: LayerCache,
        log: BuildLog,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.spec = spec
        self.provider = provider
        self.cache = cache
        self.log = log
        self.clock = clock
        self._build_context: BuildContext | None = None

    # --- entry point -------------------------------------------------------------------

    async def run(self) -> BuildResult:
        """Build, or raise BuildFailure (logged, everything cleaned up)."""
        started = self.clock()
        try:
            async with contextlib.AsyncExitStack() as stack:
                try:
                    async with asyncio.timeout(self.spec.build_timeout) as deadline:
                        result = await self._build(stack)
                except TimeoutError as exc:
                    if deadline.expired():
                        raise BuildFailure(
                            f"the build did not finish within {self.spec.build_timeout:g} s"
                        ) from exc
                    raise
        except BuildFailure as exc:
            await self._end_log("error", f"build failed: {exc.reason}", "FAILED")
            raise
        except Exception as exc:  # the runtime's failure, or a bug: a clean, fixed reason
            # Its text (QEMU's stderr, host paths, addresses) is for the operator's log only:
            # the reason and the build log are the API caller's to read.
            kind = type(exc).__name__
            runtime = isinstance(exc, EmbervmError)
            logger.warning("build failed: %r", exc, exc_info=not runtime)
            reason = (
                f"the build machine failed ({kind})"
                if runtime
                else f"internal error during the build ({kind})"
            )
            await self._end_log("error", f"build failed: {reason}", "FAILED")
            raise BuildFailure(reason) from exc
        except BaseException:  # cancelled (server stopping): cleaned up, then re-raised
            self.log.emit("error", "build interrupted")
            self.log.close("FAILED")
            raise
        elapsed = self.clock() - started
        cached = f"{result.steps_cached} of {result.steps_total} steps cached"
        await self._end_log("build", f"build succeeded in {elapsed:.1f} s ({cached})", "SUCCESSFUL")
        return result

    async def _end_log(self, stream: str, message: str, outcome: str) -> None:
        """The last record and the end one. Closing waits for the log's last batch and its
        fsync (a flood of output may leave megabytes queued), so it runs in a thread."""
        self.log.emit(stream, message)
        await asyncio.to_thread(self.log.close, outcome)

    # --- phases ------------------------------------------------------------------------

    async def _build(self, stack: contextlib.AsyncExitStack) -> BuildResult:
        spec = self.spec
        spec.work_dir.mkdir(parents=True, exist_ok=True)
        workspace = Path(tempfile.mkdtemp(dir=spec.work_dir, prefix="build-"))
        stack.callback(shutil.rmtree, workspace, True)
        context = await self._context(workspace)
        dockerfile = await asyncio.to_thread(context.read_dockerfile)
        # Pure Python and bounded (MAX_INSTRUCTIONS, MAX_EXPANSION...), so a worker thread
        # keeps yielding the GIL to the event loop while it runs.
        plan = await asyncio.to_thread(
            parse_dockerfile,
            dockerfile,
            base_image_arn=spec.base_image_arn,
            egress=spec.egress,
            build_args=spec.build_args,
        )
        for warning in plan.warnings:
            self.log.emit("warning", warning)
        layer, code_bytes, cached, app = await self._steps(stack, plan, context)
        launch = self._launch(plan.config)
        success = False

        def drop_partial_snapshot() -> None:
            if not success:
                shutil.rmtree(spec.snapshot_dir, ignore_errors=True)

        stack.callback(drop_partial_snapshot)
        memory_bytes, disk_bytes = await self._ready_and_snapshot(stack, layer, plan, launch, app)
        if spec.hooks.validate:
            await self._validate(stack)
        success = True
        return BuildResult(
            snapshot_dir=spec.snapshot_dir,
            layer=layer,
            config=plan.config,
            app=launch,
            memory_snapshot_bytes=memory_bytes,
            disk_snapshot_bytes=disk_bytes,
            code_install_bytes=code_bytes,
            steps_total=len(plan.steps),
            steps_cached=cached,
            warnings=plan.warnings,
        )

    async def _context(self, workspace: Path) -> BuildContext:
        spec = self.spec
        if isinstance(spec.code_artifact, Path):
            archive = spec.code_artifact
        else:
            self.log.emit("build", "fetching the code artifact")
            archive = await spec.code_artifact(workspace / "artifact.zip")
        limits = spec.zip_limits
        root = await asyncio.to_thread(
            safe_extract,
            archive,
            workspace / "context",
            max_total_bytes=limits.max_total_bytes,
            max_files=limits.max_files,
            max_ratio=limits.max_ratio,
            max_directory_bytes=limits.max_directory_bytes,
        )
        context = await asyncio.to_thread(BuildContext, root)
        self._build_context = context
        self.log.emit("build", "code artifact unpacked")
        return context

    async def _steps(
        self, stack: contextlib.AsyncExitStack, plan: BuildPlan, context: BuildContext
    ) -> tuple[LayerRef, int, int, AppMachine | None]:
        """Run or reuse every step; returns (final layer, bytes the steps added, cached, the
        app VM when it ran the last steps).

        Steps after the last ``RUN`` only place files, so when the first of them to run is
        past every ``RUN`` (an app-only rebuild), they run in the app VM itself — booted on
        the last cached layer, each step still frozen into a cached layer — instead of a build
        VM that would be shut down just before the app VM boots: one VM boot less.
        """
        spec = self.spec
        layer = await self.provider.base_layer(plan.base_image)
        key = base_key(plan.base_image, layer)
        machine: BuildMachine | None = None
        app: AppMachine | None = None
        last_run = max(
            (i for i, step in enumerate(plan.steps, start=1) if isinstance(step, RunStep)),
            default=0,
        )
        total = len(plan.steps)
        code_bytes = cached = 0
        for index, step in enumerate(plan.steps, start=1):
            label = f"{index}/{total}"
            items: list[CopyItem] = []
            digest = ""
            if isinstance(step, CopyStep):
                items = await asyncio.to_thread(context.select, step)
                digest = await asyncio.to_thread(digest_items, items)
            instruction, inputs = describe_step(step, egress=spec.egress, copy_digest=digest)
            key = step_key(key, instruction, inputs)
            if machine is None:
                hit = await self.cache.get(key)
                if hit is not None and await self.provider.has_layer(hit):
                    self.log.emit("build", f"Step {label}: {step.text} (cached)", step=label)
                    layer, cached, code_bytes = hit, cached + 1, code_bytes + hit.size_bytes
                    continue
                if index > last_run:
                    machine = app = await self._start_app_machine(stack, layer)
                else:
                    machine = await self._boot(
                        stack,
                        self.provider.start_build_machine(
                            layer, egress=spec.egress, memory_mib=spec.build_memory_mib
                        ),
                        "starting the build VM",
                    )
            self.log.emit("build", f"Step {label}: {step.text}", step=label)
            started = self.clock()
            await self._run_step(machine, step, items, label)
            layer = await self._bounded(
                machine.commit_layer(),
                spec.grace * 4,
                f"saving the result of {_step_text(step)}",
                machine,
            )
            await self.cache.put(key, layer)
            code_bytes += layer.size_bytes
            self.log.emit(
                "build", f"Step {label} done in {self.clock() - started:.1f} s", step=label
            )
        if machine is not None and app is None:
            await self._shutdown(machine)
        return layer, code_bytes, cached, app

    async def _run_step(
        self, machine: BuildMachine, step: Step, items: list[CopyItem], label: str
    ) -> None:
        if isinstance(step, RunStep):
            await self._run(machine, step, label)
        elif isinstance(step, CopyStep):
            await self._copy(machine, step, items, label)
        elif isinstance(step, WorkdirStep):
            # from "/": the folder to create is the step's own working directory
            argv = ["mkdir", "-p", step.path]
            await self._exec_ok(machine, step, argv, label, user=None, cwd="/")

    async def _run(self, machine: BuildMachine, step: RunStep, label: str) -> None:
        if step.script is not None:
            await self._bounded(
                machine.put_file(step.script.name, step.script.content, mode=step.script.mode),
                self.spec.grace,
                f"uploading the script of {_step_text(step)}",
            )
        await self._exec_ok(machine, step, list(step.argv), label, user=step.state.user or None)

    async def _exec_ok(
        self,
        machine: BuildMachine,
        step: Step,
        argv: list[str],
        label: str,
        *,
        user: str | None,
        cwd: str | None = None,
    ) -> str:
        """Run ``argv`` for ``step``; a non-zero exit or a timeout fails the build. Returns
        the output's last lines."""
        spec = self.spec
        splitter = LineSplitter(self.log, step=label)
        outcome = await self._bounded(
            machine.exec(
                argv,
                env=step.state.run_env(),
                cwd=cwd or step.state.workdir,
                user=user,
                timeout=spec.step_timeout,
                on_output=splitter,
            ),
            spec.step_timeout + spec.grace,
            _step_text(step),
            machine,
        )
        splitter.flush()
        if outcome.timed_out:
            raise BuildFailure(f"{_step_text(step)} did not finish within {spec.step_timeout:g} s")
        if outcome.exit_code != 0:
            tail = splitter.last_lines[-1] if splitter.last_lines else ""
            detail = f": {tail[:300]}" if tail else ""
            raise BuildFailure(
                f"{_step_text(step)} failed with exit code {outcome.exit_code}{detail}"
            )
        return "\n".join(splitter.last_lines)

    async def _copy(
        self, machine: BuildMachine, step: CopyStep, items: list[CopyItem], label: str
    ) -> None:
        uid, gid = await self._owner(machine, step, label)
        if not step.dest.endswith("/") and any(i.guest_path == step.dest for i in items):
            # Docker copies a file *into* an existing folder named without a trailing slash
            context = self._build_context
            if context is not None and await self._is_dir(machine, step, step.dest):
                items = await asyncio.to_thread(context.select, step, True)
        entries = [
            TreeEntry(
                path=item.guest_path,
                is_dir=item.is_dir,
                mode=item.mode,
                uid=uid,
                gid=gid,
                source=item.source,
                data=item.data,
            )
            for item in items
        ]
        if entries:
            await self._bounded(
                machine.put_tree(entries),
                self.spec.step_timeout + self.spec.grace,
                _step_text(step),
                machine,
            )
        for url in step.urls:
            name = posixpath.basename(url.split("?", 1)[0].rstrip("/")) or "index.html"
            target = posixpath.join(step.dest, name) if step.dest.endswith("/") else step.dest
            script = (
                'mkdir -p "$(dirname "$1")" && curl -fsSL --retry 2 -o "$1" "$2" && '
                'chmod "$3" "$1" && chown "$4" "$1"'
            )
            mode = f"{step.chmod:o}" if step.chmod is not None else "600"
            argv = ["/bin/sh", "-c", script, "sh", target, url, mode, f"{uid}:{gid}"]
            await self._exec_ok(machine, step, argv, label, user=None)

    async def _is_dir(self, machine: BuildMachine, step: Step, path: str) -> bool:
        outcome = await self._bounded(
            machine.exec(
                ["test", "-d", path],
                env=step.state.run_env(),
                cwd="/",
                user=None,
                timeout=self.spec.grace,
                on_output=lambda stream, chunk: None,
            ),
            self.spec.grace * 2,
            _step_text(step),
            machine,
        )
        return outcome.exit_code == 0

    async def _owner(self, machine: BuildMachine, step: CopyStep, label: str) -> tuple[int, int]:
        """``--chown=user[:group]`` as numbers (names are looked up in the build VM)."""
        if not step.chown:
            return 0, 0
        user, _, group = step.chown.partition(":")
        if user.isdigit():
            uid = int(user)
            default_gid = uid
        else:
            uid = int(await self._lookup(machine, step, ["id", "-u", user], label, user))
            default_gid = int(await self._lookup(machine, step, ["id", "-g", user], label, user))
        if not group:
            return uid, default_gid
        if group.isdigit():
            return uid, int(group)
        line = await self._lookup(machine, step, ["getent", "group", group], label, group)
        return uid, int(line.split(":")[2])

    async def _lookup(
        self, machine: BuildMachine, step: CopyStep, argv: list[str], label: str, name: str
    ) -> str:
        try:
            out = (await self._exec_ok(machine, step, argv, label, user=None)).strip()
            value = out.splitlines()[-1]
            int(value.split(":")[2] if ":" in value else value)
        except (BuildFailure, IndexError, ValueError) as exc:
            raise BuildFailure(
                f"{_step_text(step)}: --chown names {name!r}, which does not exist in the image"
            ) from exc
        return value

    def _launch(self, config: ImageConfig) -> AppLaunch:
        env = dict(config.env)
        env.update(self.spec.environment)
        return AppLaunch(
            argv=tuple(config.app_argv()),
            env=env,
            cwd=config.workdir,
            user=config.user or None,
        )

    async def _start_app_machine(
        self, stack: contextlib.AsyncExitStack, layer: LayerRef
    ) -> AppMachine:
        spec = self.spec
        return await self._boot(
            stack,
            self.provider.start_app_machine(
                layer, egress=spec.egress, memory_mib=spec.app_memory_mib
            ),
            "starting the app VM",
        )

    async def _boot(
        self, stack: contextlib.AsyncExitStack, start: Coroutine[Any, Any, M], what: str
    ) -> M:
        """A VM started within ``boot_timeout``, shut down when ``stack`` unwinds."""
        machine = await self._bounded(start, self.spec.boot_timeout, what)
        stack.push_async_callback(self._shutdown, machine)
        return machine

    async def _ready_and_snapshot(
        self,
        stack: contextlib.AsyncExitStack,
        layer: LayerRef,
        plan: BuildPlan,
        launch: AppLaunch,
        app: AppMachine | None,
    ) -> tuple[int, int]:
        """Start the app (in ``app`` if the last steps ran there, else in a new VM on
        ``layer``), wait until it is ready, snapshot it."""
        spec = self.spec
        self.log.emit("build", f"starting the app: {plan.config.app_command_text()}")
        if app is None:
            app = await self._start_app_machine(stack, layer)
        output = LineSplitter(self.log, step="app")
        await self._bounded(
            app.start_app(launch, on_output=output), spec.grace, "starting the app", app
        )
        try:
            await self._await_ready(app, plan)
            if not spec.hooks.ready:
                # An open port only says the listener is up: servers such as gunicorn accept
                # connections before their workers have loaded the app. Snapshotting then would
                # make every launch finish that start-up (~1 s under TCG) before it answers.
                self.log.emit("build", "the app accepts connections; waiting until it is idle")
                started = self.clock()
                settled = await app.wait_idle(timeout=SETTLE_TIMEOUT)
                if not settled:
                    self.log.emit("build", "the app is still busy; taking the snapshot anyway")
                else:
                    self.log.emit("build", f"the app went idle in {self.clock() - started:.1f} s")
                await self._check_still_serving(app, plan)
        finally:
            output.flush()
        self.log.emit("build", "the app is ready; taking the snapshot")
        sizes = await self._bounded(
            app.snapshot(spec.snapshot_dir), spec.grace * 10, "taking the snapshot", app
        )
        await self._shutdown(app)
        self.log.emit(
            "build",
            f"snapshot: memory {sizes.memory_bytes} bytes, disk {sizes.disk_bytes} bytes",
        )
        return sizes.memory_bytes, sizes.disk_bytes

    async def _check_still_serving(self, app: AppMachine, plan: BuildPlan) -> None:
        """After the idle wait: an app whose listener opened but which then died (gunicorn's
        master listens before its worker fails to import the app) must not be snapshotted."""
        code = await self._bounded(app.app_exit_code(), self.spec.grace, "checking the app", app)
        port = self._app_port(plan)
        if code is not None:
            raise BuildFailure(
                f"the app exited with code {code} after it opened port {port} "
                "(its output is in the build log)"
            )
        serving = await self._bounded(
            app.probe_port(port, timeout=PROBE_TIMEOUT), self.spec.grace, "checking the app", app
        )
        if not serving:
            raise BuildFailure(f"the app stopped accepting connections on port {port}")

    @staticmethod
    def _app_port(plan: BuildPlan) -> int:
        ports = plan.config.exposed_ports
        return ports[0] if ports else DEFAULT_APP_PORT

    async def _await_ready(self, app: AppMachine, plan: BuildPlan) -> None:
        hooks = self.spec.hooks
        if hooks.ready:
            self.log.emit("build", f"waiting for the ready hook on port {hooks.port}")

            async def call(hook: str, attempt: float) -> int | None:
                return await app.call_hook(hooks.port, hook, timeout=attempt)

            wait = wait_for_hook(
                "ready",
                call,
                timeout=hooks.ready_timeout,
                app_exit_code=app.app_exit_code,
                on_attempt=lambda last: self.log.emit("build", f"ready hook: {last}, retrying"),
            )
        else:
            port = self._app_port(plan)
            self.log.emit("build", f"waiting for the app to accept connections on port {port}")

            async def probe(attempt: float) -> bool:
                return await app.probe_port(port, timeout=attempt)

            wait = wait_for_port(
                probe, port=port, timeout=hooks.ready_timeout, app_exit_code=app.app_exit_code
            )
        limit = hooks.ready_timeout + self.spec.grace
        await self._bounded(wait, limit, "waiting for the app", app)

    async def _validate(self, stack: contextlib.AsyncExitStack) -> None:
        spec, hooks = self.spec, self.spec.hooks
        self.log.emit("build", "restoring the snapshot to call the validate hook")
        restored = await self._bounded(
            self.provider.restore_app_machine(spec.snapshot_dir, egress=spec.egress),
            spec.boot_timeout,
            "restoring the snapshot",
        )
        stack.push_async_callback(self._shutdown, restored)

        async def call(hook: str, attempt: float) -> int | None:
            return await restored.call_hook(hooks.port, hook, timeout=attempt)

        await self._bounded(
            wait_for_hook(
                "validate",
                call,
                timeout=hooks.validate_timeout,
                app_exit_code=restored.app_exit_code,
            ),
            hooks.validate_timeout + spec.grace,
            "the validate hook",
            restored,
        )
        await self._shutdown(restored)
        self.log.emit("build", "validate hook answered 200")

    # --- helpers -----------------------------------------------------------------------

    async def _bounded(
        self,
        work: Coroutine[Any, Any, T],
        limit: float,
        what: str,
        machine: BuildMachine | AppMachine | None = None,
    ) -> T:
        """Await ``work`` for at most ``limit`` seconds; past that the VM is considered hung:
        it is shut down and the build fails naming ``what``."""
        try:
            async with asyncio.timeout(limit) as scope:
                return await work
        except TimeoutError as exc:
            if not scope.expired():
                raise
            if machine is not None:
                await self._shutdown(machine)
            stopped = "; the VM was stopped" if machine is not None else ""
            raise BuildFailure(f"{what} did not finish within {limit:g} s{stopped}") from exc

    async def _shutdown(self, machine: BuildMachine | AppMachine) -> None:
        """Idempotent, bounded, never raises (it runs during cleanup)."""
        try:
            async with asyncio.timeout(SHUTDOWN_TIMEOUT):
                await machine.shutdown()
        except (TimeoutError, EmbervmError, OSError) as exc:
            logger.warning("stopping a build VM failed: %r", exc)
            self.log.emit("warning", f"stopping a build VM failed ({type(exc).__name__})")
