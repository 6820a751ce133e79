"""``https://`` code artifacts, fetched from public addresses only.

The server fetches what any API caller names, from the host's own position in the network, so
a URI must not reach what a guest cannot: every address a host name resolves to must be
public (not in the guests' blocked ranges — private, shared, loopback, link-local, multicast,
reserved — nor otherwise non-global, nor one of this host's own addresses), unless it lies in
a network the operator allowed (``private_networks``: an on-prem artifact server). The
connection goes to the address that was checked (the name only serves TLS and ``Host``), so a
second DNS answer cannot swap it; redirects are followed by hand and each one is checked the
same way. Proxies from the environment are not used (a proxy would connect for us, anywhere).

Failures say what the caller could learn anyway from the public internet ("returned HTTP
404", "could not connect"); a name that does not resolve and a name that resolves to a
refused address give the same sentence, and no exception text reaches the reason (it is
logged).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import httpx

from embervm.blobs._store import CHUNK
from embervm.errors import BuildFailure
from embervm.network import BLOCKED_IPV4

log = logging.getLogger("embervm.blobs.fetch")

MAX_REDIRECTS = 5
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_BLOCKED = tuple(ipaddress.IPv4Network(net) for net in BLOCKED_IPV4)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def parse_networks(networks: Sequence[str]) -> tuple[IPNetwork, ...]:
    """CIDRs (``10.1.0.0/16``, ``fd00::/8``, ``0.0.0.0/0``); ``ValueError`` for a bad one."""
    return tuple(ipaddress.ip_network(net, strict=False) for net in networks)


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_own_address(ip: IPAddress) -> bool:
    """Whether ``ip`` is one of this host's addresses: only those can be bound to."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(ip), 0))
        except OSError:
            return False
    return True


def is_fetchable(ip: IPAddress, allowed: Sequence[IPNetwork] = ()) -> bool:
    """Whether an artifact may be fetched from ``ip``."""
    if any(ip.version == net.version and ip in net for net in allowed):
        return True
    if isinstance(ip, ipaddress.IPv6Address):
        inner = _embedded_ipv4(ip)
        if inner is not None:
            return is_fetchable(inner, allowed)
    elif any(ip in net for net in _BLOCKED):
        return False
    if not ip.is_global or ip.is_multicast:
        return False
    return not is_own_address(ip)


def _checked_address(host: str, port: int, allowed: Sequence[IPNetwork]) -> str | None:
    """The first address ``host`` resolves to, when every one of them is fetchable."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        log.info("code artifact host %r does not resolve: %s", host, exc)
        return None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if not is_fetchable(ipaddress.ip_address(address.split("%", 1)[0]), allowed):
            log.info("code artifact host %r resolves to %s: refused", host, address)
            return None
    return addresses[0] if addresses else None


def _tls_context(ca_file: Path | None) -> ssl.SSLContext:
    """The system trust store (``/etc/ssl/certs``) unless a CA file is given."""
    if ca_file is not None:
        return ssl.create_default_context(cafile=str(ca_file))
    return ssl.create_default_context()


async def https_chunks(
    uri: str, *, ca_file: Path | None, max_bytes: int, private_networks: Sequence[str] = ()
) -> AsyncIterator[bytes]:
    """The body at ``uri``, fetched as the module docstring says."""
    allowed = parse_networks(private_networks)
    async with httpx.AsyncClient(
        verify=_tls_context(ca_file), timeout=httpx.Timeout(30.0, connect=10.0), trust_env=False
    ) as client:
        url = httpx.URL(uri)
        for _ in range(MAX_REDIRECTS + 1):
            if url.scheme != "https":
                raise BuildFailure(f"code artifact {uri!r} redirected to a non-https URL")
            address = await asyncio.to_thread(_checked_address, url.host, url.port or 443, allowed)
            if address is None:
                raise BuildFailure(
                    f"code artifact {uri!r} could not be fetched: its host did not resolve to a "
                    "public address"
                )
            request = client.build_request(
                "GET",
                url.copy_with(host=address),
                headers={"Host": url.netloc.decode("ascii")},
                extensions={"sni_hostname": url.host},
            )
            try:
                response = await client.send(request, stream=True)
                try:
                    if response.is_redirect:
                        url = url.join(response.headers["location"])
                        continue
                    async for chunk in _body(uri, response, max_bytes):
                        yield chunk
                    return
                finally:
                    await response.aclose()
            except httpx.HTTPError as exc:
                raise _failure(uri, exc) from exc
        raise BuildFailure(f"code artifact {uri!r}: too many redirects")


async def _body(uri: str, response: httpx.Response, max_bytes: int) -> AsyncIterator[bytes]:
    if response.status_code != 200:
        raise BuildFailure(
            f"downloading the code artifact {uri!r} returned HTTP {response.status_code}"
        )
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BuildFailure(f"code artifact {uri!r} is {declared} bytes; the limit is {max_bytes}")
    async for chunk in response.aiter_bytes(CHUNK):
        yield chunk


def _failure(uri: str, exc: httpx.HTTPError) -> BuildFailure:
    """A fixed sentence for the caller; the exception (addresses, TLS details) is logged."""
    log.info("code artifact %s: %r", uri, exc)
    if isinstance(exc, httpx.ConnectError):
        cause = "TLS certificate not trusted" if _is_tls(exc) else "could not connect"
    elif isinstance(exc, httpx.TimeoutException):
        cause = "the server stopped answering"
    else:
        cause = "download failed"
    return BuildFailure(f"code artifact {uri!r}: {cause}")


def _is_tls(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return "CERTIFICATE_VERIFY_FAILED" in str(exc)
