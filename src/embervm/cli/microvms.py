"""MicroVM commands: run, ls, get, suspend, resume, terminate, token, curl, logs."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any
from urllib.parse import quote, urlsplit

import typer
from rich.markup import escape

from embervm.cli._app import current
from embervm.cli._context import EXIT_INVALID, CliError
from embervm.cli._errors import handle_errors
from embervm.cli._output import (
    OutputFormat,
    OutputOption,
    console,
    emit,
    fields,
    safe_text,
    strip_metadata,
    table,
)
from embervm.cli._signed import stream_lines
from embervm.config import DataDir
from embervm.imagebuild.request import DEFAULT_APP_MEMORY_MIB as DEFAULT_MEMORY_MIB
from embervm.wire import APP_PORT, AUTH_HEADER, PORT_HEADER

CONNECTOR_ARN = "arn:aws:lambda:{region}:aws:network-connector:aws-network-connector:{name}"
TOKEN_HEADER = AUTH_HEADER
TERMINAL_STATES = {"TERMINATED"}

IdArg = Annotated[str, typer.Argument(help="MicroVM id.")]


def connector(name: str) -> str:
    return CONNECTOR_ARN.format(region=current().region, name=name)


def _describe(vm: dict[str, Any]) -> None:
    fields(
        (key, vm.get(key))
        for key in (
            "microvmId",
            "state",
            "stateReason",
            "endpoint",
            "imageArn",
            "imageVersion",
            "startedAt",
            "terminatedAt",
            "idlePolicy",
            "maximumDurationInSeconds",
            "ingressNetworkConnectors",
            "egressNetworkConnectors",
        )
    )


def wait_for_state(vm_id: str, wanted: set[str], *, timeout: float) -> dict[str, Any]:
    """Poll GetMicrovm until the VM is in one of ``wanted`` (or terminated) or time runs out."""
    client = current().client()
    deadline = time.monotonic() + timeout
    delay = 0.1
    while True:
        vm = strip_metadata(client.get_microvm(microvmIdentifier=vm_id))
        if vm["state"] in wanted or vm["state"] in TERMINAL_STATES:
            return vm
        if time.monotonic() > deadline:
            raise CliError(f"{vm_id} is still {vm['state']} after {timeout:.0f} s")
        time.sleep(delay)
        delay = min(delay * 1.5, 1.0)


def issue_token(vm_id: str, *, minutes: int, port: int | None, for_shell: bool) -> str:
    client = current().client()
    if for_shell:
        response = client.create_microvm_shell_auth_token(
            microvmIdentifier=vm_id, expirationInMinutes=minutes
        )
    else:
        ports: list[dict[str, object]] = [{"port": port}] if port else [{"allPorts": {}}]
        response = client.create_microvm_auth_token(
            microvmIdentifier=vm_id, expirationInMinutes=minutes, allowedPorts=ports
        )
    parts: dict[str, str] = response["authToken"]
    return parts.get(TOKEN_HEADER) or next(iter(parts.values()))


def curl_line(endpoint: str, token: str) -> str:
    host = urlsplit(endpoint).hostname or ""
    port = urlsplit(endpoint).port or 443
    ca = DataDir(current().data_dir).ca_file
    return (
        f"curl --cacert {ca} --resolve {host}:{port}:127.0.0.1 "
        f'-H "{TOKEN_HEADER}: {token}" {endpoint}/'
    )


def _check_memory(client: Any, image: str, version: str | None, memory: int) -> None:
    if version is None:
        version = client.get_microvm_image(imageIdentifier=image).get("latestActiveImageVersion")
    if version is None:
        return  # RunMicrovm will say the image has no active version
    found = client.get_microvm_image_version(imageIdentifier=image, imageVersion=str(version))
    resources = found.get("resources") or [{}]
    built = int(resources[0].get("minimumMemoryInMiB") or DEFAULT_MEMORY_MIB)
    if built != memory:
        raise CliError(
            f"{image} version {version} is built for {built} MiB; a MicroVM restores that "
            f"snapshot, so it cannot run with {memory} MiB. Build a version with "
            f"`embervm images create DIR --name {image} --memory {memory}`.",
            EXIT_INVALID,
        )


@handle_errors
def run(
    image: Annotated[str, typer.Argument(help="Image name or ARN.")],
    version: Annotated[
        str | None, typer.Option(help="Image version (default: latest active).")
    ] = None,
    idle_seconds: Annotated[
        int | None,
        typer.Option(help="Suspend after this many idle seconds (>= 60); auto-resume on traffic."),
    ] = None,
    suspended_seconds: Annotated[
        int, typer.Option(help="Terminate after this long suspended (with --idle-seconds).")
    ] = 3600,
    max_duration: Annotated[int | None, typer.Option(help="Maximum lifetime in seconds.")] = None,
    shell: Annotated[bool, typer.Option("--shell", help="Also allow shell access.")] = False,
    memory: Annotated[
        int | None,
        typer.Option(
            help="Expected baseline memory in MiB. A VM restores its image's snapshot, so its "
            "memory is the image's (`images create --memory`); a mismatch is an error."
        ),
    ] = None,
    egress: Annotated[bool, typer.Option(help="Allow internet egress.")] = True,
    payload: Annotated[str | None, typer.Option(help="runHookPayload for the /run hook.")] = None,
    wait: Annotated[bool, typer.Option(help="Wait until RUNNING.")] = True,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Run a MicroVM from an image; print its id, endpoint and a ready-to-use token."""
    client = current().client()
    request: dict[str, Any] = {
        "imageIdentifier": image,
        # The shell comes on top of the endpoint (ALL_INGRESS could not be combined with it).
        "ingressNetworkConnectors": [connector("HTTP_INGRESS")]
        + ([connector("SHELL_INGRESS")] if shell else []),
        # Omitted means INTERNET_EGRESS on the server; an empty list means none.
        "egressNetworkConnectors": [connector("INTERNET_EGRESS")] if egress else [],
    }
    if version:
        request["imageVersion"] = version
    if idle_seconds is not None:
        request["idlePolicy"] = {
            "maxIdleDurationSeconds": idle_seconds,
            "suspendedDurationSeconds": suspended_seconds,
            "autoResumeEnabled": True,
        }
    if max_duration is not None:
        request["maximumDurationInSeconds"] = max_duration
    if payload is not None:
        request["runHookPayload"] = payload
    if memory is not None:
        _check_memory(client, image, version, memory)
    started = time.monotonic()
    vm = strip_metadata(client.run_microvm(**request))
    if wait:
        vm = wait_for_state(vm["microvmId"], {"RUNNING"}, timeout=300)
    elapsed = time.monotonic() - started
    if vm["state"] == "TERMINATED":
        raise CliError(f"{vm['microvmId']} failed to start: {vm.get('stateReason', 'unknown')}")
    token = issue_token(vm["microvmId"], minutes=60, port=None, for_shell=False)
    result = {**vm, "token": token, "seconds": round(elapsed, 3)}

    def text() -> None:
        vm_id = escape(vm["microvmId"])
        console.print(f"[bold]{vm_id}[/bold] {escape(vm['state'])} in {elapsed:.2f} s")
        console.print(f"endpoint: {vm['endpoint']}", markup=False)
        console.print(f"token:    {token}", markup=False)
        console.print(f"try:      embervm curl {vm['microvmId']} /", markup=False)
        console.print(f"     or:  {curl_line(vm['endpoint'], token)}", markup=False)

    emit(result, output, text)


