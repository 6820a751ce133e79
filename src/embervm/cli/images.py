"""Image commands: create (zip a folder, upload, follow the build), ls, get, logs, delete."""

from __future__ import annotations

import json
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import typer
from rich.markup import escape

from embervm.cli._app import current
from embervm.cli._context import EXIT_BUILD_FAILED, EXIT_INVALID, CliContext, CliError
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
from embervm.cli._signed import stream_lines, upload

images_app = typer.Typer(help="Build and manage MicroVM images.", no_args_is_help=True)

BASE_IMAGE_ARN = "arn:aws:lambda:{region}:aws:microvm-image:{name}"
# The model requires a build role; Embervm has no IAM, so any well-formed role ARN is accepted.
DEFAULT_BUILD_ROLE = "arn:aws:iam::000000000000:role/embervm-build"
FINAL_IMAGE_STATES = {"CREATED", "CREATE_FAILED", "UPDATED", "UPDATE_FAILED", "DELETED"}
FAILED_IMAGE_STATES = {"CREATE_FAILED", "UPDATE_FAILED"}


def upload_context(ctx: CliContext, source: Path) -> str:
    """Zip ``source`` (``zip_context``) and upload it; the ``codeArtifact.uri`` to build from."""
    with tempfile.TemporaryDirectory(prefix="embervm-zip-") as scratch:
        return upload(ctx, zip_context(source.expanduser(), Path(scratch)))


