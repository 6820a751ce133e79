"""Every ``embervm`` command as a user runs it (a subprocess), its happy path and its clearest
failure, with ``--output json`` round trips and the documented exit codes."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
from core_live_server import CoreServer

EMBERVM = [sys.executable, "-m", "embervm.cli"]


def cli(server: CoreServer | None, *args: str, data_dir: Path | None = None,
        url: str | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
    data = data_dir or (server.data_dir if server else Path("/nonexistent"))
    endpoint = url or (server.url if server else "http://127.0.0.1:9")
    done = subprocess.run([*EMBERVM, "--data-dir", str(data), "--endpoint-url", endpoint, *args],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    return done


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    app = tmp_path_factory.mktemp("app")
    (app / "Dockerfile").write_text(
        "FROM embervm/debian12\nCOPY app.py /app/\nCMD python3 /app/app.py\n"
    )
    (app / "app.py").write_text("print('hello')\n")
    (app / "secret.txt").write_text("not for the image\n")
    (app / ".dockerignore").write_text("secret.txt\n")
    return app


@pytest.fixture(scope="module")
def image(cli_server: CoreServer, app_dir: Path) -> dict[str, Any]:
    assert cli_server.build_logs is not None
    cli_server.build_logs.logs[("web", "1")] = [  # type: ignore[index]
        json.dumps({"ts": "2026-11-22T00:00:00Z", "stream": "build", "message": "step 1/2"}),
        json.dumps({"ts": "2026-11-22T00:00:01Z", "stream": "end", "message": "SUCCESSFUL"}),
    ]
    done = cli(cli_server, "images", "create", str(app_dir), "--name", "web", "--follow",
               "--output", "json")  # fmt: skip
    return dict(as_json(done))


def test_server_down_is_exit_3_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once closed
    (tmp_path / "credentials").write_text(
        "[default]\naws_access_key_id = AKIDEXAMPLE\naws_secret_access_key = secret\n"
    )
    done = cli(None, "ls", data_dir=tmp_path, url=f"http://127.0.0.1:{port}")
    assert done.returncode == 3
    assert len(done.stderr.strip().splitlines()) == 1
    assert "embervm server" in done.stderr


def test_images_create_zips_the_folder_honouring_dockerignore(
    cli_server: CoreServer, image: dict[str, Any]
) -> None:
    assert image["state"] == "CREATED"
    assert image["imageVersion"] == "1"
    uploads = sorted((cli_server.data_dir / "uploads").glob("*.zip"))
    names = zipfile.ZipFile(uploads[-1]).namelist()
    assert "Dockerfile" in names
    assert "app.py" in names
    assert "secret.txt" not in names


def test_images_ls_get_logs(cli_server: CoreServer, image: dict[str, Any]) -> None:
    listed = as_json(cli(cli_server, "images", "ls", "--output", "json"))
    assert "web" in {i["name"] for i in listed}
    got = as_json(cli(cli_server, "images", "get", "web", "--output", "json"))
    assert got["state"] == "CREATED"
    logs = cli(cli_server, "images", "logs", "web")
    assert logs.returncode == 0
    assert "step 1/2" in logs.stdout
    assert cli(cli_server, "images", "get", "nope").returncode == 4


def test_a_failed_build_is_exit_7_with_its_reason(cli_server: CoreServer, app_dir: Path) -> None:
    assert cli_server.builder is not None
    cli_server.builder.failures.append("step 2/2 RUN pip install: exit code 1")
    done = cli(cli_server, "images", "create", str(app_dir), "--name", "broken", "--follow")
    assert done.returncode == 7
    assert "exit code 1" in done.stdout + done.stderr


def test_run_ls_get_token_logs_suspend_resume_terminate(
    cli_server: CoreServer, image: dict[str, Any]
) -> None:
    vm = as_json(cli(cli_server, "run", "web", "--idle-seconds", "600", "--shell",
                     "--output", "json"))  # fmt: skip
    vm_id = vm["microvmId"]
    assert vm["state"] == "RUNNING"
    assert vm["endpoint"].startswith(f"https://{vm_id}.")
    assert vm["token"]
    assert vm_id in {v["microvmId"] for v in as_json(cli(cli_server, "ls", "--output", "json"))}
    got = as_json(cli(cli_server, "get", vm_id, "--output", "json"))
    assert got["idlePolicy"]["maxIdleDurationSeconds"] == 600
    assert as_json(cli(cli_server, "token", vm_id, "--output", "json"))
    assert cli_server.app_logs is not None
    cli_server.app_logs.logs[vm_id] = ["listening on 8080", "GET / 200"]  # type: ignore[index]
    logs = cli(cli_server, "logs", vm_id)
    assert logs.stdout.splitlines() == ["listening on 8080", "GET / 200"]
    suspended = as_json(cli(cli_server, "suspend", vm_id, "--output", "json"))
    assert suspended["state"] == "SUSPENDED"
    again = cli(cli_server, "suspend", vm_id)
    assert again.returncode == 5  # conflict: already suspended
    assert as_json(cli(cli_server, "resume", vm_id, "--output", "json"))["state"] == "RUNNING"
    done = as_json(cli(cli_server, "terminate", vm_id, "--output", "json"))
    assert done["state"] in ("TERMINATING", "TERMINATED")


def test_unknown_ids_are_exit_4(cli_server: CoreServer) -> None:
    for args in (("get", "mvm-00000000000000000000"), ("curl", "mvm-00000000000000000000", "/"),
                 ("logs", "mvm-00000000000000000000")):  # fmt: skip
        done = cli(cli_server, *args)
        assert done.returncode == 4, (args, done.stderr)


def test_invalid_input_is_exit_6(cli_server: CoreServer, image: dict[str, Any]) -> None:
    done = cli(cli_server, "run", "web", "--idle-seconds", "10")
    assert done.returncode == 6
    assert "60" in done.stderr
    mismatch = cli(cli_server, "run", "web", "--memory", "4096")
    assert mismatch.returncode == 6
    assert "images create" in mismatch.stderr


def test_credentials_create_list_revoke(tmp_path: Path) -> None:
    created = as_json(cli(None, "credentials", "create", "--output", "json", data_dir=tmp_path))
    key = created["accessKeyId"]
    listed = cli(None, "credentials", "list", data_dir=tmp_path)
    assert key in listed.stdout
    assert created["secretAccessKey"] not in listed.stdout
    assert cli(None, "credentials", "revoke", key, data_dir=tmp_path).returncode == 0
    assert key not in cli(None, "credentials", "list", data_dir=tmp_path).stdout


def test_doctor_answers_without_hanging(tmp_path: Path) -> None:
    done = cli(None, "doctor", "--output", "json", data_dir=tmp_path)
    assert done.returncode in (0, 1)
    report = json.loads(done.stdout)
    assert report
