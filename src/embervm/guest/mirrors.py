"""Where the ``debian12`` base disk's packages come from: the Debian mirror the host uses.

The host is set up to reach some Debian mirror (a LAN mirror, an apt cache, a cloud's own
mirror, or deb.debian.org); building the guest's root filesystem from the same one works wherever
the host's own apt works. ``resolve_mirrors`` reads the host's apt sources
(``etc/apt/sources.list``, ``sources.list.d/*.list`` in the one-line format and
``sources.list.d/*.sources`` in deb822), takes the first ``deb`` entry over http(s) for a Debian
archive suite (``bookworm`` first, then any other Debian suite: a mirror carries them all) and
the first for a Debian ``*-security`` suite, and falls back to deb.debian.org for whichever is
missing (a non-Debian host, a host with only ``cdrom:`` or ``file:`` entries). An override
(``embervm server --debian-mirror`` / ``--debian-security-mirror``) wins over both.

Reading the host's files never raises: an unreadable, oversized or garbled file is skipped with
a log line. A bad override is a ``ConfigError``: the operator asked for it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from embervm.errors import ConfigError

DEFAULT_ARCHIVE = "http://deb.debian.org/debian"
DEFAULT_SECURITY = "http://deb.debian.org/debian-security"

#: Debian code names and aliases a mirror's suite may be (``trixie-updates``, ``stable``...).
DEBIAN_SUITES = frozenset(
    {
        *("jessie", "stretch", "buster", "bullseye", "bookworm", "trixie", "forky", "duke"),
        *("sid", "experimental", "unstable", "testing", "stable", "oldstable", "oldoldstable"),
    }
)
_ARCHIVE_SUFFIXES = ("", "-updates", "-backports", "-backports-sloppy", "-proposed-updates")
_PREFERRED = "bookworm"

MAX_FILE_BYTES = 256 * 1024
MAX_FILES = 256
MAX_URL_CHARS = 2048

_OPTIONS_RE = re.compile(r"^\[[^\]]*\]\s*")
_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DebianMirrors:
    """The Debian archive and security archive a base disk is built from.

    ``origin`` says where each came from (``override``, a host file, ``default``), for logs.
    """

    archive: str = DEFAULT_ARCHIVE
    security: str = DEFAULT_SECURITY
    origin: str = "default"

    def sources(self, suite: str) -> tuple[str, ...]:
        """The ``deb`` lines of ``suite``, its updates and its security updates (``main``)."""
        return (
            f"deb {self.archive} {suite} main",
            f"deb {self.archive} {suite}-updates main",
            f"deb {self.security} {suite}-security main",
        )


#: The canonical spelling of the archive: what the base disk's cache key names (see _rootfs).
CANONICAL = DebianMirrors()


def check_mirror_url(url: str, *, what: str = "Debian mirror") -> str:
    """``url`` without trailing slashes if it can stand in a ``deb`` line, else ConfigError."""
    if not _usable(url):
        raise ConfigError(f"{what} {url[:200]!r} is not an http:// or https:// URL")
    return url.rstrip("/")


def resolve_mirrors(
    archive: str | None = None, security: str | None = None, *, root: Path = Path("/")
) -> DebianMirrors:
    """The mirrors to build from: each override, else the host's apt sources under ``root``,
    else deb.debian.org."""
    found = {} if archive and security else host_mirrors(root)
    picked: dict[str, tuple[str, str]] = {}
    for kind, override, default in (
        ("archive", archive, DEFAULT_ARCHIVE),
        ("security", security, DEFAULT_SECURITY),
    ):
        if override:
            picked[kind] = (check_mirror_url(override, what=f"Debian {kind} mirror"), "override")
        else:
            picked[kind] = found.get(kind, (default, "default"))
    (a_url, a_from), (s_url, s_from) = picked["archive"], picked["security"]
    origin = a_from if a_from == s_from else f"archive: {a_from}; security: {s_from}"
    return DebianMirrors(archive=a_url, security=s_url, origin=origin)


def host_mirrors(root: Path = Path("/")) -> dict[str, tuple[str, str]]:
    """``{"archive"|"security": (url, file)}`` for what the host's apt sources name."""
    best: dict[str, tuple[int, str, str]] = {}
    for path in _source_files(root / "etc/apt"):
        text = _read_bounded(path)
        if text is None:
            continue
        try:
            entries = _deb822(text) if path.suffix == ".sources" else _one_line(text)
        except Exception as exc:  # garbage must never stop a server start
            _log.warning("ignoring apt sources %s: %s", path, exc)
            continue
        for uri, suite in entries:
            kind, preferred = _classify(suite)
            if kind is None or not _usable(uri):
                continue
            rank = 0 if preferred else 1
            if kind not in best or rank < best[kind][0]:
                best[kind] = (rank, uri.rstrip("/"), str(path))
    return {kind: (url, src) for kind, (_, url, src) in best.items()}


