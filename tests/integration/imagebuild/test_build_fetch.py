"""fetch_code_artifact against real servers on 127.0.0.1: HTTPS with a CA the test makes, and
S3 through moto's real HTTP server (``moto[server]``) with boto3.

127.0.0.1 is not a public address, so the HTTPS tests allow it (``LOOPBACK``) the way an
on-prem operator allows an artifact server's network; each redirect is checked again."""

from __future__ import annotations

import datetime
import http.server
import ipaddress
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from embervm.blobs import S3BlobStore, S3Config, S3Credentials, fetch_code_artifact
from embervm.errors import BuildFailure, NotFoundError

pytestmark = pytest.mark.integration

PAYLOAD = b"PK\x03\x04" + b"z" * 5000
LOOPBACK = ("127.0.0.1/32",)
NAME = "artifacts.test"  # resolved by the test's own getaddrinfo to 127.0.0.1
HOSTS_SEEN: list[str] = []  # the Host field of each request the HTTPS server answered


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Name | None,
    issuer_key: ec.EllipticCurvePrivateKey | None,
    *,
    ca: bool,
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer or name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName(NAME)]
            ),
            critical=False,
        )
    return builder.sign(issuer_key or key, hashes.SHA256())


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(ca.pem, server cert chain, server key), made fresh for this test run."""
    d = tmp_path_factory.mktemp("tls")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("embervm test CA", ca_key, None, None, ca=True)
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _cert("127.0.0.1", key, ca.subject, ca_key, ca=False)
    pem = serialization.Encoding.PEM
    (d / "ca.pem").write_bytes(ca.public_bytes(pem))
    (d / "server.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (d / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return d / "ca.pem", d / "server.pem", d / "server.key"


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # quiet
        return

    def do_GET(self) -> None:
        HOSTS_SEEN.append(self.headers.get("Host", ""))
        if self.path == "/artifact.zip":
            self.send_response(200)
            self.send_header("Content-Length", str(len(PAYLOAD)))
            self.end_headers()
            self.wfile.write(PAYLOAD)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "/artifact.zip")
            self.end_headers()
        elif self.path == "/to-internal":  # the same server, by an address nobody allowed
            self.send_response(302)
            _, port = self.connection.getsockname()
            self.send_header("Location", f"https://127.0.0.2:{port}/artifact.zip")
            self.end_headers()
        elif self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
        elif self.path == "/to-http":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:9/artifact.zip")
            self.end_headers()
        elif self.path == "/chunked-big":  # no Content-Length: only counting can stop it
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"y" * 4096
            try:
                for _ in range(64):
                    self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                pass
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()


@pytest.fixture(scope="module")
def https_url(tls_files: tuple[Path, Path, Path]) -> Iterator[str]:
    _, chain, key = tls_files
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(chain, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(5)


async def test_https_fetch_verifies_with_the_given_ca(
    https_url: str, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    ca = tls_files[0]
    dest = await fetch_code_artifact(
        f"{https_url}/artifact.zip", tmp_path / "a.zip", ca_file=ca, private_networks=LOOPBACK
    )
    assert dest.read_bytes() == PAYLOAD
    dest = await fetch_code_artifact(
        f"{https_url}/redirect", tmp_path / "b.zip", ca_file=ca, private_networks=LOOPBACK
    )
    assert dest.read_bytes() == PAYLOAD


async def test_https_with_untrusted_certificate_is_refused(https_url: str, tmp_path: Path) -> None:
    with pytest.raises(BuildFailure, match=r"TLS certificate not trusted$"):
        await fetch_code_artifact(
            f"{https_url}/artifact.zip", tmp_path / "a.zip", private_networks=LOOPBACK
        )
    assert not (tmp_path / "a.zip").exists()


async def test_https_to_a_loopback_server_is_refused_by_default(
    https_url: str, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    """The audit's probe: the server's own listeners answered "TLS certificate not trusted"
    (a port scan from the host); now nothing is connected to."""
    seen = len(HOSTS_SEEN)
    with pytest.raises(BuildFailure, match="did not resolve to a public address"):
        await fetch_code_artifact(
            f"{https_url}/artifact.zip", tmp_path / "a.zip", ca_file=tls_files[0]
        )
    assert len(HOSTS_SEEN) == seen


async def test_a_redirect_to_an_address_not_allowed_is_refused(
    https_url: str, tls_files: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    with pytest.raises(BuildFailure, match="did not resolve to a public address"):
        await fetch_code_artifact(
            f"{https_url}/to-internal",
            tmp_path / "a.zip",
            ca_file=tls_files[0],
            private_networks=LOOPBACK,
        )
    assert names(tmp_path) == []


async def test_the_checked_address_is_connected_to_and_the_name_serves_tls_and_host(
    https_url: str,
    tls_files: tuple[Path, Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One lookup per hop, and the connection goes to what it answered (a second, different
    answer — DNS rebinding — is never asked for); TLS verifies the name, Host carries it."""
    port = int(https_url.rsplit(":", 1)[1])
    lookups: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def fake_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host == NAME:
            lookups.append(host)
            return real_getaddrinfo("127.0.0.1", *args, **kwargs)
        return real_getaddrinfo(host, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    dest = await fetch_code_artifact(
        f"https://{NAME}:{port}/redirect",
        tmp_path / "a.zip",
        ca_file=tls_files[0],
        private_networks=LOOPBACK,
    )
    assert dest.read_bytes() == PAYLOAD
    assert lookups == [NAME, NAME]  # the URI, then its redirect
    assert HOSTS_SEEN[-2:] == [f"{NAME}:{port}"] * 2


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("/missing.zip", "returned HTTP 404"),
        ("/artifact.zip", "is 5004 bytes; the limit is 1000"),
        ("/chunked-big", "larger than 1000 bytes"),
        ("/to-http", "redirected to a non-https URL"),
        ("/loop", "too many redirects"),
    ],
)
async def test_https_failures_are_user_facing(
    https_url: str, tls_files: tuple[Path, Path, Path], tmp_path: Path, path: str, why: str
) -> None:
    with pytest.raises(BuildFailure, match=why):
        await fetch_code_artifact(
            f"{https_url}{path}",
            tmp_path / "a.zip",
            ca_file=tls_files[0],
            max_bytes=1000,
            private_networks=LOOPBACK,
        )
    assert names(tmp_path) == []


