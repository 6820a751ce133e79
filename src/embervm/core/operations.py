"""``Operations``: the one entry point of the control API into core.

``await ops.invoke("RunMicrovm", params, caller)`` — params and the returned dict are keyed by
the botocore model's member names (shape rules already checked by the API; cross-field and
state rules are checked here). Every call is rate-limited per (account, operation) first.

In a fleet (docs/FLEET.md) an API process's ``Operations`` only writes intents
(``runs_vms=False``, with the ``placement`` of its hosts) and a host's carries them out
(``fence``: its id and epoch; ``supervisor.adopt``).

Lifetime: ``await ops.start()`` reconciles what a previous run left half-done and starts the
lifecycle timers; ``await ops.stop()`` cancels background work (or ``async with ops:``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from embervm.config import Settings
from embervm.core.caller import Caller
from embervm.core.clock import Clock, SystemClock
from embervm.core.context import CoreContext
from embervm.core.images import ImageService
from embervm.core.lifecycle import Lifecycle
from embervm.core.limits import CoreLimits, RateLimiter
from embervm.core.microvms import MicrovmService
from embervm.core.paging import PageTokens, load_or_create_key
from embervm.core.seams import AppLogSource, BuildLogSource, HostBackend, ImageBuilder, TokenIssuer
from embervm.core.supervisor import Supervisor
from embervm.errors import InternalError, ValidationError
from embervm.model import OPERATION_NAMES, OperationName
from embervm.store import HostFence, HostRegistry, Placement, Repository

Handler = Callable[[dict[str, Any], Caller], Awaitable[dict[str, Any]]]

# Members of the model that Embervm cannot honour: refused, never silently ignored.
UNSUPPORTED_MEMBERS = {
    "kmsKeyIdentifier": (
        "kmsKeyIdentifier is not supported: Embervm has no AWS KMS and cannot encrypt with a "
        "customer managed key. Omit it, and encrypt the data directory's disk on the host"
    ),
}


class Operations:
    def __init__(
        self,
        *,
        settings: Settings,
        repository: Repository,
        host: HostBackend,
        builder: ImageBuilder,
        tokens: TokenIssuer | None = None,
        clock: Clock | None = None,
        limits: CoreLimits | None = None,
        build_logs: BuildLogSource | None = None,
        app_logs: AppLogSource | None = None,
        page_key: bytes | None = None,
        host_id: str = "local",
        fence: HostFence | None = None,
        runs_vms: bool = True,
        placement: Placement | None = None,
        hosts: HostRegistry | None = None,
        tick_interval: float = 1.0,
        chipset_generation: str = "x86-64-v2",
    ) -> None:
        self.settings = settings
        self.repository = repository
        self.clock = clock or SystemClock()
        self.limits = limits or CoreLimits()
        self.supervisor = Supervisor(
            repository=repository,
            host=host,
            builder=builder,
            clock=self.clock,
            limits=self.limits,
            host_id=host_id,
            fence=fence,
            runs_vms=runs_vms,
            placement=placement,
            hosts=hosts,
        )
        self.lifecycle = Lifecycle(
            self.supervisor, repository, self.clock, tick_interval=tick_interval
        )
        ctx = CoreContext(
            settings=settings,
            repo=repository,
            supervisor=self.supervisor,
            clock=self.clock,
            limits=self.limits,
            pages=PageTokens(page_key or load_or_create_key(settings.data_dir)),
            tokens=tokens,
            build_logs=build_logs,
            app_logs=app_logs,
            chipset_generation=chipset_generation,
        )
        self.images = ImageService(ctx)
        self.microvms = MicrovmService(ctx, self.images)
        self._rates = RateLimiter(self.limits.rate_limits, self.clock.now)
        self._handlers: dict[OperationName, Handler] = {
            "CreateMicrovmImage": self.images.create,
            "UpdateMicrovmImage": self.images.update,
            "GetMicrovmImage": self.images.get,
            "ListMicrovmImages": self.images.list,
            "DeleteMicrovmImage": self.images.delete,
            "GetMicrovmImageVersion": self.images.get_version,
            "ListMicrovmImageVersions": self.images.list_versions,
            "UpdateMicrovmImageVersion": self.images.update_version,
            "DeleteMicrovmImageVersion": self.images.delete_version,
            "GetMicrovmImageBuild": self.images.get_build,
            "ListMicrovmImageBuilds": self.images.list_builds,
            "ListManagedMicrovmImages": self.images.list_managed,
            "ListManagedMicrovmImageVersions": self.images.list_managed_versions,
            "TagResource": self.images.tag,
            "UntagResource": self.images.untag,
            "ListTags": self.images.list_tags,
            "RunMicrovm": self.microvms.run,
            "GetMicrovm": self.microvms.get,
            "ListMicrovms": self.microvms.list,
            "SuspendMicrovm": self.microvms.suspend,
            "ResumeMicrovm": self.microvms.resume,
            "TerminateMicrovm": self.microvms.terminate,
            "CreateMicrovmAuthToken": self.microvms.auth_token,
            "CreateMicrovmShellAuthToken": self.microvms.shell_token,
        }
        unserved = set(OPERATION_NAMES) - self._handlers.keys()
        if unserved:  # the model gained an operation (scripts/gen_model.py) and core has none
            raise InternalError(f"no handler for {', '.join(sorted(unserved))}")

    async def invoke(
        self, operation: OperationName, params: dict[str, Any], caller: Caller
    ) -> dict[str, Any]:
        handler = self._handlers[operation]
        self._rates.check(caller.account_id, operation)
        for member, reason in UNSUPPORTED_MEMBERS.items():
            if params.get(member) is not None:
                raise ValidationError(reason)
        return await handler(params, caller)

    # -- log extension endpoints -------------------------------------------------------------

    def _caller(self, caller: Caller | None) -> Caller:
        return caller or Caller("", self.settings.account_id, self.settings.region)

    async def build_log_lines(
        self, image: str, version: str, follow: bool = False, *, caller: Caller | None = None
    ) -> AsyncIterator[str]:
        """Lines of a build's log (NotFoundError first if the image/version does not exist)."""
        return await self.images.build_log_lines(image, version, follow, self._caller(caller))

    async def app_log_lines(
        self, microvm_id: str, follow: bool = False, *, caller: Caller | None = None
    ) -> AsyncIterator[str]:
        """Lines of a VM's app output (NotFoundError first if the VM does not exist)."""
        return await self.microvms.app_log_lines(microvm_id, follow, self._caller(caller))

    # -- host events -------------------------------------------------------------------------

    async def vm_exited(self, microvm_id: str, reason: str) -> None:
        """For ``LocalHost(on_exit=...)``: a VMM exited unexpectedly."""
        await self.supervisor.vm_exited(microvm_id, reason)

    # -- lifetime ----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.supervisor.start()
        await self.lifecycle.start()

    async def stop(self) -> None:
        await self.lifecycle.stop()
        await self.supervisor.stop()

    async def __aenter__(self) -> Operations:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
