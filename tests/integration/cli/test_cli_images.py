"""``embervm images create|ls|get|logs|delete`` as a user runs them: happy paths, their
clearest failures, and ``--output json`` round trips."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path
from typing import Any

from tests.framework.cli_harness import as_json, cli, json_lines, one_error_line
from tests.framework.core_live_server import CoreServer


def _uploaded(server: CoreServer, image: str, version: str) -> zipfile.ZipFile:
    """The zip the server was given for one build (by the URI core recorded)."""
    assert server.builder is not None
    job = next(j for j in server.builder.jobs if (j.image_name, j.version) == (image, version))
    uri = str(job.request["codeArtifact"]["uri"])
    assert uri.startswith("file://")
    return zipfile.ZipFile(uri.removeprefix("file://"))


def test_images_create_zips_the_folder_honouring_dockerignore(
    cli_server: CoreServer, image: dict[str, Any]
) -> None:
    assert image["name"] == "web"
    assert image["state"] == "CREATED"
    assert image["imageVersion"] == "1"
    assert image["seconds"] >= 0
    names = _uploaded(cli_server, "web", "1").namelist()
    assert sorted(names) == [".dockerignore", "Dockerfile", "app.py"]


def test_images_create_uploads_to_a_server_that_shares_no_folder_with_the_cli(
    cli_server: CoreServer, app_dir: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "cli-data"  # the CLI's own data dir: only the credentials in it
    elsewhere.mkdir()
    (elsewhere / "credentials").write_bytes((cli_server.data_dir / "credentials").read_bytes())
    created = as_json(
        cli(cli_server, "images", "create", str(app_dir), "--name", "remote", "--output", "json",
            data_dir=elsewhere)
    )  # fmt: skip
    assert created["imageVersion"] == "1"
    assert server_upload_dir(cli_server, "remote", "1") == cli_server.data_dir / "uploads"
    assert sorted(_uploaded(cli_server, "remote", "1").namelist()) == [
        ".dockerignore", "Dockerfile", "app.py",
    ]  # fmt: skip
    assert sorted(p.name for p in elsewhere.iterdir()) == ["credentials"]


def server_upload_dir(server: CoreServer, image: str, version: str) -> Path:
    assert server.builder is not None
    job = next(j for j in server.builder.jobs if (j.image_name, j.version) == (image, version))
    return Path(str(job.request["codeArtifact"]["uri"]).removeprefix("file://")).parent


def test_images_create_follow_streams_the_build_log(cli_server: CoreServer, app_dir: Path) -> None:
    assert cli_server.build_logs is not None
    cli_server.build_logs.logs[("shown", "1")] = [  # type: ignore[index]
        json.dumps({"stream": "build", "step": "2/3", "message": "RUN pip install flask"}),
        json.dumps({"stream": "build", "message": "Successfully installed flask-3.1"}),
    ]
    done = cli(cli_server, "images", "create", str(app_dir), "--name", "shown", "--follow")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == ["[2/3] RUN pip install flask", "Successfully installed flask-3.1"]
    assert lines[2].startswith("shown version 1: CREATED")


def test_images_create_takes_a_ready_zip_and_makes_new_versions(
    cli_server: CoreServer, tmp_path: Path
) -> None:
    archive = tmp_path / "app.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Dockerfile", "FROM embervm/debian12\n")
    first = as_json(
        cli(
            cli_server,
            "images",
            "create",
            str(archive),
            "--name",
            "zipped",
            "--memory",
            "2048",
            "--output",
            "json",
        )
    )
    second = as_json(
        cli(cli_server, "images", "create", str(archive), "--name", "zipped", "--output", "json")
    )
    assert (first["imageVersion"], second["imageVersion"]) == ("1", "2")
    assert _uploaded(cli_server, "zipped", "1").namelist() == ["Dockerfile"]


def test_images_ls_and_get_round_trip_as_json(
    cli_server: CoreServer, image: dict[str, Any]
) -> None:
    listed = as_json(cli(cli_server, "images", "ls", "--output", "json"))
    web = next(i for i in listed if i["name"] == "web")
    assert web["imageArn"] == image["imageArn"]
    got = as_json(cli(cli_server, "images", "get", "web", "--output", "json"))
    assert got["imageArn"] == image["imageArn"]
    assert got["state"] == "CREATED"
    assert got["latestActiveImageVersion"] == "1"
    assert "ResponseMetadata" not in got
    text = cli(cli_server, "images", "ls")
    assert "web" in text.stdout
    assert "CREATED" in text.stdout


def test_images_logs_prints_records_for_people_and_json_lines_for_scripts(
    cli_server: CoreServer, image: dict[str, Any]
) -> None:
    text = cli(cli_server, "images", "logs", "web")
    assert text.stdout.splitlines() == ["[1/2] COPY app.py /app/", "SUCCESSFUL"]
    records = json_lines(cli(cli_server, "images", "logs", "web", "--version", "1", "-o", "json"))
    assert [r["message"] for r in records] == ["COPY app.py /app/", "SUCCESSFUL"]
    assert records[0]["step"] == "1/2"


def test_unknown_images_and_versions_are_exit_4(
    cli_server: CoreServer, image: dict[str, Any]
) -> None:
    for args in (
        ("images", "get", "nope"),
        ("images", "logs", "nope"),
        ("images", "logs", "web", "--version", "99"),
        ("images", "logs", "web", "--version", "../../microvms/x"),
    ):
        done = cli(cli_server, *args)
        assert done.returncode == 4, (args, done.stderr)
        assert "ResourceNotFoundException" in one_error_line(done)


def test_a_failed_build_is_exit_7_with_its_reason(cli_server: CoreServer, app_dir: Path) -> None:
    assert cli_server.builder is not None
    cli_server.builder.failures.append("step 2/2 RUN pip install: exit code 1 [/]")
    done = cli(cli_server, "images", "create", str(app_dir), "--name", "broken", "--follow")
    assert done.returncode == 7
    assert "reason: step 2/2 RUN pip install: exit code 1 [/]" in done.stdout
    cli_server.builder.failures.append("RUN false: exit code 1")
    failed = cli(
        cli_server,
        "images",
        "create",
        str(app_dir),
        "--name",
        "broken",
        "--follow",
        "--output",
        "json",
    )
    assert failed.returncode == 7
    result = json.loads(failed.stdout)
    assert result["state"] in ("CREATE_FAILED", "UPDATE_FAILED")
    version = as_json(cli(cli_server, "images", "get", "broken", "-o", "json"))
    assert version["name"] == "broken"


def test_invalid_build_folders_are_exit_6_and_links_out_are_refused(
    cli_server: CoreServer, app_dir: Path, tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    done = cli(cli_server, "images", "create", str(empty), "--name", "x")
    assert done.returncode == 6
    assert "no Dockerfile" in one_error_line(done)
    not_zip = tmp_path / "notes.txt"
    not_zip.write_text("hello")
    assert cli(cli_server, "images", "create", str(not_zip), "--name", "x").returncode == 6
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "Dockerfile").write_text("FROM embervm/debian12\n")
    os.symlink("/etc/passwd", linked / "passwd")
    done = cli(cli_server, "images", "create", str(linked), "--name", "x")
    assert done.returncode == 6
    assert "link out of" in one_error_line(done)
    bad_env = cli(cli_server, "images", "create", str(app_dir), "--name", "x", "--env", "NOVALUE")
    assert bad_env.returncode == 2
    bad_name = cli(cli_server, "images", "create", str(app_dir), "--name", "no spaces [/]")
    assert bad_name.returncode == 6
    assert "ValidationException" in one_error_line(bad_name)


def test_a_link_to_a_file_inside_the_folder_is_zipped_as_that_file(
    cli_server: CoreServer, tmp_path: Path
) -> None:
    app = tmp_path / "app"
    app.mkdir()
    (app / "Dockerfile").write_text("FROM embervm/debian12\n")
    (app / "real.py").write_text("print(1)\n")
    os.symlink("real.py", app / "alias.py")
    built = as_json(cli(cli_server, "images", "create", str(app), "--name", "links", "-o", "json"))
    archive = _uploaded(cli_server, "links", built["imageVersion"])
    assert archive.read("alias.py") == b"print(1)\n"
    assert not any(info.external_attr >> 28 == 0o12 for info in archive.infolist())


def test_images_delete_a_version_then_the_image(cli_server: CoreServer, tmp_path: Path) -> None:
    archive = tmp_path / "app.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Dockerfile", "FROM embervm/debian12\n")
    for _ in range(2):
        as_json(cli(cli_server, "images", "create", str(archive), "--name", "gone", "-o", "json"))
    version = as_json(cli(cli_server, "images", "delete", "gone", "--version", "1", "-o", "json"))
    assert version["imageVersion"] == "1"
    deleted = as_json(cli(cli_server, "images", "delete", "gone", "--output", "json"))
    assert deleted["imageIdentifier"] == "gone"
    assert deleted["state"] in ("DELETING", "DELETED")
    text = cli(cli_server, "images", "delete", "gone")  # idempotent
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() == "deleted gone"
