"""TLS for the endpoint proxy and the control API: a local CA the server creates, and the
listeners' certificates.

``DATA_DIR/tls/ca.pem`` (+ ``ca.key``, 0600) is made once; clients trust it (the CLI does on
its own; ``curl --cacert``, ``SSL_CERT_FILE``...). The proxy's certificate covers
``*.<domain>``, ``<domain>``, ``localhost`` and ``127.0.0.1``; the control API's (only made
when the API listens off loopback) covers its listening address (or this host's names when it
listens on every address), ``localhost`` and ``127.0.0.1``. Both are signed by that CA and made
again when their names change or they have less than 30 days left. An operator may pass their
own certificate and key instead. ALPN offers ``h2`` and ``http/1.1``.

The CA carries a critical NameConstraints extension (A19) permitting only ``<domain>`` (and
its subdomains) and ``localhost``, plus the control API's host name: a stolen ``ca.key``
cannot mint a certificate its clients accept for any other site's name. IP addresses are not
constrained: BoringSSL (gRPC's TLS) refuses every certificate under a CA with an iPAddress
constraint. When a new domain
or API address needs a name the CA does not permit, the CA certificate is issued again with
the same key and the wider list (certificates it signed stay valid; clients must load the new
``ca.pem`` to accept the new names; the CLI reads it from the data dir). A CA made before the
constraints existed is kept as it is (replacing it would break every client that trusts it);
the server warns, and removing ``tls/ca.pem`` and ``tls/ca.key`` makes a constrained one.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from embervm.fileio import atomic_write

log = logging.getLogger("embervm.tls")

CA_DAYS = 3650
CERT_DAYS = 397
RENEW_BEFORE = dt.timedelta(days=30)


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _general_name(name: str) -> x509.GeneralName:
    """An IP address or a DNS name, for a certificate's subjectAltName."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _permitted(domain: str, leaf_names: Iterable[str]) -> list[x509.GeneralName]:
    """The CA's permitted subtrees: DNS names only. BoringSSL (gRPC's TLS) refuses every
    certificate issued under a CA that has an iPAddress constraint ("unsupported name
    constraint type"), so IP names are left unconstrained (RFC 5280 §4.2.1.10: a constraint
    binds only names of its own type)."""
    wanted = [domain, "localhost", *leaf_names]
    names = dict.fromkeys(name.removeprefix("*.") for name in wanted)  # a subtree has no '*'
    return [n for n in map(_general_name, names) if isinstance(n, x509.DNSName)]


def _constraints(cert: x509.Certificate) -> list[x509.GeneralName] | None:
    try:
        value = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return None
    return list(value.permitted_subtrees or [])


def _issue_ca(
    key: ec.EllipticCurvePrivateKey, permitted: list[x509.GeneralName]
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Embervm local CA")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.NameConstraints(permitted, None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )


def _ensure_ca(
    tls_dir: Path, permitted: list[x509.GeneralName]
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The local CA, made when missing and issued again (same key) when it does not permit
    every name in ``permitted``."""
    ca_pem, ca_key = tls_dir / "ca.pem", tls_dir / "ca.key"
    if ca_pem.exists() and ca_key.exists():
        key = serialization.load_pem_private_key(ca_key.read_bytes(), None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        cert = x509.load_pem_x509_certificate(ca_pem.read_bytes())
        allowed = _constraints(cert)
        if allowed is None:
            log.warning(
                "%s has no name constraints (made by an older Embervm): its key could sign "
                "for any site; remove %s and %s to make a constrained CA (clients must then "
                "trust the new ca.pem)",
                ca_pem,
                ca_pem,
                ca_key,
            )
            return cert, key
        missing = [name for name in permitted if name not in allowed]
        if not missing:
            return cert, key
        cert = _issue_ca(key, [*allowed, *missing])
        atomic_write(ca_pem, cert.public_bytes(serialization.Encoding.PEM), mode=0o600)
        log.warning("%s issued again to also permit %s", ca_pem, ", ".join(map(str, missing)))
        return cert, key
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _issue_ca(key, permitted)
    atomic_write(ca_key, _key_pem(key), mode=0o600)
    atomic_write(ca_pem, cert.public_bytes(serialization.Encoding.PEM), mode=0o600)
    return cert, key


def _current(files: TlsFiles, names: list[x509.GeneralName]) -> bool:
    """The certificate covers exactly ``names`` and has more than 30 days left."""
    try:
        cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (OSError, ValueError, x509.ExtensionNotFound):
        return False
    fresh = cert.not_valid_after_utc - _now() > RENEW_BEFORE
    return fresh and set(sans) == set(names) and files.key.exists()


def _ensure_leaf(
    tls_dir: Path, files: TlsFiles, common_name: str, names: list[str], domain: str
) -> TlsFiles:
    """A current certificate for ``names`` at ``files``, signed by the local CA."""
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_cert, ca_key = _ensure_ca(tls_dir, _permitted(domain, names))
    sans = [_general_name(name) for name in dict.fromkeys(names)]
    if _current(files, sans):
        return files
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    atomic_write(files.key, _key_pem(key), mode=0o600)
    chain = cert.public_bytes(serialization.Encoding.PEM)
    atomic_write(files.cert, chain + ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o600)
    return files


def ensure_tls(tls_dir: Path, domain: str) -> TlsFiles:
    """The CA and a current proxy certificate for ``domain`` (created when missing)."""
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "server.pem", tls_dir / "server.key")
    names = [f"*.{domain}", domain, "localhost", "127.0.0.1"]
    return _ensure_leaf(tls_dir, files, f"*.{domain}", names, domain)


def api_names(host: str) -> list[str]:
    """What a client may call the control API listening on ``host``: the address itself, or
    this host's names when it listens on every address; and always the loopback names."""
    wildcard = host in ("", "0.0.0.0", "::")
    own = dict.fromkeys([socket.gethostname(), socket.getfqdn()]) if wildcard else {host: None}
    return [*own, "localhost", "127.0.0.1"]


def ensure_api_tls(tls_dir: Path, domain: str, host: str) -> TlsFiles:
    """The CA and a current control-API certificate for a listener on ``host``."""
    files = TlsFiles(tls_dir / "ca.pem", tls_dir / "api.pem", tls_dir / "api.key")
    return _ensure_leaf(tls_dir, files, "Embervm control API", api_names(host), domain)


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ with ALPN h2 and http/1.1."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context
