"""A real ``embervm server`` process for end-to-end tests, and clients to talk to it.

The server runs as the user runs it (``embervm --data-dir D server ...`` in a subprocess) on
free ports, with its own nftables tag and address pool so it never meets a developer's server
or another test's network. Guest artifacts and build layers come from the integration test
cache (``tests/integration/conftest.py``), so the kernel and base disk are built once per
machine and unchanged build steps are reused across runs.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import ssl
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import httpx
from botocore.config import Config

REGION = "us-east-1"
DOMAIN = "microvm.localhost"
READY_TIMEOUT = 600.0
BUILD_TIMEOUT = 900.0
BASE_IMAGE_ARN = f"arn:aws:lambda:{REGION}:aws:microvm-image:debian12"
ACCOUNT = "000000000000"  # the server's default account
BUILD_ROLE = "arn:aws:iam::000000000000:role/embervm-build"
# What the server (boto3's credential chain) and the tests use against the test's S3 server.
S3_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
CONNECTOR = f"arn:aws:lambda:{REGION}:aws:network-connector:aws-network-connector:{{}}"
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_network_tag() -> str:
    """A random ``e<xx>`` tag no resolver link on the host has: a server sharing another's tag
    would reclaim that one's networks as its own leftovers."""
    links = set(os.listdir("/sys/class/net"))
    return secrets.choice([t for t in (f"e{i:02x}" for i in range(256)) if f"{t}dns0" not in links])


def free_network_pool() -> str:
    """A random /22 of 10.219.0.0/16 holding no address of the host: a pool another server's
    networks (or a dead one's) hold would give a VM block two routes (the server refuses it)."""
    out = subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True)
    used = [ipaddress.IPv4Address(a["local"]) for link in json.loads(out.stdout or "[]")
            for a in link.get("addr_info", []) if a.get("family") == "inet"]  # fmt: skip
    pools = [ipaddress.IPv4Network(f"10.219.{4 * i}.0/22") for i in range(64)]
    return str(secrets.choice([p for p in pools if not any(a in p for a in used)]))


