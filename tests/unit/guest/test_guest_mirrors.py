"""The Debian mirrors of the base disk: read from fake apt config dirs, overrides, cache key."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from embervm.config import Settings
from embervm.errors import ConfigError
from embervm.guest import mirrors
from embervm.guest._cache import hash_inputs
from embervm.guest._rootfs import RootfsRecipe
from embervm.guest.mirrors import (
    DEFAULT_ARCHIVE,
    DEFAULT_SECURITY,
    DebianMirrors,
    check_mirror_url,
    resolve_mirrors,
)

MIRROR = "http://mirror.example/debian"
SECURITY = "https://mirror.example/debian-security"


def apt_root(tmp_path: Path, sources_list: str = "", **parts: str) -> Path:
    """A fake ``/`` whose ``etc/apt`` holds ``sources.list`` and ``sources.list.d/<name>``."""
    apt = tmp_path / "etc/apt"
    (apt / "sources.list.d").mkdir(parents=True)
    if sources_list:
        (apt / "sources.list").write_text(sources_list)
    for name, text in parts.items():
        (apt / "sources.list.d" / name.replace("_", ".")).write_text(text)
    return tmp_path


def test_one_line_format(tmp_path: Path) -> None:
    root = apt_root(
        tmp_path,
        f"""# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb cdrom:[Debian GNU/Linux 12]/ bookworm main
deb file:/srv/local bookworm main
deb {MIRROR}/ bookworm main contrib  # the trailing slash is dropped
deb {MIRROR} bookworm-updates main
deb {SECURITY} bookworm-security main
""",
    )
    got = resolve_mirrors(root=root)
    assert (got.archive, got.security) == (MIRROR, SECURITY)
    assert got.origin == str(root / "etc/apt/sources.list")
    assert got.sources("bookworm") == (
        f"deb {MIRROR} bookworm main",
        f"deb {MIRROR} bookworm-updates main",
        f"deb {SECURITY} bookworm-security main",
    )


def test_options_in_brackets_are_skipped(tmp_path: Path) -> None:
    root = apt_root(
        tmp_path,
        f"deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {MIRROR} "
        "bookworm main\n"
        f"deb [ trusted=yes ] {SECURITY} bookworm-security main\n",
    )
    got = resolve_mirrors(root=root)
    assert (got.archive, got.security) == (MIRROR, SECURITY)


def test_deb822_format(tmp_path: Path) -> None:
    root = apt_root(
        tmp_path,
        debian_sources=f"""Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb
# a comment inside a stanza
URIs: {MIRROR}
Suites: bookworm
 bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb deb-src
