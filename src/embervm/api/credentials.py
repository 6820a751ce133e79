"""API key pairs in ``DATA_DIR/credentials``, in the AWS shared-credentials INI format.

The file is what users point the AWS CLI and boto3 at (``AWS_SHARED_CREDENTIALS_FILE``), so
it holds nothing but profiles with ``aws_access_key_id`` and ``aws_secret_access_key``. The
first start writes one random pair as both ``default`` and ``embervm``; ``create`` adds a pair
under a new profile, ``revoke`` removes every profile holding a key. Writes are atomic (temp
file, fsync, rename; mode 0600) under an advisory lock, and the server re-reads the file when it
changes, so keys created or revoked with ``embervm credentials`` apply without a restart.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import io
import os
import re
import secrets
import string
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from embervm.errors import ConfigError
from embervm.fileio import atomic_write

DEFAULT_PROFILES = ("default", "embervm")
_PROFILE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_KEY_ALPHABET = string.ascii_uppercase + string.digits
_SECRET_ALPHABET = string.ascii_letters + string.digits + "+/"


@dataclass(frozen=True)
class Credential:
    """One key pair and the profiles that hold it."""

    access_key_id: str
    secret_access_key: str
    profiles: tuple[str, ...]


def new_access_key_id() -> str:
    """``AKIA`` + 16 random upper-case letters and digits, the shape of an AWS key id."""
    return "AKIA" + "".join(secrets.choice(_KEY_ALPHABET) for _ in range(16))


def new_secret_access_key() -> str:
    """40 random characters (~238 bits), the shape of an AWS secret key."""
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))


class CredentialStore:
    """The credentials file: lookup for SigV4 (``secret_for``) and create/list/revoke."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._secrets: dict[str, str] = {}

    # -- reading -----------------------------------------------------------------------

    def ensure(self) -> Credential:
        """On first start (neither ``default`` nor ``embervm`` exists) write a random pair as
        both; return the pair the ``embervm`` (else ``default``) profile holds."""
        with self._locked():
            parser = self._read()
            if not any(parser.has_section(profile) for profile in DEFAULT_PROFILES):
                key, secret = new_access_key_id(), new_secret_access_key()
                for profile in DEFAULT_PROFILES:
                    parser[profile] = {
                        "aws_access_key_id": key,
                        "aws_secret_access_key": secret,
                    }
                self._write(parser)
        for profile in ("embervm", "default"):
            for credential in self.list():
                if profile in credential.profiles:
                    return credential
        raise ConfigError(f"{self.path} has no 'embervm' or 'default' profile")

    def list(self) -> list[Credential]:
        """Every key pair in the file, with the profiles holding it, in file order."""
        parser = self._read()
        found: dict[str, Credential] = {}
        for profile in parser.sections():
            section = parser[profile]
            key = section.get("aws_access_key_id", "").strip()
            secret = section.get("aws_secret_access_key", "").strip()
            if not key or not secret:
                continue
            known = found.get(key)
            if known is None:
                found[key] = Credential(key, secret, (profile,))
            elif known.secret_access_key == secret:
                found[key] = Credential(key, secret, (*known.profiles, profile))
        return list(found.values())

    def secret_for(self, access_key_id: str) -> str | None:
        """The secret of ``access_key_id`` or None; re-reads the file when it changed."""
        with self._lock:
            stamp = self._file_stamp()
            if stamp != self._stamp:
                self._secrets = {c.access_key_id: c.secret_access_key for c in self.list()}
                self._stamp = stamp
            return self._secrets.get(access_key_id)

    # -- writing -----------------------------------------------------------------------

    def create(self, profile: str | None = None) -> Credential:
        """A new random pair under ``profile`` (default ``key-<last 6 of the id>``)."""
        key, secret = new_access_key_id(), new_secret_access_key()
        name = profile or f"key-{key[-6:].lower()}"
        if not _PROFILE.match(name):
            raise ConfigError(f"profile name {name!r} must match {_PROFILE.pattern}")
        with self._locked():
            parser = self._read()
            if parser.has_section(name):
                raise ConfigError(f"profile {name!r} already exists in {self.path}")
            parser[name] = {"aws_access_key_id": key, "aws_secret_access_key": secret}
            self._write(parser)
        return Credential(key, secret, (name,))

    def revoke(self, access_key_id: str) -> bool:
        """Remove every profile holding ``access_key_id``; False if no profile held it."""
        with self._locked():
            parser = self._read()
            doomed = [
                profile
                for profile in parser.sections()
                if parser[profile].get("aws_access_key_id", "").strip() == access_key_id
            ]
            for profile in doomed:
                parser.remove_section(profile)
            if doomed:
                self._write(parser)
        return bool(doomed)

    # -- file handling -----------------------------------------------------------------

    def _file_stamp(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _read(self) -> configparser.ConfigParser:
        parser = configparser.ConfigParser(interpolation=None)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return parser
        except OSError as exc:
            raise ConfigError(f"cannot read {self.path}: {exc}") from exc
        try:
            parser.read_string(text, source=str(self.path))
        except configparser.Error as exc:
            raise ConfigError(f"{self.path} is not an AWS credentials file: {exc}") from exc
        return parser

    def _write(self, parser: configparser.ConfigParser) -> None:
        text = io.StringIO()
        parser.write(text)
        try:
            atomic_write(self.path, text.getvalue(), mode=0o600)
        except OSError as exc:
            raise ConfigError(f"cannot write {self.path}: {exc}") from exc

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive advisory lock next to the file, across processes (server and CLI)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(
                self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600
            )
        except OSError as exc:
            raise ConfigError(f"cannot lock {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)
