"""``embervm images``: the build folder's zip, the requests sent (checked against the model by
a botocore ``Stubber``), the build log for people and scripts, and the exit codes."""

from __future__ import annotations

import datetime as dt
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from botocore.stub import Stubber
from typer.testing import CliRunner

from embervm.cli import images
from embervm.cli._context import EXIT_INVALID, CliContext, CliError

runner = CliRunner()
cli = typer.Typer()
images.register(cli)

T0 = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
ARN = "arn:aws:lambda:us-east-1:000000000000:microvm-image:web"
BASE = "arn:aws:lambda:us-east-1:aws:microvm-image:debian12"
URI = "file:///data/uploads/abc.zip"


def _image(state: str, version: str = "1", **extra: Any) -> dict[str, Any]:
    return {
        "imageArn": ARN,
        "name": "web",
        "state": state,
        "createdAt": T0,
        "baseImageArn": BASE,
        "buildRoleArn": images.DEFAULT_BUILD_ROLE,
        "codeArtifact": {"uri": URI},
        "imageVersion": version,
        **extra,
    }


def _summary(state: str, **extra: Any) -> dict[str, Any]:
    """What GetMicrovmImage answers (no version fields)."""
    return {"imageArn": ARN, "name": "web", "state": state, "createdAt": T0, **extra}


def _version(version: str, created: dt.datetime, **extra: Any) -> dict[str, Any]:
    return {
        "baseImageArn": BASE,
        "buildRoleArn": images.DEFAULT_BUILD_ROLE,
        "codeArtifact": {"uri": URI},
        "imageArn": ARN,
        "imageVersion": version,
        "state": "CREATED",
        "status": "ACTIVE",
        "createdAt": created,
        **extra,
    }


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    app = tmp_path / "app"
    (app / "src").mkdir(parents=True)
    (app / "Dockerfile").write_text("FROM embervm/debian12\nCOPY . /app\n")
    (app / "src" / "main.py").write_text("print('hi')\n")
    (app / "secret.env").write_text("TOKEN=1\n")
    (app / ".dockerignore").write_text("secret.env\n")
    return app


@pytest.fixture
def uploaded(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, bytes]]:
    """``upload`` replaced: records the files of each zip it was given and answers ``URI``."""
    sent: list[dict[str, bytes]] = []

    def upload(_ctx: CliContext, path: Path) -> str:
        with zipfile.ZipFile(path) as archive:
            sent.append({name: archive.read(name) for name in archive.namelist()})
        return URI

    monkeypatch.setattr(images, "upload", upload)
    return sent


# -- the zip ---------------------------------------------------------------------------------


def _names(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        return sorted(archive.namelist())


def test_the_zip_honours_dockerignore_with_posix_names(app_dir: Path, tmp_path: Path) -> None:
    target = images.zip_context(app_dir, tmp_path)
    assert _names(target) == [".dockerignore", "Dockerfile", "src/main.py"]


def test_a_link_to_a_file_inside_is_zipped_as_that_file(app_dir: Path, tmp_path: Path) -> None:
    (app_dir / "link.py").symlink_to(app_dir / "src" / "main.py")
    with zipfile.ZipFile(images.zip_context(app_dir, tmp_path)) as archive:
        info = archive.getinfo("link.py")
        assert archive.read(info) == b"print('hi')\n"
        assert (info.external_attr >> 16) & 0o170000 != 0o120000  # not a link in the zip


@pytest.mark.parametrize("target", ["outside", "folder"])
def test_a_link_out_of_the_folder_or_to_a_folder_is_refused(
    app_dir: Path, tmp_path: Path, target: str
) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("host secret")
    (app_dir / "link").symlink_to(outside if target == "outside" else app_dir / "src")
    with pytest.raises(CliError, match="is a link out of") as raised:
        images.zip_context(app_dir, tmp_path)
    assert raised.value.exit_code == EXIT_INVALID


def test_an_ignored_link_out_is_no_problem(app_dir: Path, tmp_path: Path) -> None:
    (app_dir / "link").symlink_to(tmp_path)
    (app_dir / ".dockerignore").write_text("link\n")
    assert "link" not in _names(images.zip_context(app_dir, tmp_path))


def test_a_ready_zip_is_used_as_it_is_and_other_files_are_refused(tmp_path: Path) -> None:
    ready = tmp_path / "ready.zip"
    with zipfile.ZipFile(ready, "w") as archive:
        archive.writestr("Dockerfile", "FROM x\n")
    assert images.zip_context(ready, tmp_path / "unused") == ready.resolve()
    other = tmp_path / "notes.txt"
    other.write_text("x")
    with pytest.raises(CliError, match="not a zip file or a folder") as raised:
        images.zip_context(other, tmp_path)
    assert raised.value.exit_code == EXIT_INVALID


def test_a_folder_without_a_dockerfile_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="has no Dockerfile") as raised:
        images.zip_context(tmp_path, tmp_path)
    assert raised.value.exit_code == EXIT_INVALID


