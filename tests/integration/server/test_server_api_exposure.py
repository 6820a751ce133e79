"""A real ``embervm server --listen 0.0.0.0``: the endpoints go on the network, the control API
stays on loopback (A7), and after the start nothing under the data dir is open to other users
(B1); the local CA it makes is name-constrained (A19)."""

from __future__ import annotations

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from tests.framework.integration_cache import test_cache_dir
from tests.framework.server_harness import LiveServer, free_port

from embervm.guest.artifacts import GuestArtifacts

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]


def _listening(port: int) -> set[str]:
    """The local addresses (hex, as /proc/net/tcp spells them) a TCP port listens on."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if fields[3] == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


# dnsmasq writes its pid file with its own umask (022); the 0700 data dir still hides it.
NOT_OURS = frozenset({"network/dnsmasq.pid"})


def _open_to_others(root: Path) -> list[str]:
    return [
        f"{path.relative_to(root)} {stat.S_IMODE(path.lstat().st_mode):o}"
        for path in [root, *root.rglob("*")]
        if not path.is_symlink()
        and stat.S_IMODE(path.lstat().st_mode) & 0o077
        and str(path.relative_to(root)) not in NOT_OURS
    ]


def _readable_by_nobody(root: Path) -> list[str]:
    """What user ``nobody`` can actually open under ``root`` (files read, folders listed)."""
    paths = [str(p) for p in [root, *root.rglob("*")] if not p.is_symlink()]
    script = 'for f in "$@"; do if [ -d "$f" ]; then ls "$f"; else cat "$f"; fi ' \
             '>/dev/null 2>&1 && echo "$f"; done; true'  # fmt: skip
    done = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "/bin/sh", "-c",
         script, "sh", *paths],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return done.stdout.split()


def test_listening_everywhere_keeps_the_api_on_loopback_and_the_data_dir_private(
    guest_artifacts: GuestArtifacts, tmp_path: Path
) -> None:
    assert guest_artifacts.kernel.exists()
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "artifacts").symlink_to(test_cache_dir() / "artifacts")  # built once
    (data_dir / "left-by-an-old-server.log").write_text("secret")
    os.chmod(data_dir / "left-by-an-old-server.log", 0o644)
    os.chmod(data_dir, 0o755)  # a data dir like /var/lib/embervm before B1
    server = LiveServer(data_dir, free_port(), free_port(), free_port(),
                        extra_args=["--listen", "0.0.0.0"])  # fmt: skip
    server.start()
    try:
        assert server.ready_line == (
            f"embervm ready api=http://127.0.0.1:{server.api_port} "
            f"proxy=https://0.0.0.0:{server.proxy_port}"
        )
        assert _listening(server.api_port) == {"0100007F"}  # 127.0.0.1 only
        assert (
            f"embervm: control API on http://127.0.0.1:{server.api_port} only; --api-listen "
            "puts it on the network (HTTPS)"
        ) in server.output  # scripts that relied on --listen for the API learn why
        assert _listening(server.proxy_port) == {"00000000"}  # the endpoints: everywhere
        assert server.client().list_microvms()["ResponseMetadata"]["HTTPStatusCode"] == 200
        assert _open_to_others(data_dir) == []
        assert _readable_by_nobody(data_dir) == []
        with tempfile.TemporaryDirectory() as control:  # the check can see a yes
            os.chmod(control, 0o755)
            (Path(control) / "open").write_text("x")
            os.chmod(Path(control) / "open", 0o644)
            assert _readable_by_nobody(Path(control)) == [control, f"{control}/open"]
        ca = x509.load_pem_x509_certificate((data_dir / "tls" / "ca.pem").read_bytes())
        assert ca.extensions.get_extension_for_class(x509.NameConstraints).critical
    finally:
        server.stop()
