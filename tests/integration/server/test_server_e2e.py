"""The product end to end: a real server process, a real image build, real VMs behind the
endpoint proxy — driven by boto3 and httpx the way users drive it."""

from __future__ import annotations

import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from tests.framework.server_harness import (
    ACCOUNT,
    REPO,
    S3_CREDENTIALS,
    LiveServer,
    build_image_from_uri,
    run_vm,
    token,
    wait_for,
    zip_dir,
)

pytestmark = pytest.mark.timeout(900)


def count_of(response: httpx.Response) -> int:
    assert response.status_code == 200, response.text
    return int(response.text.split(":")[1])


def state(server: LiveServer, vm_id: str) -> str:
    return str(server.client().get_microvm(microvmIdentifier=vm_id)["state"])


def test_ready_line_names_both_listeners_and_ping_needs_no_auth(live_server: LiveServer) -> None:
    assert live_server.ready_line == (
        f"embervm ready api={live_server.api_url} proxy=https://127.0.0.1:{live_server.proxy_port}"
    )
    assert httpx.get(f"{live_server.api_url}/ping").status_code == 200


def test_a_vm_serves_its_app_through_the_endpoint(
    live_server: LiveServer, flask_image: dict[str, Any]
) -> None:
    vm = run_vm(live_server, "flask-counter")
    assert vm["state"] == "RUNNING", vm
    assert vm["endpoint"] == f"https://{vm['microvmId']}.microvm.localhost:{live_server.proxy_port}"
    secret = token(live_server, vm["microvmId"])
    first = count_of(live_server.get(vm["microvmId"], secret))
    assert count_of(live_server.get(vm["microvmId"], secret)) == first + 1
    base, host = live_server.endpoint(vm["microvmId"], tls=True)
    with httpx.Client(http2=True, verify=live_server.tls()) as client:
        answer = client.get(base + "/", headers={**host, "x-aws-proxy-auth": secret})
    assert answer.http_version == "HTTP/2"
    assert count_of(answer) == first + 2
    live_server.client().terminate_microvm(microvmIdentifier=vm["microvmId"])


def test_no_token_no_entry(live_server: LiveServer, flask_image: dict[str, Any]) -> None:
    vm = run_vm(live_server, "flask-counter")
    base, host = live_server.endpoint(vm["microvmId"])
    assert httpx.get(base + "/", headers=host, timeout=30).status_code == 403
    other = run_vm(live_server, "flask-counter")
    wrong_vm = token(live_server, other["microvmId"])
    answer = httpx.get(base + "/", headers={**host, "x-aws-proxy-auth": wrong_vm}, timeout=30)
    assert answer.status_code == 403
    for vm_id in (vm["microvmId"], other["microvmId"]):
        live_server.client().terminate_microvm(microvmIdentifier=vm_id)


def test_suspended_vm_resumes_on_traffic_once_for_twenty_requests(
    live_server: LiveServer, flask_image: dict[str, Any]
) -> None:
    policy = {"maxIdleDurationSeconds": 3600, "suspendedDurationSeconds": 3600,
              "autoResumeEnabled": True}  # fmt: skip
    vm = run_vm(live_server, "flask-counter", idlePolicy=policy)
    vm_id = vm["microvmId"]
    secret = token(live_server, vm_id)
    before = count_of(live_server.get(vm_id, secret))
    live_server.client().suspend_microvm(microvmIdentifier=vm_id)
    wait_for(lambda: state(live_server, vm_id), lambda s: s == "SUSPENDED", 120, "SUSPENDED")
    with ThreadPoolExecutor(20) as pool:
        counts = list(pool.map(lambda _: count_of(live_server.get(vm_id, secret)), range(20)))
    assert sorted(counts) == list(range(before + 1, before + 21))
    assert state(live_server, vm_id) == "RUNNING"
    live_server.client().terminate_microvm(microvmIdentifier=vm_id)