def _classify(suite: str) -> tuple[str | None, bool]:
    """(``archive``/``security``/None, whether the suite is bookworm's)."""
    base, sep, tail = suite.partition("/")  # old security suites: ``buster/updates``
    if sep:
        if tail == "updates" and base in DEBIAN_SUITES:
            return "security", base == _PREFERRED
        return None, False
    if suite.endswith("-security") and suite[: -len("-security")] in DEBIAN_SUITES:
        return "security", suite == f"{_PREFERRED}-security"
    for suffix in _ARCHIVE_SUFFIXES:
        name = suite[: len(suite) - len(suffix)] if suffix else suite
        if suite.endswith(suffix) and name in DEBIAN_SUITES:
            return "archive", name == _PREFERRED
    return None, False


def _usable(uri: str) -> bool:
    if not uri or len(uri) > MAX_URL_CHARS or not uri.isprintable():
        return False
    if any(c.isspace() or c in "[]#\"'" for c in uri):
        return False
    try:
        parts = urlsplit(uri)
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.netloc)


def _source_files(apt: Path) -> list[Path]:
    files = [apt / "sources.list"]
    try:
        listed = sorted(
            p for p in (apt / "sources.list.d").iterdir() if p.suffix in (".list", ".sources")
        )
    except OSError:
        listed = []
    if len(listed) > MAX_FILES:
        _log.warning("only the first %d of %d apt source files are read", MAX_FILES, len(listed))
    return files + listed[:MAX_FILES]


def _read_bounded(path: Path) -> str | None:
    try:
        if not path.is_file():
            return None
        with path.open("rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        _log.warning("cannot read apt sources %s: %s", path, exc)
        return None
    if len(data) > MAX_FILE_BYTES:
        _log.warning("ignoring apt sources %s: larger than %d bytes", path, MAX_FILE_BYTES)
        return None
    return data.decode("utf-8", errors="replace")


def _one_line(text: str) -> list[tuple[str, str]]:
    """``deb [options] uri suite [component...]`` lines; ``deb-src`` and comments skipped."""
    entries = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        kind, _, rest = line.partition(" ")
        if kind != "deb":
            continue
        words = _OPTIONS_RE.sub("", rest.strip()).split()
        if len(words) >= 2 and not words[0].startswith("["):
            entries.append((words[0], words[1]))
    return entries


def _deb822(text: str) -> list[tuple[str, str]]:
    """Stanzas of ``Types``/``URIs``/``Suites``; ``Enabled: no`` and non-``deb`` types skipped."""
    entries: list[tuple[str, str]] = []
    for stanza in _stanzas(text):
        if stanza.get("enabled", "yes").strip().lower() == "no":
            continue
        if "deb" not in stanza.get("types", "").split():
            continue
        for uri in stanza.get("uris", "").split():
            entries += [(uri, suite) for suite in stanza.get("suites", "").split()]
    return entries


def _stanzas(text: str) -> list[dict[str, str]]:
    stanzas: list[dict[str, str]] = []
    fields: dict[str, str] = {}
    last: str | None = None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                stanzas.append(fields)
            fields, last = {}, None
        elif line[0] in " \t":
            if last is not None:
                fields[last] += " " + line.strip()
        elif ":" in line:
            name, _, value = line.partition(":")
            last = name.strip().lower()
            fields[last] = value.strip()
    if fields:
        stanzas.append(fields)
    return stanzas
