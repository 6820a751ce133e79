"""The local CA and the listener's certificate: made once, private keys 0600, names covered,
remade when the domain changes or expiry nears, operator certificates used as given."""

from __future__ import annotations

import datetime as dt
import ssl
import stat
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from tests.framework.proxy_unit_harness import LocalShells, Routes, running

import embervm.proxy.tls as tls
from embervm.config import Settings
from embervm.core.tokens import TokenAuthority
from embervm.proxy import EndpointProxy

pytestmark = pytest.mark.timeout(60)


def names(cert_file: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [*sans.get_values_for_type(x509.DNSName),
            *(str(ip) for ip in sans.get_values_for_type(x509.IPAddress))]  # fmt: skip


def test_ca_and_server_certificate_are_made_once_with_private_keys(tmp_path: Path) -> None:
    files = tls.ensure_tls(tmp_path / "tls", "microvm.localhost")
    assert names(files.cert) == ["*.microvm.localhost", "microvm.localhost", "localhost",
                                 "127.0.0.1"]  # fmt: skip
    for key in (files.key, tmp_path / "tls" / "ca.key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
    before = (files.ca.read_bytes(), files.cert.read_bytes())
    again = tls.ensure_tls(tmp_path / "tls", "microvm.localhost")
    assert (again.ca.read_bytes(), again.cert.read_bytes()) == before
    context = ssl.create_default_context(cafile=str(files.ca))  # the chain verifies
    context.load_verify_locations(cafile=str(files.ca))


def test_a_new_domain_gets_a_new_certificate_from_the_same_ca_key(tmp_path: Path) -> None:
    first = tls.ensure_tls(tmp_path, "microvm.localhost")
    ca = x509.load_pem_x509_certificate(first.ca.read_bytes())
    second = tls.ensure_tls(tmp_path, "vms.example.test")
    assert "*.vms.example.test" in names(second.cert)
    widened = x509.load_pem_x509_certificate(second.ca.read_bytes())
    assert widened.public_key() == ca.public_key()  # certificates signed before stay valid
    assert x509.DNSName("vms.example.test") in permitted(second.ca)
    handshake(second, "a.vms.example.test")


def test_a_certificate_near_expiry_is_renewed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = tls.ensure_tls(tmp_path, "microvm.localhost")
    old = files.cert.read_bytes()
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=380)
    monkeypatch.setattr(tls, "_now", lambda: later)
    renewed = tls.ensure_tls(tmp_path, "microvm.localhost")
    assert renewed.cert.read_bytes() != old


async def test_an_operator_certificate_is_served_as_given(tmp_path: Path) -> None:
    theirs = tls.ensure_tls(tmp_path / "operator", "corp.test")  # any cert + key the operator has
    settings = Settings(data_dir=tmp_path / "data", proxy_port=0, proxy_http_port=0)
    routes = Routes({"mvm-0123456789abcdef0123": running("mvm-0123456789abcdef0123")})
    proxy = EndpointProxy(settings, lifecycle=routes, tokens=TokenAuthority(tmp_path / "k.json"),
                          shells=LocalShells(), tls=(theirs.cert, theirs.key))  # fmt: skip
    await proxy.start()
    try:
        verify = ssl.create_default_context(cafile=str(theirs.ca))
        async with httpx.AsyncClient(verify=verify, timeout=10) as client:
            answer = await client.get(f"https://127.0.0.1:{proxy.tls_port}/",
                                      headers={"host": "x.corp.test"})  # fmt: skip
    finally:
        await proxy.stop()
    assert answer.status_code == 404  # served over the operator's certificate; not an endpoint
    assert not (tmp_path / "data" / "tls").exists()


def permitted(ca_file: Path) -> list[x509.GeneralName]:
    cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    extension = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert extension.critical
    return list(extension.value.permitted_subtrees or [])


def handshake(files: tls.TlsFiles, hostname: str) -> None:
    """A TLS handshake in memory: a client trusting only ``files.ca`` connects to a server
    holding ``files.cert``; raises ``ssl.SSLCertVerificationError`` when OpenSSL refuses."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(files.cert, files.key)
    client = ssl.create_default_context(cafile=str(files.ca))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    near = client.wrap_bio(bios[0], bios[1], server_hostname=hostname)
    far = server.wrap_bio(bios[2], bios[3], server_side=True)
    done = {near: False, far: False}
    for _ in range(10):
        for side in (near, far):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_the_ca_only_permits_the_domain_and_localhost(tmp_path: Path) -> None:
    # A19: the CA had no name constraints: its key could sign for any site. DNS names only:
    # gRPC's BoringSSL refuses every certificate under a CA with an iPAddress constraint
    # (test_proxy_grpc's TLS cases fail then).
    files = tls.ensure_tls(tmp_path, "microvm.localhost")
    assert permitted(files.ca) == [x509.DNSName("microvm.localhost"), x509.DNSName("localhost")]
    handshake(files, "mvm-0123456789abcdef0123.microvm.localhost")


def test_a_certificate_the_ca_key_signs_for_another_site_is_refused(tmp_path: Path) -> None:
    files = tls.ensure_tls(tmp_path, "microvm.localhost")
    stolen = tls.TlsFiles(files.ca, tmp_path / "evil.pem", tmp_path / "evil.key")
    # ca.key in the wrong hands: a leaf for a bank, signed by the trusted CA.
    ca_key = serialization.load_pem_private_key((tmp_path / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(files.ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bank.example")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("bank.example")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    stolen.cert.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    stolen.key.write_bytes(tls._key_pem(key))
    with pytest.raises(ssl.SSLCertVerificationError, match="subtree"):
        handshake(stolen, "bank.example")


def test_a_ca_made_before_the_constraints_is_kept_as_it_is(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Embervm local CA")])
    legacy = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    ).public_bytes(serialization.Encoding.PEM)
    (tmp_path / "ca.pem").write_bytes(legacy)
    (tmp_path / "ca.key").write_bytes(tls._key_pem(key))
    files = tls.ensure_tls(tmp_path, "microvm.localhost")
    assert files.ca.read_bytes() == legacy  # clients that trust it keep working
    handshake(files, "localhost")


@pytest.mark.parametrize(
    ("host", "client_name"), [("192.0.2.7", "192.0.2.7"), ("api.corp.test", "api.corp.test")]
)
def test_the_api_certificate_covers_its_address_and_the_ca_permits_it(
    tmp_path: Path, host: str, client_name: str
) -> None:
    proxy = tls.ensure_tls(tmp_path, "microvm.localhost")
    api = tls.ensure_api_tls(tmp_path, "microvm.localhost", host)
    assert names(api.cert) == [*([] if host[0].isdigit() else [host]), "localhost",
                               *([host] if host[0].isdigit() else []), "127.0.0.1"]  # fmt: skip
    handshake(api, client_name)
    handshake(api, "localhost")
    handshake(proxy, "x.microvm.localhost")  # the widened CA still verifies the proxy's


def test_keys_and_certificates_are_written_durably(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A22: ca.key and server.key were renamed into place without any fsync.
    import embervm.fileio

    synced: list[Path] = []
    real = embervm.fileio.fsync_dir
    monkeypatch.setattr(embervm.fileio, "fsync_dir", lambda p: (synced.append(p), real(p)))
    tls.ensure_tls(tmp_path, "microvm.localhost")
    assert synced == [tmp_path] * 4  # ca.key, ca.pem, server.key, server.pem