URIs: {SECURITY}
Suites: bookworm-security
Components: main
""",
    )
    got = resolve_mirrors(root=root)
    assert (got.archive, got.security) == (MIRROR, SECURITY)
    assert got.origin == str(root / "etc/apt/sources.list.d/debian.sources")


def test_disabled_stanzas_and_other_distributions_are_ignored(tmp_path: Path) -> None:
    root = apt_root(
        tmp_path,
        "deb http://archive.ubuntu.com/ubuntu noble main\n"
        "deb https://packages.cloud.google.com/apt cloud-sdk-bookworm main\n",
        a_sources="Types: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: bookworm\n",
        b_list="deb http://other.example/debian bookworm main\n",
        # apt reads only *.list and *.sources
        c_list_disabled=f"deb {MIRROR} bookworm main\n",
    )
    got = resolve_mirrors(root=root)
    assert got.archive == "http://other.example/debian"
    assert got.security == DEFAULT_SECURITY  # the host names no security archive
    listed = root / "etc/apt/sources.list.d/b.list"
    assert got.origin == f"archive: {listed}; security: default"


def test_bookworm_is_preferred_over_other_debian_suites(tmp_path: Path) -> None:
    root = apt_root(
        tmp_path,
        "deb http://trixie.example/debian trixie main\n"
        "deb http://trixie.example/debian-security trixie-security main\n"
        f"deb {MIRROR} bookworm-updates main\n",
    )
    got = resolve_mirrors(root=root)
    assert got.archive == MIRROR
    assert got.security == "http://trixie.example/debian-security"  # the only one there is


def test_no_apt_config_falls_back_to_deb_debian_org(tmp_path: Path) -> None:
    assert resolve_mirrors(root=tmp_path) == DebianMirrors()
    assert DebianMirrors().archive == DEFAULT_ARCHIVE == "http://deb.debian.org/debian"


def test_garbage_is_skipped_with_a_log_line(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mirrors, "MAX_FILE_BYTES", 64)
    root = apt_root(
        tmp_path,
        "deb\ndeb [unclosed http://x.example/debian bookworm\n\x00\xff deb :: ::\n",
        big_list="deb http://big.example/debian bookworm main\n" * 4,
        bad_sources="Types deb\n  continuation first\nURIs: http://[::1/debian\nSuites: sid\n",
    )
    (root / "etc/apt/sources.list.d/dir.list").mkdir()
    (root / "etc/apt/sources.list.d/binary.sources").write_bytes(b"\xff\xfe\x00garbage")
    with caplog.at_level(logging.WARNING, logger="embervm.guest.mirrors"):
        assert resolve_mirrors(root=root) == DebianMirrors()
    assert "larger than 64 bytes" in caplog.text


def test_overrides_win_and_are_checked(tmp_path: Path) -> None:
    root = apt_root(tmp_path, "deb http://host.example/debian bookworm main\n")
    got = resolve_mirrors(f"{MIRROR}/", None, root=root)
    assert (got.archive, got.security) == (MIRROR, DEFAULT_SECURITY)
    assert got.origin == "archive: override; security: default"
    got = resolve_mirrors(None, SECURITY, root=root)
    assert (got.archive, got.security) == ("http://host.example/debian", SECURITY)
    for bad in ("ftp://x/debian", "file:/srv", "http://x/ bookworm main", "mirror", ""):
        with pytest.raises(ConfigError):
            check_mirror_url(bad)
    with pytest.raises(ConfigError, match="security"):
        resolve_mirrors(None, "http:// x", root=root)


def test_the_mirror_is_not_part_of_the_disk_key() -> None:
    """A host on deb.debian.org keeps the key (and the cached disk) it had before mirrors were
    configurable; another mirror shares it (same suites, same packages)."""
    recipe = RootfsRecipe.debian12()
    assert recipe.sources() == (
        "deb http://deb.debian.org/debian bookworm main",
        "deb http://deb.debian.org/debian bookworm-updates main",
        "deb http://deb.debian.org/debian-security bookworm-security main",
    )
    parts = recipe.hash_parts()
    assert parts[: 2 + len(recipe.packages) + 3] == [
        "rootfs-v1",
        "bookworm",
        *recipe.packages,
        *recipe.sources(),
    ]
    assert recipe.sources(DebianMirrors(MIRROR, SECURITY))[0] == f"deb {MIRROR} bookworm main"
    assert hash_inputs(parts) == hash_inputs(RootfsRecipe.debian12().hash_parts())


def test_server_flags_reach_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    from embervm.cli import server as server_cli
    from embervm.server import app as server_app

    seen: list[Settings] = []

    async def fake_run(settings: Settings) -> int:
        seen.append(settings)
        return 0

    monkeypatch.setattr(server_app, "run_server", fake_run)
    cli = typer.Typer()
    server_cli.register(cli)
    cli.command("noop")(lambda: None)  # two commands: `server` is a subcommand
    runner = CliRunner()
    ok = runner.invoke(
        cli,
        ["server", "--debian-mirror", f"{MIRROR}/"],
        env={"EMBERVM_DEBIAN_SECURITY_MIRROR": SECURITY},
    )
    assert ok.exit_code == 0, ok.output
    assert (seen[0].debian_mirror, seen[0].debian_security_mirror) == (MIRROR, SECURITY)
    bad = runner.invoke(cli, ["server", "--debian-mirror", "ftp://mirror.example/debian"])
    assert bad.exit_code == 2
    assert "--debian-mirror" in bad.output
