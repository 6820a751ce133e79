"""``embervm server``: one process with the control API, the endpoint proxy and the host; in a
fleet, one of them (``--role``, docs/FLEET.md)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer

from embervm.cli._app import current
from embervm.config import (
    DEFAULT_API_PORT,
    DEFAULT_DOMAIN,
    DEFAULT_PROXY_HTTP_PORT,
    DEFAULT_PROXY_PORT,
    ROLES,
    Settings,
)


def server(
    api_port: Annotated[int, typer.Option(help="Control API port.")] = DEFAULT_API_PORT,
    proxy_port: Annotated[int, typer.Option(help="Endpoint proxy TLS port.")] = DEFAULT_PROXY_PORT,
    proxy_http_port: Annotated[
        int, typer.Option(help="Endpoint proxy plain port (HTTP/1.1 + h2c).")
    ] = DEFAULT_PROXY_HTTP_PORT,
    domain: Annotated[str, typer.Option(help="Endpoint domain.")] = DEFAULT_DOMAIN,
    listen: Annotated[
        str,
        typer.Option(
            help="Address of the endpoint proxy's listeners (the control API follows it only "
            "when it is a loopback address; see --api-listen)."
        ),
    ] = "127.0.0.1",
    api_listen: Annotated[
        str | None,
        typer.Option(
            help="Address of the control API (default: --listen when that is loopback, else "
            "127.0.0.1). Off loopback the API speaks TLS (see --api-tls-cert)."
        ),
    ] = None,
    api_tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="The control API's certificate chain (PEM); default: one the local CA "
            "(DATA_DIR/tls/ca.pem) issues when the API is off loopback."
        ),
    ] = None,
    api_tls_key: Annotated[
        Path | None, typer.Option(help="The private key of --api-tls-cert (PEM).")
    ] = None,
    token_key_rotation_hours: Annotated[
        float,
        typer.Option(
            envvar="EMBERVM_TOKEN_KEY_ROTATION_HOURS",
            min=0,
            help="Hours between rotations of the endpoint-token key (0: never); tokens it "
            "sealed keep working until they expire (at most 60 min).",
        ),
    ] = 24.0,
    database_url: Annotated[
        str | None,
        typer.Option(
            envvar="EMBERVM_DATABASE_URL",
            help="SQLAlchemy URL, e.g. postgresql+asyncpg://... (default: SQLite in the data dir).",
        ),
    ] = None,
    data_dir: Annotated[
        Path | None, typer.Option("--data-dir", help="Data directory (overrides the global one).")
    ] = None,
    network_tag: Annotated[
        str,
        typer.Option(
            envvar="EMBERVM_NETWORK_TAG",
            help="Name prefix of this server's nftables tables and links (1-4 letters); "
            "only a second server on the same host needs another.",
        ),
    ] = "emb",
    network_pool: Annotated[
        str,
        typer.Option(
            envvar="EMBERVM_NETWORK_POOL",
            help="Host-side address pool of the VMs' links (a /16 no other network uses).",
        ),
    ] = "10.213.0.0/16",
    artifact_root: Annotated[
        list[Path] | None,
        typer.Option(
            "--artifact-root",
            help="Also read file:// code artifacts inside this folder (repeatable; default: "
            "only the data dir's uploads folder, where `embervm images create` puts them).",
        ),
    ] = None,
    artifact_private_network: Annotated[
        list[str] | None,
        typer.Option(
            "--artifact-private-network",
            help="Also fetch https:// code artifacts from this network (CIDR, repeatable), "
            "although it is not public: an on-prem artifact server.",
        ),
    ] = None,
    artifact_s3_bucket: Annotated[
        list[str] | None,
        typer.Option(
            "--artifact-s3-bucket",
            help="Only read s3:// code artifacts from this bucket (repeatable; default: every "
            "bucket of --s3-endpoint-url, none on AWS).",
        ),
    ] = None,
    s3_endpoint_url: Annotated[
        str | None,
        typer.Option(
            envvar="EMBERVM_S3_ENDPOINT_URL",
            help="S3-compatible endpoint of s3:// code artifacts (default: AWS); credentials "
            "come from the usual AWS variables, profile or role.",
        ),
    ] = None,
    s3_ca_file: Annotated[
        Path | None,
        typer.Option(envvar="EMBERVM_S3_CA_FILE", help="CA bundle that signs the S3 endpoint."),
    ] = None,
    log_retention_days: Annotated[
        float,
        typer.Option(
            envvar="EMBERVM_LOG_RETENTION_DAYS",
            min=0,
            help="Days a MicroVM's app output is kept after it ends.",
        ),
    ] = 7.0,
    build_cache_days: Annotated[
        float,
        typer.Option(
            envvar="EMBERVM_BUILD_CACHE_DAYS",
            min=0,
            help="Days a cached build step may go unused before its disk layer is freed.",
        ),
    ] = 14.0,
    proxy_max_connections: Annotated[
        int,
        typer.Option(
            envvar="EMBERVM_PROXY_MAX_CONNECTIONS",
            min=1,
            help="Client connections the endpoint proxy holds at once; more are closed at once "
            "(kept under half the open files limit).",
        ),
    ] = 10_000,
    proxy_max_connections_per_ip: Annotated[
        int,
        typer.Option(
            envvar="EMBERVM_PROXY_MAX_CONNECTIONS_PER_IP",
            min=1,
            help="Client connections the endpoint proxy holds at once from one address "
            "(an IPv6 /64).",
        ),
    ] = 2_000,
    proxy_session_idle_timeout: Annotated[
        float,
        typer.Option(
            envvar="EMBERVM_PROXY_SESSION_IDLE_TIMEOUT",
            min=1,
            help="Seconds a WebSocket, other upgrade or shell may go without a byte either way.",
        ),
    ] = 600.0,
    debian_mirror: Annotated[
        str | None,
        typer.Option(
            envvar="EMBERVM_DEBIAN_MIRROR",
            help="Debian archive the debian12 base image is built from, e.g. "
            "http://mirror.example/debian (default: the one this host's apt sources name, "
            "else http://deb.debian.org/debian).",
        ),
    ] = None,
    debian_security_mirror: Annotated[
        str | None,
        typer.Option(
            envvar="EMBERVM_DEBIAN_SECURITY_MIRROR",
            help="Debian security archive of the debian12 base image (default: the one this "
            "host's apt sources name, else http://deb.debian.org/debian-security).",
        ),
    ] = None,
    role: Annotated[
        str,
        typer.Option(
            envvar="EMBERVM_ROLE",
            help="What this process plays: all (one machine, the default), or in a fleet "
            "api, proxy or host (docs/FLEET.md; PostgreSQL only).",
        ),
    ] = "all",
    host_id: Annotated[
        str | None,
        typer.Option(
            envvar="EMBERVM_HOST_ID",
            help="--role host: this machine's name, stable across restarts.",
        ),
    ] = None,
    advertise: Annotated[
        str | None,
        typer.Option(
            envvar="EMBERVM_ADVERTISE",
            help="--role host: ADDR:PORT where the fleet's proxies reach this host's tunnel.",
        ),
    ] = None,
) -> None:
    """Run the server in the foreground; prints `embervm ready api=... proxy=...` when up."""
    from embervm.errors import ConfigError
    from embervm.guest.mirrors import check_mirror_url
    from embervm.server.app import event_loop_factory, run_server

    if s3_endpoint_url is not None and not s3_endpoint_url.startswith(("http://", "https://")):
        raise typer.BadParameter(
            f"{s3_endpoint_url!r} is not an http(s) URL", param_hint="--s3-endpoint-url"
        )
    if (api_tls_cert is None) != (api_tls_key is None):
        raise typer.BadParameter(
            "--api-tls-cert and --api-tls-key go together", param_hint="--api-tls-cert"
        )
    mirrors = {
        "--debian-mirror": debian_mirror,
        "--debian-security-mirror": debian_security_mirror,
    }
    for flag, url in mirrors.items():
        try:
            mirrors[flag] = check_mirror_url(url) if url else None
        except ConfigError as exc:
            raise typer.BadParameter(str(exc), param_hint=flag) from exc
    for network in artifact_private_network or ():
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError as exc:
            raise typer.BadParameter(
                f"{network!r} is not a network", param_hint="--artifact-private-network"
            ) from exc
    if role not in ROLES:
        raise typer.BadParameter(f"{role!r}: use one of {', '.join(ROLES)}", param_hint="--role")
    ctx = current()
    settings = Settings(
        data_dir=(data_dir or ctx.data_dir).expanduser().resolve(),
        listen_host=listen,
        api_listen=api_listen,
        api_tls_cert=api_tls_cert.expanduser().resolve() if api_tls_cert else None,
        api_tls_key=api_tls_key.expanduser().resolve() if api_tls_key else None,
        token_key_rotation_hours=token_key_rotation_hours,
        api_port=api_port,
        proxy_port=proxy_port,
        proxy_http_port=proxy_http_port,
        domain=domain,
        region=ctx.region,
        database_url=database_url,
        network_tag=network_tag,
        network_pool=network_pool,
        artifact_roots=artifact_roots(artifact_root),
        artifact_private_networks=tuple(artifact_private_network or ()),
        artifact_s3_buckets=tuple(artifact_s3_bucket) if artifact_s3_bucket else None,
        s3_endpoint_url=s3_endpoint_url,
        s3_ca_file=s3_ca_file.expanduser().resolve() if s3_ca_file else None,
        app_log_retention_days=log_retention_days,
        build_cache_days=build_cache_days,
        proxy_max_connections=proxy_max_connections,
        proxy_max_connections_per_ip=proxy_max_connections_per_ip,
        proxy_session_idle_timeout=proxy_session_idle_timeout,
        debian_mirror=mirrors["--debian-mirror"],
        debian_security_mirror=mirrors["--debian-security-mirror"],
        role=role,
        host_id=host_id,
        advertise=advertise,
    )
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        code = runner.run(run_server(settings))
    raise typer.Exit(code)


def artifact_roots(flags: list[Path] | None) -> tuple[Path, ...] | None:
    """``--artifact-root`` folders, else ``EMBERVM_ARTIFACT_ROOTS`` (``:``-separated)."""
    if flags:
        return tuple(path.expanduser().resolve() for path in flags)
    env = os.environ.get("EMBERVM_ARTIFACT_ROOTS", "")
    parts = [part for part in env.split(os.pathsep) if part]
    return tuple(Path(part).expanduser().resolve() for part in parts) if parts else None


def register(app: typer.Typer) -> None:
    app.command()(server)
