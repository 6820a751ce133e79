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
from tests.unit.proxy.conftest import LocalShells, Routes, running

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


def test_a_new_domain_gets_a_new_certificate_from_the_same_ca(tmp_path: Path) -> None:
    first = tls.ensure_tls(tmp_path, "microvm.localhost")
    ca = first.ca.read_bytes()
    second = tls.ensure_tls(tmp_path, "vms.example.test")
    assert "*.vms.example.test" in names(second.cert)
    assert second.ca.read_bytes() == ca


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