def zip_dir(source: Path, dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(source.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(source).as_posix())
    return dest


@dataclass
class LiveServer:
    """One running server: its ports, data dir, output, and ways to reach it."""

    data_dir: Path
    api_port: int
    proxy_port: int
    proxy_http_port: int
    # Its own nftables tables and addresses: test runs beside it on the host never collide
    # (kept across restarts: a restarted server takes its VMs back).
    network_tag: str = field(default_factory=free_network_tag)
    network_pool: str = field(default_factory=free_network_pool)
    extra_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    ready_line: str = ""
    output: list[str] = field(default_factory=list)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def ca(self) -> Path:
        return self.data_dir / "tls" / "ca.pem"

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))

    def argv(self) -> list[str]:
        return [
            sys.executable, "-m", "embervm.cli", "--data-dir", str(self.data_dir), "server",
            "--api-port", str(self.api_port), "--proxy-port", str(self.proxy_port),
            "--proxy-http-port", str(self.proxy_http_port), *self.extra_args,
        ]  # fmt: skip

    def start(self) -> None:
        env = {**os.environ, "EMBERVM_NETWORK_TAG": self.network_tag,
               "EMBERVM_NETWORK_POOL": self.network_pool, **self.extra_env}  # fmt: skip
        self.output = []
        self.process = subprocess.Popen(
            self.argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        ready = threading.Event()
        threading.Thread(target=self._pump, args=(self.process, ready), daemon=True).start()
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.wait(0.2):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + "\n".join(self.output[-40:]))

    def _pump(self, process: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            self.output.append(line)
            if line.startswith("embervm ready"):
                self.ready_line = line
                ready.set()

    def stop(self, timeout: float = 120.0) -> int | None:
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.process = None
        return code

    def client(self) -> Any:
        key, secret = _read_default_credentials(self.data_dir / "credentials")
        return boto3.client(
            "lambda-microvms",
            endpoint_url=self.api_url,
            region_name=REGION,
            aws_access_key_id=key,
            aws_secret_access_key=secret,
            config=Config(retries={"max_attempts": 1}),
        )

    def endpoint(self, microvm_id: str, *, tls: bool = False) -> tuple[str, dict[str, str]]:
        """(base URL on 127.0.0.1, Host header) for a VM's endpoint: no DNS needed."""
        port = self.proxy_port if tls else self.proxy_http_port
        scheme = "https" if tls else "http"
        return f"{scheme}://127.0.0.1:{port}", {"host": f"{microvm_id}.{DOMAIN}"}

    def get(
        self, microvm_id: str, token: str, path: str = "/", *, timeout: float = 60.0, **kw: Any
    ) -> httpx.Response:
        base, headers = self.endpoint(microvm_id)
        headers["x-aws-proxy-auth"] = token
        return httpx.get(base + path, headers={**headers, **kw.pop("headers", {})},
                         timeout=timeout, **kw)  # fmt: skip


def _read_default_credentials(path: Path) -> tuple[str, str]:
    import configparser

    parser = configparser.ConfigParser()
    parser.read(path)
    section = parser["default"]
    return section["aws_access_key_id"], section["aws_secret_access_key"]


def wait_for(fetch: Any, done: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = fetch()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}: last {value!r}")
        time.sleep(0.5)


def build_image(server: LiveServer, name: str, source: Path, **request: Any) -> dict[str, Any]:
    """Create (or update) an image from a folder and wait until the build ends."""
    archive = zip_dir(source, server.data_dir / "uploads" / f"{name}.zip")
    client = server.client()
    params = {
        "baseImageArn": BASE_IMAGE_ARN,
        "buildRoleArn": BUILD_ROLE,
        "codeArtifact": {"uri": archive.as_uri()},
        **request,
    }
    try:
        client.get_microvm_image(imageIdentifier=name)
        client.update_microvm_image(imageIdentifier=name, **params)
    except client.exceptions.ResourceNotFoundException:
        client.create_microvm_image(name=name, **params)
    return wait_built(server, name)


def wait_built(server: LiveServer, name: str) -> dict[str, Any]:
    client = server.client()
    return dict(
        wait_for(
            lambda: client.get_microvm_image(imageIdentifier=name),
            lambda image: image["state"] not in ("CREATING", "UPDATING"),
            BUILD_TIMEOUT,
            f"the build of {name}",
        )
    )


def build_image_from_uri(server: LiveServer, name: str, uri: str) -> dict[str, Any]:
    """Create an image from a code artifact URI and wait until the build ends."""
    server.client().create_microvm_image(
        name=name, baseImageArn=BASE_IMAGE_ARN, buildRoleArn=BUILD_ROLE, codeArtifact={"uri": uri}
    )
    return wait_built(server, name)


def build_image_with_aws_cli(server: LiveServer, name: str, source: Path) -> dict[str, Any]:
    """Like ``build_image``, but the build is asked for with the AWS CLI, as users do."""
    archive = zip_dir(source, server.data_dir / "uploads" / f"{name}.zip")
    env = {**os.environ, "AWS_SHARED_CREDENTIALS_FILE": str(server.data_dir / "credentials"),
           "AWS_CONFIG_FILE": str(server.data_dir / "no-aws-config"), "AWS_PROFILE": "embervm",
           "AWS_DEFAULT_REGION": REGION, "AWS_MAX_ATTEMPTS": "1"}  # fmt: skip
    aws = Path(sys.executable).with_name("aws")
    done = subprocess.run(
        [str(aws), "lambda-microvms", "create-microvm-image", "--endpoint-url", server.api_url,
         "--name", name, "--base-image-arn", BASE_IMAGE_ARN, "--build-role-arn", BUILD_ROLE,
         "--code-artifact", f"uri={archive.as_uri()}", "--output", "json"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise AssertionError(f"aws create-microvm-image failed: {done.stderr}")
    return wait_built(server, name)


def run_vm(server: LiveServer, image: str, *connectors: str, **request: Any) -> dict[str, Any]:
    client = server.client()
    names = connectors or ("ALL_INGRESS",)
    vm = client.run_microvm(
        imageIdentifier=image,
        ingressNetworkConnectors=[CONNECTOR.format(n) for n in names],
        **request,
    )
    return dict(
        wait_for(
            lambda: client.get_microvm(microvmIdentifier=vm["microvmId"]),
            lambda got: got["state"] != "PENDING",
            300.0,
            f"MicroVM {vm['microvmId']} to start",
        )
    )


def token(server: LiveServer, microvm_id: str, **request: Any) -> str:
    request.setdefault("allowedPorts", [{"allPorts": {}}])
    request.setdefault("expirationInMinutes", 30)
    answer = server.client().create_microvm_auth_token(microvmIdentifier=microvm_id, **request)
    return str(answer["authToken"]["X-aws-proxy-auth"])


def iter_lines(server: LiveServer) -> Iterator[str]:
    yield from server.output
