"""State survives: a restart keeps every record; migrations go up, down and up again on SQLite
and on a real PostgreSQL; the AWS CLI drives the real core."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from tests.framework.core_live_server import (
    BASE,
    CONNECTOR,
    REGION,
    ROLE,
    CoreServer,
    image,
    serve,
    wait,
)

from embervm.store.engine import create_engine, current_revision, downgrade, migrate


def _snapshot(client: Any) -> dict[str, Any]:
    images = client.list_microvm_images(maxResults=50)["items"]
    return {
        "images": images,
        "versions": client.list_microvm_image_versions(imageIdentifier="keep")["items"],
        "vms": client.list_microvms(maxResults=50)["items"],
        "tags": client.list_tags(Resource=images[0]["imageArn"])["Tags"],
    }


def test_a_restart_keeps_every_record(tmp_path: Path, database_url: str) -> None:
    server = CoreServer(tmp_path / "data", database_url)
    server.start()
    try:
        client = server.client()
        image(client, "keep", tags={"owner": "me"})
        running = client.run_microvm(imageIdentifier="keep", clientToken="restart-1")
        wait(lambda: client.get_microvm(microvmIdentifier=running["microvmId"]),
             lambda v: v["state"] == "RUNNING", "run")  # fmt: skip
        before = _snapshot(client)
    finally:
        server.stop()
    server.start()
    try:
        client = server.client()
        after = _snapshot(client)
        assert after["images"] == before["images"]
        assert after["versions"] == before["versions"]
        assert after["tags"] == {"owner": "me"}
        assert [vm["microvmId"] for vm in after["vms"]] == [vm["microvmId"] for vm in before["vms"]]
        again = client.run_microvm(imageIdentifier="keep", clientToken="restart-1")
        assert again["microvmId"] == running["microvmId"]  # idempotency records kept too
    finally:
        server.stop()


async def test_migrations_upgrade_downgrade_and_upgrade_again(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        await migrate(engine, "head")
        head = await current_revision(engine)
        assert head is not None
        await downgrade(engine, "base")
        assert await current_revision(engine) is None
        async with engine.connect() as conn:
            tables = await conn.run_sync(lambda c: sa.inspect(c).get_table_names())
        assert set(tables) <= {"alembic_version"}
        await migrate(engine, "head")
        assert await current_revision(engine) == head
    finally:
        await engine.dispose()


def _aws(server: CoreServer, *args: str) -> Any:
    env = {**os.environ, "AWS_SHARED_CREDENTIALS_FILE": str(server.data_dir / "credentials"),
           "AWS_CONFIG_FILE": str(server.data_dir / "no-config"), "AWS_PROFILE": "embervm",
           "AWS_DEFAULT_REGION": REGION, "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
    aws = Path(sys.executable).with_name("aws")
    done = subprocess.run(
        [str(aws), "lambda-microvms", *args, "--endpoint-url", server.url, "--output", "json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if done.stdout.strip() else {}


def test_the_aws_cli_runs_the_seed_commands(tmp_path: Path) -> None:
    with serve(tmp_path / "data", f"sqlite+aiosqlite:///{tmp_path / 'db.sqlite'}") as server:
        created = _aws(server, "create-microvm-image", "--name", "cli",
                       "--base-image-arn", BASE, "--build-role-arn", ROLE,
                       "--code-artifact", "uri=file:///tmp/app.zip")  # fmt: skip
        assert created["state"] == "CREATING"
        wait(lambda: _aws(server, "get-microvm-image", "--image-identifier", "cli"),
             lambda i: i["state"] == "CREATED", "build")  # fmt: skip
        vm = _aws(server, "run-microvm", "--image-identifier", "cli", "--idle-policy",
                  "maxIdleDurationSeconds=300,suspendedDurationSeconds=3600,autoResumeEnabled=true",
                  "--ingress-network-connectors", CONNECTOR.format("HTTP_INGRESS"),
                  CONNECTOR.format("SHELL_INGRESS"))  # fmt: skip
        vm_id = vm["microvmId"]
        got = wait(lambda: _aws(server, "get-microvm", "--microvm-identifier", vm_id),
                   lambda v: v["state"] == "RUNNING", "run")  # fmt: skip
        assert got["idlePolicy"]["autoResumeEnabled"] is True
        token = _aws(server, "create-microvm-auth-token", "--microvm-identifier", vm_id,
                     "--expiration-in-minutes", "60", "--allowed-ports", "allPorts={}")  # fmt: skip
        assert "X-aws-proxy-auth" in token["authToken"]
        _aws(server, "suspend-microvm", "--microvm-identifier", vm_id)
        wait(lambda: _aws(server, "get-microvm", "--microvm-identifier", vm_id),
             lambda v: v["state"] == "SUSPENDED", "suspend")  # fmt: skip
        _aws(server, "resume-microvm", "--microvm-identifier", vm_id)
        wait(lambda: _aws(server, "get-microvm", "--microvm-identifier", vm_id),
             lambda v: v["state"] == "RUNNING", "resume")  # fmt: skip
        _aws(server, "terminate-microvm", "--microvm-identifier", vm_id)
        wait(lambda: _aws(server, "get-microvm", "--microvm-identifier", vm_id),
             lambda v: v["state"] == "TERMINATED", "terminate")  # fmt: skip