def zip_context(source: Path, scratch: Path) -> Path:
    """Zip a build folder (honouring .dockerignore) into the folder ``scratch``.

    A ready zip is used as it is. The server refuses links in a zip, so a link to a file
    inside the folder is zipped as that file; a link leading out of the folder (or to a
    folder) is refused here, where the user can fix it, rather than silently zipping whatever
    it points at.
    """
    if source.is_file():
        if not zipfile.is_zipfile(source):
            raise CliError(f"{source} is not a zip file or a folder", EXIT_INVALID)
        return source.resolve()
    if not (source / "Dockerfile").is_file():
        raise CliError(f"{source} has no Dockerfile", EXIT_INVALID)
    from embervm.imagebuild.dockerignore import DockerIgnore

    ignore = DockerIgnore.from_context(source)
    files = sorted(
        path
        for path in source.rglob("*")
        if (path.is_file() or path.is_symlink())
        and not ignore.is_excluded(path.relative_to(source).as_posix())
    )
    root = source.resolve()
    for path in files:
        if path.is_symlink() and not (path.resolve().is_relative_to(root) and path.is_file()):
            raise CliError(
                f"{path} is a link out of {source} (or to a folder): replace it with the file "
                "or add it to .dockerignore",
                EXIT_INVALID,
            )
    target = scratch / "context.zip"
    with zipfile.ZipFile(target, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path in files:
            archive.write(path.resolve(), path.relative_to(source).as_posix())
    return target


def _image_exists(client: Any, name: str) -> bool:
    try:
        client.get_microvm_image(imageIdentifier=name)
    except client.exceptions.ResourceNotFoundException:
        return False
    return True


@images_app.command("create")
@handle_errors
def create(
    source: Annotated[Path, typer.Argument(help="A folder with a Dockerfile, or a zip.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Image name.")],
    base: Annotated[str, typer.Option(help="Managed base image.")] = "debian12",
    memory: Annotated[int | None, typer.Option(help="Baseline memory in MiB.")] = None,
    env: Annotated[
        list[str] | None, typer.Option("--env", "-e", help="NAME=value at run time.")
    ] = None,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Show the build live.")] = False,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Build an image (a new version if it exists) from a folder or zip."""
    environment: dict[str, str] | None = None
    if env:  # checked before the upload: a typo must not cost one
        pairs = [item.partition("=") for item in env]
        if any(not sep for _, sep, _ in pairs):
            raise CliError("--env takes NAME=value", 2)
        environment = {key: value for key, _, value in pairs}
    ctx = current()
    client = ctx.client()
    uri = upload_context(ctx, source)
    request: dict[str, Any] = {
        "baseImageArn": BASE_IMAGE_ARN.format(region=ctx.region, name=base),
        "buildRoleArn": DEFAULT_BUILD_ROLE,
        "codeArtifact": {"uri": uri},
    }
    if memory is not None:
        request["resources"] = [{"minimumMemoryInMiB": memory}]
    if environment is not None:
        request["environmentVariables"] = environment
    started = time.monotonic()
    if _image_exists(client, name):
        image = strip_metadata(client.update_microvm_image(imageIdentifier=name, **request))
    else:
        image = strip_metadata(client.create_microvm_image(name=name, **request))
    if follow:
        image = _follow_build(name, str(image["imageVersion"]), output)
    elapsed = time.monotonic() - started
    result = {**image, "seconds": round(elapsed, 3)}
    emit(
        result,
        output,
        lambda: console.print(
            f"{name} version {image.get('imageVersion')}: {image['state']} ({elapsed:.1f} s)"
        ),
    )
    if image["state"] in FAILED_IMAGE_STATES:
        reason = image.get("stateReason") or _version_reason(name, str(image["imageVersion"]))
        if output is OutputFormat.text and reason:
            console.print(f"[red]reason:[/red] {escape(safe_text(reason))}")
        raise typer.Exit(EXIT_BUILD_FAILED)


def _version_reason(name: str, version: str) -> str:
    response = (
        current().client().get_microvm_image_version(imageIdentifier=name, imageVersion=version)
    )
    return str(response.get("stateReason", ""))


def build_log_path(name: str, version: str) -> str:
    """The build log endpoint of one version (user input quoted: it is a path segment)."""
    return (
        f"/embervm/v1/microvm-images/{quote(name, safe='')}/versions/{quote(version, safe='')}/logs"
    )


def _follow_build(name: str, version: str, output: OutputFormat) -> dict[str, Any]:
    """Print build log lines as they come, then return the image once the build has ended."""
    for line in stream_lines(current(), build_log_path(name, version), follow=True):
        if output is OutputFormat.text:
            sys.stdout.write(_render(line) + "\n")
            sys.stdout.flush()
    client = current().client()
    deadline = time.monotonic() + 60
    while True:
        image = strip_metadata(client.get_microvm_image(imageIdentifier=name))
        if image["state"] in FINAL_IMAGE_STATES or time.monotonic() > deadline:
            return {**image, "imageVersion": version}
        time.sleep(0.5)


def _render(line: str) -> str:
    """A build log record (JSON) as a line for people: ``[step] message``."""
    try:
        record = json.loads(line)
    except ValueError:
        return safe_text(line)
    if not isinstance(record, dict):
        return safe_text(line)
    step = record.get("step")
    prefix = f"[{step}] " if step else ""
    return safe_text(f"{prefix}{record.get('message', '')}")


def _as_record(line: str) -> str:
    """A build log line as one JSON object (records pass through; anything else is wrapped)."""
    try:
        record = json.loads(line)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        record = {"message": line}
    return json.dumps(record, ensure_ascii=False)


@images_app.command("ls")
@handle_errors
def ls(output: OutputOption = OutputFormat.text) -> None:
    """List images."""
    client = current().client()
    images: list[dict[str, Any]] = []
    for page in client.get_paginator("list_microvm_images").paginate():
        images.extend(page.get("items", []))
    emit(
        images,
        output,
        lambda: table(
            ["NAME", "STATE", "LATEST", "CREATED"],
            (
                [
                    i.get("name"),
                    i.get("state"),
                    i.get("latestActiveImageVersion"),
                    i.get("createdAt"),
                ]
                for i in images
            ),
        ),
    )


def newest_version(name: str) -> str:
    """The most recently created version of an image (whatever its state)."""
    client = current().client()
    versions: list[dict[str, Any]] = []
    for page in client.get_paginator("list_microvm_image_versions").paginate(imageIdentifier=name):
        versions.extend(page.get("items", []))
    if not versions:
        raise CliError(f"image {name} has no versions", 4)
    return str(max(versions, key=lambda item: item["createdAt"])["imageVersion"])


@images_app.command("get")
@handle_errors
def get(
    name: Annotated[str, typer.Argument(help="Image name or ARN.")],
    output: OutputOption = OutputFormat.text,
) -> None:
    """Show one image."""
    image = strip_metadata(current().client().get_microvm_image(imageIdentifier=name))
    emit(image, output, lambda: fields(image.items()))


@images_app.command("logs")
@handle_errors
def logs(
    name: Annotated[str, typer.Argument(help="Image name.")],
    version: Annotated[str | None, typer.Option(help="Version (default: the newest).")] = None,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="Keep printing new lines.")
    ] = False,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Print a build's log."""
    if version is None:
        version = newest_version(name)
    for line in stream_lines(current(), build_log_path(name, version), follow=follow):
        sys.stdout.write(
            (_as_record(line) if output is OutputFormat.json else _render(line)) + "\n"
        )
        if follow:
            sys.stdout.flush()


@images_app.command("delete")
@handle_errors
def delete(
    name: Annotated[str, typer.Argument(help="Image name or ARN.")],
    version: Annotated[str | None, typer.Option(help="Delete only this version.")] = None,
    output: OutputOption = OutputFormat.text,
) -> None:
    """Delete an image or one of its versions (idempotent)."""
    client = current().client()
    if version:
        response = client.delete_microvm_image_version(imageIdentifier=name, imageVersion=version)
    else:
        response = client.delete_microvm_image(imageIdentifier=name)
    result = strip_metadata(response)
    emit(
        result,
        output,
        lambda: console.print(f"deleted {name}{' ' + version if version else ''}", markup=False),
    )


def register(app: typer.Typer) -> None:
    app.add_typer(images_app, name="images")