@handle_errors
def ls(
    all_states: Annotated[bool, typer.Option("--all", help="Include TERMINATED VMs.")] = False,
    output: OutputOption = OutputFormat.text,
) -> None:
    """List MicroVMs."""
    client = current().client()
    vms: list[dict[str, Any]] = []
    for page in client.get_paginator("list_microvms").paginate():
        vms.extend(page.get("items", []))
    if not all_states:
        vms = [vm for vm in vms if vm.get("state") != "TERMINATED"]
    emit(
        vms,
        output,
        lambda: table(
            ["ID", "STATE", "IMAGE", "VERSION", "STARTED"],
            (
                [
                    vm.get("microvmId"),
                    vm.get("state"),
                    str(vm.get("imageArn", "")).rsplit(":", 1)[-1],
                    vm.get("imageVersion"),
                    vm.get("startedAt"),
                ]
                for vm in vms
            ),
        ),
    )


@handle_errors
def get(vm_id: IdArg, output: OutputOption = OutputFormat.text) -> None:
    """Show one MicroVM."""
    vm = strip_metadata(current().client().get_microvm(microvmIdentifier=vm_id))
    emit(vm, output, lambda: _describe(vm))


def _transition(call: str, vm_id: str, wanted: set[str], wait: bool, output: OutputFormat) -> None:
    client = current().client()
    started = time.monotonic()
    getattr(client, call)(microvmIdentifier=vm_id)  # the model's answer holds nothing
    if wait:
        vm = wait_for_state(vm_id, wanted, timeout=300)
    else:
        vm = strip_metadata(client.get_microvm(microvmIdentifier=vm_id))
    elapsed = time.monotonic() - started
    result = {**vm, "seconds": round(elapsed, 3)}
    emit(
        result,
        output,
        lambda: console.print(f"{vm_id} {vm['state']} in {elapsed:.2f} s", markup=False),
    )


WaitOption = Annotated[bool, typer.Option(help="Wait for the transition to finish.")]


@handle_errors
def suspend(
    vm_id: IdArg, wait: WaitOption = True, output: OutputOption = OutputFormat.text
) -> None:
    """Suspend a MicroVM: memory and disk are kept on disk; no CPU or RAM is used."""
    _transition("suspend_microvm", vm_id, {"SUSPENDED"}, wait, output)


@handle_errors
def resume(vm_id: IdArg, wait: WaitOption = True, output: OutputOption = OutputFormat.text) -> None:
    """Resume a suspended MicroVM."""
    _transition("resume_microvm", vm_id, {"RUNNING"}, wait, output)


