"""A throwaway PostgreSQL cluster of the local fleet, from Debian's ``postgresql-15`` binaries.

Everything lives under one folder (``root``): ``data/`` (the cluster), ``sock/`` (its Unix
socket), ``postgres.log``. It listens on 127.0.0.1 only; every client of that address and of the
socket is trusted (no password), as user ``embervm``, which owns database ``embervm``. Run by
root, the server runs as the ``postgres`` user (PostgreSQL refuses root) and ``root`` belongs to
that user, so every folder above ``root`` must let it pass (``/root`` does not).

Not durable by default (``fsync = off``): a killed server or ``pg_ctl restart -m immediate``
loses no committed transaction (the WAL is in the kernel's cache), a power loss may.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

from embervm.errors import ConfigError, RuntimeFailure
from embervm.fileio import atomic_write
from embervm.localfleet._proc import (
    LOOPBACK,
    ProcessIdentity,
    pidfd_of,
    run,
    tail,
    tail_file,
    wait_pidfd,
)

PG_USER = "postgres"  # the system user the server runs as when we are root
DB_USER = "embervm"
DB_NAME = "embervm"
PG_ROOT = Path("/usr/lib/postgresql")
PREFERRED_MAJOR = "15"
INSTALL_HINT = "run `make setup`, or `apt install postgresql-15`"
_CONF = "embervm.conf"
_MARKER = "initialized"
ShutdownMode = Literal["smart", "fast", "immediate"]


def find_pg_bin() -> Path:
    """The folder of ``initdb``, ``pg_ctl`` and ``postgres``: PostgreSQL 15's if installed,
    else the newest major version's. ConfigError (saying how to install it) if none is."""
    majors = sorted(
        (p.name for p in PG_ROOT.glob("*") if p.name.isdigit()), key=int, reverse=True
    ) if PG_ROOT.is_dir() else []  # fmt: skip
    for major in sorted(majors, key=lambda m: m != PREFERRED_MAJOR):
        bin_dir = PG_ROOT / major / "bin"
        if all(os.access(bin_dir / name, os.X_OK) for name in ("initdb", "pg_ctl", "postgres")):
            return bin_dir
    raise ConfigError(
        f"PostgreSQL server binaries not found ({PG_ROOT}/<version>/bin/initdb): {INSTALL_HINT}"
    )


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class LocalPostgres:
    """One PostgreSQL cluster under ``root``: ``init()``, ``start(port)``, ``restart()``,
    ``stop()``; each is idempotent and every command it runs has a timeout."""

    def __init__(
        self, root: Path, *, durable: bool = False, bin_dir: Path | None = None,
        timeout: float = 60.0,
    ) -> None:  # fmt: skip
        self.root = root.absolute()
        self.data = self.root / "data"
        self.sock_dir = self.root / "sock"
        self.log_file = self.root / "postgres.log"
        self.durable = durable
        self.timeout = timeout
        self._bin_dir = bin_dir

    # -- what runs ---------------------------------------------------------------------------

    @property
    def bin_dir(self) -> Path:
        if self._bin_dir is None:
            self._bin_dir = find_pg_bin()
        return self._bin_dir

    @property
    def pid(self) -> int | None:
        """The postmaster's pid (``data/postmaster.pid``) if it runs, else None."""
        identity = self.process()
        return identity.pid if identity else None

    @property
    def port(self) -> int:
        """The port the cluster listens on (the one it was last started with)."""
        try:
            found = re.search(r"^port = (\d+)$", (self.data / _CONF).read_text(), re.M)
        except OSError:
            found = None
        if found is None:
            raise RuntimeFailure(f"PostgreSQL in {self.root} has never been started")
        return int(found.group(1))

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of database ``embervm`` (``postgresql+asyncpg://…``)."""
        return f"postgresql+asyncpg://{DB_USER}@{LOOPBACK}:{self.port}/{DB_NAME}"

    def is_running(self) -> bool:
        return self.process() is not None

    def process(self) -> ProcessIdentity | None:
        """The running postmaster (its pid file's pid, checked to be this cluster's), or None."""
        try:
            first = (self.data / "postmaster.pid").read_text().split("\n", 1)[0]
            identity = ProcessIdentity.of(int(first))
        except (OSError, ValueError):
            return None
        if identity is None or not self._is_our_postmaster(identity.cmdline):
            return None  # a stale file (after a crash) whose pid names something else now
        return identity

    def _is_our_postmaster(self, cmdline: tuple[str, ...]) -> bool:
        if not cmdline or Path(cmdline[0]).name not in ("postgres", "postmaster"):
            return False
        return "-D" in cmdline[:-1] and cmdline[cmdline.index("-D") + 1] == str(self.data)

    # -- set-up ------------------------------------------------------------------------------

    def init(self) -> None:
        """Create the cluster once (initdb, trust on 127.0.0.1 only, database ``embervm``).

        A cluster whose creation was cut short is made again. ConfigError when the binaries or
        the ``postgres`` user are missing or when that user cannot reach ``root``.
        """
        bin_dir = self.bin_dir
        owner = self._owner()
        for folder in (self.root, self.sock_dir):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            if owner is not None:
                os.chown(folder, *owner)
            folder.chmod(0o700)
        self._check_reachable()
        if (self.root / _MARKER).is_file() and (self.data / "PG_VERSION").is_file():
            return
        if self.is_running():
            raise RuntimeFailure(f"PostgreSQL in {self.root} runs but was never set up fully")
        shutil.rmtree(self.data, ignore_errors=True)  # what an init cut short left
        initdb = [
            str(bin_dir / "initdb"), "-D", str(self.data), "-U", DB_USER, "--auth=trust",
            "-E", "UTF8", "--locale=C", "--no-instructions",
        ]  # fmt: skip
        if not self.durable:
            initdb.append("--no-sync")
        run(self._as_owner(initdb), what="initdb", timeout=max(120.0, self.timeout), cwd=self.root)
        self._write(self.data / "pg_hba.conf", (
            "# embervm: the socket (a folder only the server's user opens) and 127.0.0.1 only\n"
            "local all all trust\n"
            f"host all all {LOOPBACK}/32 trust\n"
        ))  # fmt: skip
        conf = (self.data / "postgresql.conf").read_text()
        self._write(self.data / "postgresql.conf", conf + f"\ninclude_if_exists = '{_CONF}'\n")
        self._write_settings(port=None)
        self._create_database(bin_dir)
        self._write(self.root / _MARKER, "")

    def _create_database(self, bin_dir: Path) -> None:
        """``CREATE DATABASE embervm`` in single-user mode: no server, no port, no socket."""
        argv = [str(bin_dir / "postgres"), "--single", "-D", str(self.data), "postgres"]
        done = run(
            self._as_owner(argv), what="creating database embervm", timeout=max(60.0, self.timeout),
            cwd=self.root, input_text=f"CREATE DATABASE {DB_NAME} OWNER {DB_USER}\n",
        )  # fmt: skip
        if "ERROR" in done.stdout + done.stderr:  # single-user mode exits 0 after an error
            raise RuntimeFailure(f"creating database embervm failed: {tail(done.stderr)}")

    def _write_settings(self, port: int | None) -> None:
        lines = [
            "# written by embervm.localfleet at each start",
            f"listen_addresses = {_quote(LOOPBACK)}",
            f"unix_socket_directories = {_quote(str(self.sock_dir))}",
            "max_connections = 200",  # api, proxy and every host each hold a pool
            "shared_buffers = 32MB",
        ]
        if port is not None:
            lines.append(f"port = {port}")
        if not self.durable:
            lines.append("fsync = off")  # the page cache survives a crash of the server
        self._write(self.data / _CONF, "\n".join(lines) + "\n")

    def _write(self, path: Path, text: str) -> None:
        atomic_write(path, text, mode=0o600)
        owner = self._owner()
        if owner is not None:
            os.chown(path, *owner)

    def _owner(self) -> tuple[int, int] | None:
        """(uid, gid) of the ``postgres`` user when we are root (the server's user), else None."""
        if os.geteuid() != 0:
            return None
        try:
            entry = pwd.getpwnam(PG_USER)
        except KeyError as exc:
            raise ConfigError(
                f"there is no `{PG_USER}` user to run PostgreSQL: {INSTALL_HINT}"
            ) from exc
        return entry.pw_uid, entry.pw_gid

    def _as_owner(self, argv: list[str]) -> list[str]:
        return ["runuser", "-u", PG_USER, "--", *argv] if os.geteuid() == 0 else argv

    def _check_reachable(self) -> None:
        if os.geteuid() != 0:
            return
        probe = self._as_owner(["test", "-w", str(self.root), "-a", "-x", str(self.root)])
        try:
            reachable = subprocess.run(probe, capture_output=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeFailure(f"could not check that `{PG_USER}` can reach {self.root}") from exc
        if reachable.returncode != 0:
            raise ConfigError(
                f"PostgreSQL runs as the `{PG_USER}` user, which cannot reach {self.root}: a "
                "folder above it is closed to other users (as /root is). Put the fleet's data "
                "directory where every user may pass, e.g. --data-dir /var/lib/embervm-fleet"
            )

    # -- running -----------------------------------------------------------------------------

    def _pg_ctl(self, *args: str, what: str) -> None:
        argv = [str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-s", "-w",
                "-t", str(int(self.timeout)), *args]  # fmt: skip
        try:
            run(self._as_owner(argv), what=what, timeout=self.timeout + 30, cwd=self.root)
        except RuntimeFailure as exc:
            raise RuntimeFailure(f"{exc}; postgres.log: {tail_file(self.log_file)}") from exc

    def start(self, port: int) -> None:
        """Start the cluster on 127.0.0.1:``port`` (after ``init()``, which it runs) and return
        once it accepts connections. A no-op when it already runs on that port."""
        self.init()
        if self.is_running():
            if self.port == port:
                return
            raise ConfigError(
                f"PostgreSQL in {self.root} already runs on port {self.port}, not {port}"
            )
        self._write_settings(port)
        # -l: the server's output goes to the log, never to a pipe this call waits on.
        self._pg_ctl("-l", str(self.log_file), "start", what=f"starting PostgreSQL on port {port}")
        if not self.is_running():
            raise RuntimeFailure(f"PostgreSQL exited after start; {tail_file(self.log_file)}")

    def restart(self, mode: ShutdownMode = "immediate") -> None:
        """``pg_ctl restart -m mode``: stop (immediate: as a crash, recovered at start) and start
        again on the same port; returns once it accepts connections."""
        if mode not in ("smart", "fast", "immediate"):
            raise ConfigError(f"unknown shutdown mode {mode!r}: smart, fast or immediate")
        if not self.is_running():
            raise RuntimeFailure(f"PostgreSQL in {self.root} is not running: start it first")
        self._pg_ctl("-l", str(self.log_file), "-m", mode, "restart",
                     what=f"restarting PostgreSQL (-m {mode})")  # fmt: skip

    def stop(self) -> None:
        """Stop the cluster (fast: clients are disconnected; immediate if that does not finish)
        and wait until the postmaster is gone. A no-op when it is not running."""
        identity = self.process()
        if identity is None:
            return
        try:
            self._pg_ctl("-m", "fast", "stop", what="stopping PostgreSQL")
        except RuntimeFailure:
            if self.is_running():
                self._pg_ctl("-m", "immediate", "stop", what="stopping PostgreSQL (immediate)")
        with pidfd_of(identity) as fd:
            if fd is not None and not wait_pidfd(fd, self.timeout):
                raise RuntimeFailure(f"PostgreSQL (pid {identity.pid}) did not exit")
