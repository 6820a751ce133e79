"""MicroVM operations: Run/Get/List/Suspend/Resume/Terminate and the two token calls.

RunMicrovm admits the VM in one store transaction (quotas, host capacity, idempotency, the
version still runnable) and returns PENDING at once; the supervisor launches it. Suspend,
Resume and Terminate are compare-and-set transitions answered immediately, the work follows
in the background (GetMicrovm's state is eventually consistent, as on AWS).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

from embervm.contracts import PortGrant, TokenKind
from embervm.core import render
from embervm.core.caller import Caller
from embervm.core.context import CoreContext, claim_for
from embervm.core.ids import (
    EGRESS_CONNECTORS,
    INGRESS_CONNECTORS,
    connector_arn,
    connector_name,
    new_microvm_id,
    normalize_connectors,
    parse_image_identifier,
    state_reason,
)
from embervm.core.images import ImageService, _empty_lines
from embervm.core.paging import page_size
from embervm.core.vmspec import vm_spec
from embervm.errors import (
    ConflictError,
    InsufficientCapacityError,
    InternalError,
    NotFoundError,
    QuotaExceededError,
    ValidationError,
)
from embervm.sizing import vcpus_for
from embervm.store import MicrovmRecord, Page, RunnableVersion, VersionRecord
from embervm.wire import AUTH_HEADER, SHELL_PORT


def _not_found(microvm_id: str) -> NotFoundError:
    return NotFoundError(
        f"MicroVM {microvm_id} not found", resourceId=microvm_id, resourceType="Microvm"
    )


def _conflict(vm: MicrovmRecord, action: str) -> ConflictError:
    return ConflictError(
        f"MicroVM {vm.microvm_id} is {vm.state}; cannot {action}",
        resourceId=vm.microvm_id,
        resourceType="Microvm",
    )


class MicrovmService:
    def __init__(self, ctx: CoreContext, images: ImageService) -> None:
        self.ctx = ctx
        self.images = images

    async def _vm(self, microvm_id: str, caller: Caller) -> MicrovmRecord:
        vm = await self.ctx.repo.get_microvm(microvm_id)
        if vm is None or vm.account_id != caller.account_id:
            raise _not_found(microvm_id)
        return vm

    # -- run ---------------------------------------------------------------------------------

    def _connectors(self, params: dict[str, Any], caller: Caller) -> tuple[list[str], list[str]]:
        if params.get("ingressNetworkConnectors") is None:
            ingress = [connector_arn(caller.region, "HTTP_INGRESS")]
        else:
            ingress = normalize_connectors(
                params["ingressNetworkConnectors"],
                region=caller.region,
                allowed=INGRESS_CONNECTORS,
                field="ingressNetworkConnectors",
            )
        names = {connector_name(c) for c in ingress}
        for exclusive in ("ALL_INGRESS", "NO_INGRESS"):
            if exclusive in names and len(names) > 1:
                raise ValidationError(
                    f"ingressNetworkConnectors: {exclusive} cannot be combined with other "
                    "ingress connectors"
                )
        if params.get("egressNetworkConnectors") is None:
            egress = [connector_arn(caller.region, "INTERNET_EGRESS")]
        else:
            egress = normalize_connectors(
                params["egressNetworkConnectors"],
                region=caller.region,
                allowed=EGRESS_CONNECTORS,
                field="egressNetworkConnectors",
            )
        return ingress, egress

    async def run(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        identifier = str(params["imageIdentifier"])
        ref = parse_image_identifier(identifier, caller.account_id)
        if ref.managed:
            raise ValidationError(
                f"'{identifier}' is a managed base image: build an image FROM it, then run that"
            )
        ingress, egress = self._connectors(params, caller)  # input first, then resources
        image = await self.images._image(identifier, caller)
        version_name = params.get("imageVersion") or image.latest_active_version
        if version_name is None:
            raise ConflictError(
                f"MicroVM image {image.name} has no ACTIVE version yet (state {image.state})",
                resourceId=image.arn,
                resourceType="MicrovmImage",
            )
        version = await self.images._version(image, str(version_name))
        self._check_runnable(version, image.arn)
        duration = int(
            params.get("maximumDurationInSeconds")
            or self.ctx.limits.default_maximum_duration_seconds
        )
        if not 1 <= duration <= 28_800:
            raise ValidationError("maximumDurationInSeconds must be between 1 and 28800")
        policy = params.get("idlePolicy")
        if policy is not None and int(policy["maxIdleDurationSeconds"]) < 60:
            raise ValidationError("idlePolicy.maxIdleDurationSeconds must be at least 60")
        now = self.ctx.now()
        vm_id = new_microvm_id()
        settings = self.ctx.settings
        vm = MicrovmRecord(
            microvm_id=vm_id,
            account_id=caller.account_id,
            image_name=image.name,
            image_arn=image.arn,
            image_version=version.version,
            state="PENDING",
            endpoint=f"https://{vm_id}.{settings.domain}:{settings.proxy_port}",
            memory_mib=version.memory_mib,
            vcpus=vcpus_for(version.memory_mib),
            maximum_duration_seconds=duration,
            started_at=now,
            updated_at=now,
            expires_at=now + timedelta(seconds=duration),
            host_id=self.ctx.supervisor.host_id,
            ingress=ingress,
            egress=egress,
            idle_policy=dict(policy) if policy is not None else None,
            hooks=version.config.get("hooks"),
            logging=params.get("logging"),
            run_hook_payload=params.get("runHookPayload"),
            execution_role_arn=params.get("executionRoleArn"),
            snapshot_dir=version.snapshot_dir,
        )
        claim = claim_for(
            params, account_id=caller.account_id, scope="RunMicrovm", resource_id=vm_id
        )
        outcome = await self.ctx.repo.admit_microvm(
            vm,
            limits=self.ctx.supervisor.capacity(),
            runnable=RunnableVersion(
                image.account_id, image.name, version.number, statuses=("ACTIVE",)
            ),
            claim=claim,
        )
        if outcome.status == "created":
            self.ctx.supervisor.start_launch(vm, lambda: vm_spec(vm, version))
            return render.microvm(vm)
        return await self._refused(outcome.status, outcome.resource_id, caller, image.arn)

    def _check_runnable(self, version: VersionRecord, arn: str) -> None:
        if version.state != "SUCCESSFUL" or version.status != "ACTIVE":
            raise ConflictError(
                f"Version {version.version} is {version.state}/{version.status}; only a "
                "SUCCESSFUL, ACTIVE version can be run",
                resourceId=f"{arn}:{version.version}",
                resourceType="MicrovmImageVersion",
            )

    async def _refused(
        self, status: str, resource_id: str | None, caller: Caller, arn: str
    ) -> dict[str, Any]:
        if status == "replayed" and resource_id:
            return render.microvm(await self._vm(resource_id, caller))
        if status == "token_reused":
            raise ConflictError("clientToken was already used with a different request")
        if status == "quota_microvms":
            raise QuotaExceededError(
                f"At most {self.ctx.limits.max_microvms} MicroVMs per account",
                resourceType="Microvm",
            )
        if status == "quota_memory":
            raise QuotaExceededError(
                f"MicroVM memory per account is limited to "
                f"{self.ctx.limits.max_total_memory_mib} MiB",
                resourceType="Microvm",
            )
        if status == "capacity":
            raise InsufficientCapacityError("Not enough memory on the host for this MicroVM")
        if status == "missing":
            raise NotFoundError("The MicroVM image version was deleted", resourceId=arn)
        raise ConflictError(
            "The MicroVM image version is no longer runnable",
            resourceId=arn,
            resourceType="MicrovmImageVersion",
        )

    # -- reads -------------------------------------------------------------------------------

    async def get(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        return render.microvm(await self._vm(str(params["microvmIdentifier"]), caller))

    async def list(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        image_name = None
        if params.get("imageIdentifier"):
            image_name = parse_image_identifier(
                str(params["imageIdentifier"]), caller.account_id
            ).name
        image_version = params.get("imageVersion") or None
        scope = f"ListMicrovms|{caller.account_id}|{image_name or ''}|{image_version or ''}"
        after = self.ctx.pages.decode(params.get("nextToken"), scope)
        limit = page_size(params.get("maxResults"))
        rows = await self.ctx.repo.list_microvms(
            caller.account_id,
            Page(limit + 1, after),
            image_name=image_name,
            image_version=image_version,
        )
        out: dict[str, Any] = {"items": [render.microvm_item(r) for r in rows[:limit]]}
        if len(rows) > limit:
            out["nextToken"] = self.ctx.pages.encode(scope, int(rows[limit - 1].seq or 0))
        return out

    # -- transitions -------------------------------------------------------------------------

    async def suspend(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        vm = await self._vm(str(params["microvmIdentifier"]), caller)
        result = await self.ctx.supervisor.suspend(vm.microvm_id)
        if result.status == "ok":
            return {}
        current = result.record or vm
        if current.state == "SUSPENDING":
            return {}  # already on its way
        raise _conflict(current, "suspend it (only a RUNNING MicroVM can be suspended)")

    async def resume(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        vm = await self._vm(str(params["microvmIdentifier"]), caller)
        result = await self.ctx.supervisor.resume(vm.microvm_id)
        if result.status == "ok":
            return {}
        if result.status == "capacity":
            raise InsufficientCapacityError("Not enough memory on the host to resume")
        current = result.record or vm
        if current.state == "PENDING" and current.suspended_at is not None:
            return {}  # a resume is already under way
        raise _conflict(current, "resume it (only a SUSPENDED MicroVM can be resumed)")

    async def terminate(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        vm = await self._vm(str(params["microvmIdentifier"]), caller)
        result = await self.ctx.supervisor.terminate(
            vm.microvm_id, state_reason("TerminatedByUser")
        )
        if result.status == "missing":
            raise _not_found(vm.microvm_id)
        return {}  # ok, or already TERMINATING/TERMINATED: idempotent

    # -- tokens ------------------------------------------------------------------------------

    def _token_vm_check(self, vm: MicrovmRecord, minutes: int) -> None:
        if vm.state in ("TERMINATING", "TERMINATED"):
            raise _conflict(vm, "create a token for it")
        limit = self.ctx.limits.max_token_minutes
        if not 1 <= minutes <= limit:
            raise ValidationError(f"expirationInMinutes must be between 1 and {limit}")

    def _issue(self, vm: MicrovmRecord, kind: TokenKind, ports: PortGrant, minutes: int) -> str:
        if self.ctx.tokens is None:
            raise InternalError("No token authority is configured")
        return self.ctx.tokens.issue(
            vm.microvm_id, kind=kind, ports=ports, expires_in_minutes=minutes
        )

    async def auth_token(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        vm = await self._vm(str(params["microvmIdentifier"]), caller)
        minutes = int(params["expirationInMinutes"])
        self._token_vm_check(vm, minutes)
        names = {connector_name(c) for c in vm.ingress}
        if not names & {"ALL_INGRESS", "HTTP_INGRESS"}:
            raise ValidationError(
                f"MicroVM {vm.microvm_id} was run without HTTP_INGRESS or ALL_INGRESS"
            )
        specs = list(params.get("allowedPorts") or [])
        if not specs:
            raise ValidationError("allowedPorts must name at least one port")
        for spec in specs:
            chosen = [k for k in ("port", "range", "allPorts") if spec.get(k) is not None]
            if len(chosen) != 1:
                raise ValidationError(
                    "each allowedPorts entry must set exactly one of port, range, allPorts"
                )
            port_range = spec.get("range")
            if port_range and int(port_range["startPort"]) > int(port_range["endPort"]):
                raise ValidationError("allowedPorts range: startPort must not exceed endPort")
        token = self._issue(vm, "endpoint", PortGrant.from_model(specs), minutes)
        return {"authToken": {AUTH_HEADER: token}}

    async def shell_token(self, params: dict[str, Any], caller: Caller) -> dict[str, Any]:
        vm = await self._vm(str(params["microvmIdentifier"]), caller)
        minutes = int(params["expirationInMinutes"])
        self._token_vm_check(vm, minutes)
        names = {connector_name(c) for c in vm.ingress}
        if not names & {"ALL_INGRESS", "SHELL_INGRESS"}:
            raise ValidationError(
                f"MicroVM {vm.microvm_id} was run without SHELL_INGRESS or ALL_INGRESS"
            )
        grant = PortGrant(ranges=((SHELL_PORT, SHELL_PORT),))
        return {"authToken": {AUTH_HEADER: self._issue(vm, "shell", grant, minutes)}}

    # -- logs --------------------------------------------------------------------------------

    async def app_log_lines(
        self, microvm_id: str, follow: bool, caller: Caller
    ) -> AsyncIterator[str]:
        vm = await self._vm(microvm_id, caller)
        if self.ctx.app_logs is None:
            return _empty_lines()
        return self.ctx.app_logs.lines(vm.microvm_id, follow=follow)