# -- create ----------------------------------------------------------------------------------


def test_create_a_new_image_with_memory_and_env(
    stub: Stubber, app_dir: Path, uploaded: list[dict[str, bytes]]
) -> None:
    stub.add_client_error("get_microvm_image", "ResourceNotFoundException", http_status_code=404)
    stub.add_response(
        "create_microvm_image",
        _image("CREATING"),
        {
            "name": "web",
            "baseImageArn": BASE,
            "buildRoleArn": images.DEFAULT_BUILD_ROLE,
            "codeArtifact": {"uri": URI},
            "resources": [{"minimumMemoryInMiB": 1024}],
            "environmentVariables": {"A": "1", "B": "x=y", "C": ""},
        },
    )
    result = runner.invoke(
        cli,
        [
            "images",
            "create",
            str(app_dir),
            "-n",
            "web",
            "--memory",
            "1024",
            "-e",
            "A=1",
            "--env",
            "B=x=y",
            "-e",
            "C=",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("web version 1: CREATING (")
    assert sorted(uploaded[0]) == [".dockerignore", "Dockerfile", "src/main.py"]


def test_create_on_an_existing_image_makes_a_new_version(
    stub: Stubber, app_dir: Path, uploaded: list[dict[str, bytes]]
) -> None:
    stub.add_response("get_microvm_image", _summary("CREATED"), {"imageIdentifier": "web"})
    stub.add_response(
        "update_microvm_image",
        _image("UPDATING", "2", updatedAt=T0),
        {
            "imageIdentifier": "web",
            "baseImageArn": "arn:aws:lambda:us-east-1:aws:microvm-image:debian13",
            "buildRoleArn": images.DEFAULT_BUILD_ROLE,
            "codeArtifact": {"uri": URI},
        },
    )
    result = runner.invoke(
        cli, ["images", "create", str(app_dir), "-n", "web", "--base", "debian13", "-o", "json"]
    )
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    assert (answer["imageVersion"], answer["state"]) == ("2", "UPDATING")
    assert isinstance(answer["seconds"], float)


@pytest.mark.usefixtures("stub")
def test_an_env_without_equals_is_a_usage_error_before_any_upload(
    app_dir: Path, uploaded: list[dict[str, bytes]]
) -> None:
    result = runner.invoke(cli, ["images", "create", str(app_dir), "-n", "web", "-e", "A"])
    assert result.exit_code == 2
    assert result.stderr == "error: --env takes NAME=value\n"
    assert uploaded == []


def test_a_failed_build_is_exit_7_with_the_versions_reason(
    stub: Stubber, app_dir: Path, uploaded: list[dict[str, bytes]]
) -> None:
    stub.add_client_error("get_microvm_image", "ResourceNotFoundException", http_status_code=404)
    stub.add_response("create_microvm_image", _image("CREATE_FAILED"))
    stub.add_response(
        "get_microvm_image_version",
        _version("1", T0, state="CREATE_FAILED", stateReason="step 2 [/]failed\x1b[2J"),
        {"imageIdentifier": "web", "imageVersion": "1"},
    )
    result = runner.invoke(cli, ["images", "create", str(app_dir), "-n", "web"])
    assert result.exit_code == 7
    assert result.stdout.splitlines()[-1] == "reason: step 2 [/]failed?[2J"


def test_follow_prints_the_build_log_then_waits_for_a_final_state(
    stub: Stubber,
    app_dir: Path,
    uploaded: list[dict[str, bytes]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    followed: list[tuple[str, bool]] = []

    def stream(_ctx: CliContext, path: str, *, follow: bool) -> Iterator[str]:
        followed.append((path, follow))
        yield json.dumps({"step": "2/3", "message": "RUN pip install"})
        yield "not json \x1b[31m"

    monkeypatch.setattr(images, "stream_lines", stream)
    monkeypatch.setattr(images.time, "sleep", lambda _s: None)
    stub.add_client_error("get_microvm_image", "ResourceNotFoundException", http_status_code=404)
    stub.add_response("create_microvm_image", _image("CREATING", "3"))
    stub.add_response("get_microvm_image", _summary("CREATING"), {"imageIdentifier": "web"})
    stub.add_response("get_microvm_image", _summary("CREATED"), {"imageIdentifier": "web"})
    result = runner.invoke(cli, ["images", "create", str(app_dir), "-n", "web", "--follow"])
    assert result.exit_code == 0, result.output
    assert followed == [("/embervm/v1/microvm-images/web/versions/3/logs", True)]
    lines = result.stdout.splitlines()
    assert lines[:2] == ["[2/3] RUN pip install", "not json ?[31m"]
    assert lines[2].startswith("web version 3: CREATED (")


# -- log lines -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "rendered"),
    [
        ('{"step": "1/2", "message": "FROM debian12"}', "[1/2] FROM debian12"),
        ('{"message": "no step"}', "no step"),
        ('{"step": null, "message": "x\\u001b]0;title\\u0007"}', "x?]0;title?"),
        ("[1, 2]", "[1, 2]"),
        ("plain \x07text", "plain ?text"),
    ],
)
def test_render_a_log_record_for_people(line: str, rendered: str) -> None:
    assert images._render(line) == rendered


@pytest.mark.parametrize(
    ("line", "record"),
    [
        ('{"step": "1/2", "message": "ok"}', {"step": "1/2", "message": "ok"}),
        ("plain text", {"message": "plain text"}),
        ('"a json string"', {"message": '"a json string"'}),
    ],
)
def test_a_log_line_for_scripts_is_always_one_json_object(line: str, record: Any) -> None:
    assert json.loads(images._as_record(line)) == record


def test_the_log_path_quotes_its_segments() -> None:
    assert images.build_log_path("a/b c", "1?x") == (
        "/embervm/v1/microvm-images/a%2Fb%20c/versions/1%3Fx/logs"
    )


def test_logs_default_to_the_newest_version(stub: Stubber, monkeypatch: pytest.MonkeyPatch) -> None:
    stub.add_response(
        "list_microvm_image_versions",
        {"items": [_version("1", T0), _version("3", T0 + dt.timedelta(hours=2))]},
        {"imageIdentifier": "web"},
    )
    followed: list[str] = []

    def stream(_ctx: CliContext, path: str, *, follow: bool) -> Iterator[str]:
        followed.append(path)
        yield '{"step": "1/1", "message": "done"}'
        yield "raw"

    monkeypatch.setattr(images, "stream_lines", stream)
    result = runner.invoke(cli, ["images", "logs", "web", "-o", "json"])
    assert result.exit_code == 0, result.output
    assert followed == ["/embervm/v1/microvm-images/web/versions/3/logs"]
    assert [json.loads(x) for x in result.stdout.splitlines()] == [
        {"step": "1/1", "message": "done"},
        {"message": "raw"},
    ]


def test_logs_of_an_image_without_versions_is_exit_4(stub: Stubber) -> None:
    stub.add_response("list_microvm_image_versions", {"items": []}, {"imageIdentifier": "web"})
    result = runner.invoke(cli, ["images", "logs", "web"])
    assert result.exit_code == 4
    assert result.stderr == "error: image web has no versions\n"


# -- ls, get, delete -------------------------------------------------------------------------


def test_ls_reads_every_page(stub: Stubber) -> None:
    first = _summary("CREATED")
    second = _summary("CREATED", name="api", latestActiveImageVersion="4")
    stub.add_response("list_microvm_images", {"items": [first], "nextToken": "t"}, {})
    stub.add_response("list_microvm_images", {"items": [second]}, {"nextToken": "t"})
    result = runner.invoke(cli, ["images", "ls"])
    assert result.exit_code == 0, result.output
    rows = [line.split() for line in result.stdout.splitlines()]
    assert rows[0] == ["NAME", "STATE", "LATEST", "CREATED"]
    assert [row[:2] for row in rows[1:]] == [["web", "CREATED"], ["api", "CREATED"]]
    assert rows[2][2] == "4"


def test_get_prints_the_image_without_response_metadata(stub: Stubber) -> None:
    image = _summary("CREATED")
    stub.add_response("get_microvm_image", image, {"imageIdentifier": "web"})
    result = runner.invoke(cli, ["images", "get", "web", "-o", "json"])
    assert json.loads(result.stdout) == {**image, "createdAt": "2025-01-01T00:00:00+00:00"}


@pytest.mark.parametrize("version", [None, "2"])
def test_delete_an_image_or_one_version(stub: Stubber, version: str | None) -> None:
    if version:
        stub.add_response(
            "delete_microvm_image_version",
            {"imageIdentifier": "web", "imageVersion": "2", "state": "DELETING"},
            {"imageIdentifier": "web", "imageVersion": "2"},
        )
    else:
        stub.add_response(
            "delete_microvm_image",
            {"imageIdentifier": "web", "state": "DELETING"},
            {"imageIdentifier": "web"},
        )
    result = runner.invoke(
        cli, ["images", "delete", "web", *(["--version", version] if version else [])]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ("deleted web 2\n" if version else "deleted web\n")


def test_an_unknown_image_is_exit_4(stub: Stubber) -> None:
    stub.add_client_error(
        "get_microvm_image",
        "ResourceNotFoundException",
        "image nope not found",
        http_status_code=404,
    )
    result = runner.invoke(cli, ["images", "get", "nope"])
    assert result.exit_code == 4
    assert result.stderr == "error: ResourceNotFoundException: image nope not found\n"