def test_idle_policy_and_lifetime_act_on_their_own(
    live_server: LiveServer, flask_image: dict[str, Any]
) -> None:
    """The model's minimum idle window (60 s): one VM suspends, one with a suspended
    duration of 0 terminates instead, one reaches its maximum duration."""
    keep = {"maxIdleDurationSeconds": 60, "suspendedDurationSeconds": 3600,
            "autoResumeEnabled": True}  # fmt: skip
    drop = {**keep, "suspendedDurationSeconds": 0}
    suspends = run_vm(live_server, "flask-counter", idlePolicy=keep)["microvmId"]
    terminates = run_vm(live_server, "flask-counter", idlePolicy=drop)["microvmId"]
    expires = run_vm(live_server, "flask-counter", maximumDurationInSeconds=20)["microvmId"]
    started = time.monotonic()
    wait_for(lambda: state(live_server, expires), lambda s: s == "TERMINATED", 120, "expiry")
    wait_for(lambda: state(live_server, suspends), lambda s: s == "SUSPENDED", 180, "idle")
    wait_for(lambda: state(live_server, terminates), lambda s: s == "TERMINATED", 180, "idle 0")
    assert time.monotonic() - started >= 55  # not before the idle window (60 s from launch)
    live_server.client().terminate_microvm(microvmIdentifier=suspends)


def test_a_build_cannot_read_the_servers_own_files(live_server: LiveServer) -> None:
    """file:// artifacts never come from the data dir (token keys, credentials, other images)."""
    client = live_server.client()
    keys = live_server.data_dir / "keys" / "tokens.json"
    assert keys.is_file()
    image = build_image_from_uri(live_server, "steal-keys", keys.as_uri())
    assert image["state"] == "CREATE_FAILED"
    version = client.get_microvm_image_version(imageIdentifier="steal-keys", imageVersion="1")
    assert "does_not_read_artifacts_from" in version["stateReason"].replace(" ", "_"), version
    client.delete_microvm_image(imageIdentifier="steal-keys")


def test_an_image_built_from_an_s3_artifact_serves_its_app(
    live_server: LiveServer, s3_endpoint: str, flask_image: dict[str, Any], tmp_path: Path
) -> None:
    """s3://bucket/key through the server's configured S3 endpoint (a real S3 API server).
    flask-counter with one more route in app.py: the build reuses every cached step but the
    last COPY, which runs in the app VM itself; the snapshot must hold the new app.py."""
    source = tmp_path / "flask-s3"
    shutil.copytree(REPO / "examples" / "flask-counter", source)
    app_py = source / "app.py"
    route = '@app.get("/origin")\ndef origin() -> str:\n    return "from s3"\n\n\n'
    text = app_py.read_text()
    warm_up = text.index("# Warm the request path")  # routes go before the app's first request
    app_py.write_text(text[:warm_up] + route + text[warm_up:])
    archive = zip_dir(source, tmp_path / "app.zip")
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        region_name="us-east-1",
        aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )
    s3.create_bucket(Bucket="apps")
    s3.upload_file(str(archive), "apps", "flask/app.zip")
    image = build_image_from_uri(live_server, "flask-s3", "s3://apps/flask/app.zip")
    assert image["state"] == "CREATED", image
    vm = run_vm(live_server, "flask-s3")
    assert vm["state"] == "RUNNING", vm
    secret = token(live_server, vm["microvmId"])
    first = count_of(live_server.get(vm["microvmId"], secret))
    assert count_of(live_server.get(vm["microvmId"], secret)) == first + 1
    assert live_server.get(vm["microvmId"], secret, "/origin").text == "from s3"
    # The snapshot's disk is the app VM's own top overlay, not the layer its COPY froze
    # (the layer stays in the cache; the top overlay's writes after the COPY are the app's).
    snapshot_disk = live_server.data_dir / "images" / ACCOUNT / "flask-s3" / "1" / "snapshot"
    layer_inodes = {path.stat().st_ino for path in (live_server.data_dir / "layers").iterdir()}
    assert (snapshot_disk / "disk.qcow2").stat().st_ino not in layer_inodes
    live_server.client().terminate_microvm(microvmIdentifier=vm["microvmId"])
    missing = build_image_from_uri(live_server, "s3-missing", "s3://apps/none.zip")
    assert missing["state"] == "CREATE_FAILED"
    version = live_server.client().get_microvm_image_version(
        imageIdentifier="s3-missing", imageVersion="1"
    )
    assert "does_not_exist" in version["stateReason"].replace(" ", "_"), version