@pytest.fixture(scope="module")
def s3_config() -> Iterator[S3Config]:
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield S3Config(
        endpoint_url=f"http://{host}:{port}",
        credentials=S3Credentials("testing", "testing"),
        region="us-east-1",
        connect_timeout=2,
        read_timeout=5,
        call_timeout=20,
    )
    server.stop()


def _bucket(config: S3Config, name: str) -> None:
    creds = config.credentials
    assert creds is not None
    boto3.client(
        "s3",
        endpoint_url=config.endpoint_url,
        region_name=config.region,
        aws_access_key_id=creds.access_key_id,
        aws_secret_access_key=creds.secret_access_key,
    ).create_bucket(Bucket=name)


async def test_s3_fetch_through_a_real_s3_endpoint(s3_config: S3Config, tmp_path: Path) -> None:
    _bucket(s3_config, "artifacts")
    store = S3BlobStore(
        "artifacts", s3_config.endpoint_url, s3_config.credentials, config=s3_config
    )
    await store.put("apps/web.zip", PAYLOAD)
    dest = await fetch_code_artifact(
        "s3://artifacts/apps/web.zip", tmp_path / "a.zip", s3_config=s3_config
    )
    assert dest.read_bytes() == PAYLOAD
    with pytest.raises(BuildFailure, match="does not exist"):
        await fetch_code_artifact(
            "s3://artifacts/apps/none.zip", tmp_path / "b.zip", s3_config=s3_config
        )
    with pytest.raises(BuildFailure, match="larger than 100 bytes"):
        await fetch_code_artifact(
            "s3://artifacts/apps/web.zip", tmp_path / "c.zip", s3_config=s3_config, max_bytes=100
        )
    assert names(tmp_path) == ["a.zip"]


async def test_s3_blob_store_round_trip(s3_config: S3Config, tmp_path: Path) -> None:
    _bucket(s3_config, "blobs")
    store = S3BlobStore(
        "blobs", s3_config.endpoint_url, s3_config.credentials, prefix="embervm/", config=s3_config
    )
    src = tmp_path / "snap.bin"
    src.write_bytes(b"s" * 3000)
    await store.put_file("snapshots/v1/mem", src)
    assert await store.exists("snapshots/v1/mem")
    assert b"".join([c async for c in store.get_stream("snapshots/v1/mem")]) == b"s" * 3000
    await store.delete("snapshots/v1/mem")
    assert not await store.exists("snapshots/v1/mem")
    with pytest.raises(NotFoundError):
        await store.get_to_file("snapshots/v1/mem", tmp_path / "x", max_bytes=10)


async def test_s3_unreachable_endpoint_fails_in_bounded_time(tmp_path: Path) -> None:
    config = S3Config(
        endpoint_url="http://127.0.0.1:9",
        credentials=S3Credentials("a", "b"),
        connect_timeout=1,
        read_timeout=1,
        call_timeout=10,
    )
    with pytest.raises(BuildFailure, match=r"could not be fetched from S3$") as err:
        await fetch_code_artifact("s3://b/k.zip", tmp_path / "a.zip", s3_config=config)
    assert "127.0.0.1" not in err.value.reason  # botocore's text (the endpoint) is only logged
