"""Settings: plain data, read once at start-up from flags and the environment."""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

DEFAULT_API_PORT = 8700
DEFAULT_PROXY_PORT = 8443
DEFAULT_PROXY_HTTP_PORT = 8780
DEFAULT_DOMAIN = "microvm.localhost"
DEFAULT_REGION = "us-east-1"


def default_data_dir() -> Path:
    """``EMBERVM_DATA_DIR`` or ``~/.local/share/embervm`` (README.md, "Configuration")."""
    env = os.environ.get("EMBERVM_DATA_DIR")
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".local" / "share" / "embervm"


@dataclass(frozen=True)
class DataDir:
    """Every folder and file of the data dir, by name: the one place their paths are spelled
    (the server through ``Settings``, the CLI through its context)."""

    root: Path

    @property
    def artifacts(self) -> Path:
        """Guest kernel, initramfs and base images, cached by content hash."""
        return self.root / "artifacts"

    @property
    def vms(self) -> Path:
        return self.root / "vms"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def layers(self) -> Path:
        """Frozen qcow2 disk layers of builds (the step cache and images refer to them)."""
        return self.root / "layers"

    @property
    def build_cache(self) -> Path:
        return self.root / "build-cache"

    @property
    def uploads(self) -> Path:
        """Zips the CLI makes from build folders (the only part of the data dir builds read)."""
        return self.root / "uploads"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def accel_cache(self) -> Path:
        """What the accelerator probe found, per kernel (``vmm.accel``)."""
        return self.run / "accel.json"

    @property
    def network(self) -> Path:
        """Network pool allocations and the host's saved state (``embervm.network``)."""
        return self.root / "network"

    @property
    def microvm_logs(self) -> Path:
        """The apps' output, one file per VM (``host.applogs``)."""
        return self.root / "microvm-logs"

    @property
    def tls(self) -> Path:
        return self.root / "tls"

    @property
    def ca_file(self) -> Path:
        """The local CA the proxy's (and an off-loopback API's) certificates chain to."""
        return self.tls / "ca.pem"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials"

    @property
    def token_keys(self) -> Path:
        """The endpoint and shell token keys (``core.tokens``; ``embervm tokens rotate``)."""
        return self.root / "keys" / "tokens.json"

    @property
    def database(self) -> Path:
        return self.root / "embervm.db"

    @property
    def demo_log(self) -> Path:
        """The server's output while ``make demo`` runs it."""
        return self.root / "demo-server.log"


def is_loopback(host: str) -> bool:
    """Only this machine can reach ``host`` (127.0.0.0/8, ::1, ``localhost``): the control
    API may speak plain HTTP there; anywhere else it speaks TLS."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


Role = Literal["all", "api", "proxy", "host"]
ROLES: tuple[Role, ...] = ("all", "api", "proxy", "host")


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=default_data_dir)
    listen_host: str = "127.0.0.1"
    api_port: int = DEFAULT_API_PORT
    proxy_port: int = DEFAULT_PROXY_PORT
    proxy_http_port: int = DEFAULT_PROXY_HTTP_PORT
    domain: str = DEFAULT_DOMAIN
    region: str = DEFAULT_REGION
    account_id: str = "000000000000"
    database_url: str | None = None  # default: sqlite in data_dir
    # Separate servers (and test runs) on one host need their own nftables tables and address
    # pools; one server per host keeps the defaults.
    network_tag: str = "emb"
    network_pool: str = "10.213.0.0/16"
    # Folders a ``file://`` code artifact may come from besides the data dir's uploads folder
    # (None: none; never the rest of the data dir, /proc, /sys or /dev).
    artifact_roots: tuple[Path, ...] | None = None
    # Networks (CIDR) ``https://`` artifacts may come from although they are not public (an
    # on-prem artifact server); "0.0.0.0/0" and "::/0" allow every address.
    artifact_private_networks: tuple[str, ...] = ()
    # Buckets s3:// artifacts may come from (None: every bucket of ``s3_endpoint_url``, and none
    # on AWS, where the server's own identity would read them for any caller).
    artifact_s3_buckets: tuple[str, ...] | None = None
    # Where s3:// code artifacts live (None: AWS); credentials come from boto3's usual chain.
    s3_endpoint_url: str | None = None
    s3_ca_file: Path | None = None
    # The app output of a MicroVM is kept this long after it ends.
    app_log_retention_days: float = 7.0
    # A build step's cached layer is forgotten (and its disk space freed) after this long unused.
    build_cache_days: float = 14.0
    # Endpoint proxy: client connections held at once, in all and per source address (an IPv6
    # /64), beyond which new ones are closed unread (A8); and how long a WebSocket, other
    # upgrade or shell may go without a byte either way (A16).
    proxy_max_connections: int = 10_000
    proxy_max_connections_per_ip: int = 2_000
    proxy_session_idle_timeout: float = 600.0
    # Where the control API listens (None: ``listen_host`` when that is loopback, else
    # 127.0.0.1: putting the endpoints on the network never exposes the API with them, A7).
    api_listen: str | None = None
    # The API's own certificate and key (None: the local CA issues one when it needs TLS).
    api_tls_cert: Path | None = None
    api_tls_key: Path | None = None
    # The token key is replaced this often (0: never); tokens live at most 60 min.
    token_key_rotation_hours: float = 24.0
    # Debian mirrors the ``debian12`` base disk is built from (None: the one the host's apt
    # sources name, else deb.debian.org; ``guest.mirrors``). Not part of the disk's cache key.
    debian_mirror: str | None = None
    debian_security_mirror: str | None = None
    # A fleet (docs/FLEET.md): which part this process plays ("all": everything, one machine),
    # a host's stable name and where proxies reach its tunnel listener (ADDR:PORT).
    role: Role = "all"
    host_id: str | None = None
    advertise: str | None = None

    @property
    def api_host(self) -> str:
        """The control API's listening address (see ``api_listen``)."""
        if self.api_listen is not None:
            return self.api_listen
        return self.listen_host if is_loopback(self.listen_host) else "127.0.0.1"

    @property
    def api_tls(self) -> bool:
        """The control API speaks TLS: off this machine, or when given a certificate."""
        return self.api_tls_cert is not None or not is_loopback(self.api_host)

    @property
    def paths(self) -> DataDir:
        return DataDir(self.data_dir)

    @property
    def token_keys_file(self) -> Path:
        return self.paths.token_keys

    @property
    def artifacts_dir(self) -> Path:
        return self.paths.artifacts

    @property
    def vms_dir(self) -> Path:
        return self.paths.vms

    @property
    def images_dir(self) -> Path:
        return self.paths.images

    @property
    def layers_dir(self) -> Path:
        return self.paths.layers

    @property
    def build_cache_dir(self) -> Path:
        return self.paths.build_cache

    @property
    def run_dir(self) -> Path:
        return self.paths.run

    @property
    def tls_dir(self) -> Path:
        return self.paths.tls

    @property
    def uploads_dir(self) -> Path:
        return self.paths.uploads

    @property
    def credentials_file(self) -> Path:
        return self.paths.credentials

    @property
    def sqlite_url(self) -> str:
        return f"sqlite+aiosqlite:///{self.paths.database}"

    @property
    def effective_database_url(self) -> str:
        return self.database_url or self.sqlite_url