@handle_errors
def terminate(
    vm_id: IdArg, wait: WaitOption = True, output: OutputOption = OutputFormat.text
) -> None:
    """Terminate a MicroVM (idempotent)."""
    _transition("terminate_microvm", vm_id, {"TERMINATED"}, wait, output)


@handle_errors
def token(
    vm_id: IdArg,
    minutes: Annotated[int, typer.Option(min=1, max=60, help="Lifetime in minutes.")] = 60,
    port: Annotated[int | None, typer.Option(help="Only this port (default: all).")] = None,
    shell: Annotated[bool, typer.Option("--shell", help="A shell token.")] = False,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Create an endpoint (or shell) token for a MicroVM."""
    value = issue_token(vm_id, minutes=minutes, port=port, for_shell=shell)
    emit({TOKEN_HEADER: value}, output, lambda: typer.echo(value))


def endpoint_request(
    vm_id: str,
    path: str,
    *,
    method: str = "GET",
    data: str | None = None,
    headers: list[str] | None = None,
    port: int | None = None,
    timeout: float = 30.0,
) -> Any:
    """One request through the VM's endpoint with a fresh token; returns the httpx response.

    Connects to 127.0.0.1 with the endpoint's host name in the Host header and TLS SNI, so it
    works where the system resolver does not resolve ``*.localhost``.
    """
    import httpx

    ctx = current()
    vm = ctx.client().get_microvm(microvmIdentifier=vm_id)
    value = issue_token(vm_id, minutes=5, port=port, for_shell=False)
    parts = urlsplit(vm["endpoint"])
    host = parts.hostname or ""
    url = f"https://127.0.0.1:{parts.port or 443}/{path.lstrip('/')}"
    sent = {"Host": host if parts.port is None else f"{host}:{parts.port}", TOKEN_HEADER: value}
    if port:
        sent[PORT_HEADER] = str(port)
    for line in headers or []:
        name, sep, val = line.partition(":")
        if not sep:
            raise CliError(f"bad header {line!r}: expected 'Name: value'", 2)
        sent[name.strip()] = val.strip()
    tls = ctx.endpoint_tls()
    try:
        with httpx.Client(verify=tls, timeout=httpx.Timeout(timeout), http2=True) as client:
            return client.request(
                method, url, headers=sent, content=data, extensions={"sni_hostname": host}
            )
    except httpx.TransportError as exc:
        raise CliError(f"request to {vm['endpoint']} failed: {exc}", 3) from exc


@handle_errors
def curl(
    vm_id: IdArg,
    path: Annotated[str, typer.Argument(help="Path of the request.")] = "/",
    method: Annotated[str, typer.Option("--request", "-X", help="HTTP method.")] = "GET",
    data: Annotated[str | None, typer.Option("--data", "-d", help="Request body.")] = None,
    header: Annotated[
        list[str] | None, typer.Option("--header", "-H", help="Extra header 'Name: value'.")
    ] = None,
    port: Annotated[
        int | None, typer.Option(help=f"Target port in the VM (default {APP_PORT}).")
    ] = None,
    include: Annotated[
        bool, typer.Option("--include", "-i", help="Show status and headers.")
    ] = False,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Send one request to a MicroVM's endpoint with a fresh token (works without DNS)."""
    started = time.monotonic()
    response = endpoint_request(
        vm_id, path, method=method, data=data, headers=header or [], port=port
    )
    elapsed = time.monotonic() - started
    result = {
        "status": response.status_code,
        "headers": dict(response.headers),
        "body": response.text,
        "seconds": round(elapsed, 3),
    }

    def text() -> None:
        if include:
            console.print(f"{response.http_version} {response.status_code}", markup=False)
            for name, val in response.headers.items():  # the app's: printable, never markup
                console.print(safe_text(f"{name}: {val}"), markup=False)
            console.print()
        sys.stdout.write(response.text)
        if response.text and not response.text.endswith("\n"):
            sys.stdout.write("\n")

    emit(result, output, text)
    if response.status_code >= 400:
        raise typer.Exit(1)


@handle_errors
def logs(
    vm_id: IdArg,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines until the VM ends.")
    ] = False,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Print the app's output (stdout and stderr of CMD/ENTRYPOINT).

    ``--output json`` prints one JSON object per line: ``{"microvmId": ..., "line": ...}``.
    """
    path = f"/embervm/v1/microvms/{quote(vm_id, safe='')}/logs"
    for line in stream_lines(current(), path, follow=follow):
        if output is OutputFormat.json:
            text = json.dumps({"microvmId": vm_id, "line": line}, ensure_ascii=False)
        else:
            text = safe_text(line)
        sys.stdout.write(text + "\n")
        if follow:  # a follower sees each line at once; a dump is written in big blocks
            sys.stdout.flush()


def register(app: typer.Typer) -> None:
    for command in (run, ls, get, suspend, resume, terminate, token, curl, logs):
        app.command()(command)
