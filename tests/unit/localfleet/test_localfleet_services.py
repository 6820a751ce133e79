"""LocalPostgres and LocalSeaweedFS without running them: how they find their binaries (and
what they say when one is missing), how they recognise their own process, what weed is told."""

from __future__ import annotations

import importlib.metadata
import json
import os
import sysconfig
from pathlib import Path

import pytest

from embervm.errors import ConfigError, RuntimeFailure
from embervm.localfleet import (
    LocalPostgres,
    LocalSeaweedFS,
    ProcessIdentity,
    find_pg_bin,
    free_port,
)
from embervm.localfleet import postgres as postgres_module
from embervm.localfleet import seaweedfs as seaweedfs_module

pytestmark = pytest.mark.timeout(30)


def test_missing_postgresql_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres_module, "PG_ROOT", tmp_path / "nothing")
    with pytest.raises(ConfigError, match=r"make setup.*apt install postgresql-15"):
        find_pg_bin()
    with pytest.raises(ConfigError, match="apt install postgresql-15"):
        LocalPostgres(tmp_path / "pg").init()


def test_postgresql_15_is_preferred_to_a_newer_major(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for major in ("13", "15", "16"):
        bin_dir = tmp_path / major / "bin"
        bin_dir.mkdir(parents=True)
        for name in ("initdb", "pg_ctl", "postgres"):
            (bin_dir / name).write_text("#!/bin/sh\n")
            (bin_dir / name).chmod(0o755)
    monkeypatch.setattr(postgres_module, "PG_ROOT", tmp_path)
    assert find_pg_bin() == tmp_path / "15" / "bin"
    (tmp_path / "15" / "bin" / "initdb").unlink()
    assert find_pg_bin() == tmp_path / "16" / "bin"


def test_missing_weed_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_dist(name: str) -> importlib.metadata.Distribution:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_dist)
    monkeypatch.setattr(sysconfig, "get_path", lambda _name: "/nonexistent")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError, match=r"pip install 'embervm\[fleet\]'"):
        seaweedfs_module.find_weed()


def test_a_stale_pid_file_never_names_someone_else(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "pg")
    assert pg.process() is None  # never set up
    assert pg.pid is None
    pg.data.mkdir(parents=True)
    (pg.data / "postmaster.pid").write_text(f"{os.getpid()}\n{pg.data}\n")  # pid of pytest
    assert pg.process() is None
    assert not pg.is_running()
    with pytest.raises(RuntimeFailure, match="never been started"):
        _ = pg.url

    sw = LocalSeaweedFS(tmp_path / "sw")
    assert sw.process() is None
    me = ProcessIdentity.of(os.getpid())
    assert me is not None
    sw.root.mkdir()
    record = {"pid": me.pid, "cmdline": ["weed", "mini"], "start_ticks": me.start_ticks,
              "s3_port": 1, "ports": {}}  # fmt: skip
    (sw.root / "run.json").write_text(json.dumps(record))
    assert sw.process() is None  # the pid is pytest's now, not weed's
    sw.stop()  # a no-op: nothing of ours runs, and pytest lives on
    sw.kill()
    assert not (sw.root / "run.json").exists()


def test_the_postmaster_is_recognised_by_its_data_directory(tmp_path: Path) -> None:
    pg = LocalPostgres(tmp_path / "pg")
    ours = ("/usr/lib/postgresql/15/bin/postgres", "-D", str(pg.data))
    assert pg._is_our_postmaster(ours)
    assert not pg._is_our_postmaster(("/usr/lib/postgresql/15/bin/postgres", "-D", "/other"))
    assert not pg._is_our_postmaster(("/usr/bin/python3", "-D", str(pg.data)))
    assert not pg._is_our_postmaster(("/usr/lib/postgresql/15/bin/postgres", "-D"))
    assert not pg._is_our_postmaster(())


def test_weed_binds_loopback_only_and_phones_nobody(tmp_path: Path) -> None:
    sw = LocalSeaweedFS(tmp_path / "sw", volume_size_mb=32, max_volumes=7)
    ports = dict(zip(seaweedfs_module._PORTS, range(20001, 20010), strict=True))
    argv = sw._argv(Path("/bin/weed"), 8333, ports)
    assert argv[:3] == ["/bin/weed", "-logtostderr=true", "mini"]  # no log files in /tmp
    flags = dict(arg[1:].split("=", 1) for arg in argv[3:])
    assert flags["ip"] == flags["ip.bind"] == "127.0.0.1"
    assert flags["master.telemetry"] == "false"
    assert flags["webdav"] == flags["admin.ui"] == flags["s3.iam"] == "false"
    assert flags["s3.port.iceberg"] == flags["s3.port.lance"] == "0"
    assert (flags["master.volumeSizeLimitMB"], flags["volume.max"]) == ("32", "7")
    assert flags["s3.port"] == "8333"
    listeners = [int(v) for k, v in flags.items() if k.endswith((".port", ".port.grpc"))]
    assert sorted(listeners) == [8333, *range(20001, 20010)]  # every one picked, none default
    assert flags["s3.config"] == str(sw.root / "s3.json")
    assert flags["filer.localSocket"] == str(sw.root / "filer.sock")


def test_the_keys_are_made_once_private_and_kept(tmp_path: Path) -> None:
    sw = LocalSeaweedFS(tmp_path / "sw")
    keys = sw.credentials
    assert keys.access_key_id.startswith("EMB")
    assert len(keys.access_key_id) == 20
    assert len(keys.secret_access_key) == 40
    assert (sw.root / "credentials.json").stat().st_mode & 0o777 == 0o600
    assert LocalSeaweedFS(tmp_path / "sw").credentials == keys
    assert keys.secret_access_key not in repr(keys)
    (sw.root / "credentials.json").write_text("{}")
    with pytest.raises(RuntimeFailure, match="damaged"):
        _ = sw.credentials


def fake_weed(tmp_path: Path, body: str) -> Path:
    script = tmp_path / "weed"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(0o755)
    return script


def test_a_weed_that_fails_at_start_says_why_and_leaves_nothing(tmp_path: Path) -> None:
    weed = fake_weed(tmp_path, 'echo "F1208 flag provided but not defined: -s3.iam" >&2; exit 3')
    sw = LocalSeaweedFS(tmp_path / "sw", weed=weed)
    with pytest.raises(RuntimeFailure, match=r"weed exited \(3\) while starting.*-s3.iam"):
        sw.start(free_port())
    assert sw.process() is None
    assert not (sw.root / "run.json").exists()


def test_ports_taken_before_weed_binds_them_are_picked_again(tmp_path: Path) -> None:
    weed = fake_weed(
        tmp_path, 'echo "listen tcp 127.0.0.1:9333: bind: address already in use"; exit 1'
    )
    sw = LocalSeaweedFS(tmp_path / "sw", weed=weed)
    with pytest.raises(RuntimeFailure, match="could not bind its ports"):
        sw.start(free_port())
    assert sw.log_file.read_text().count("== embervm: starting weed") == 3


def test_a_weed_that_never_answers_s3_is_killed_after_the_deadline(tmp_path: Path) -> None:
    weed = fake_weed(tmp_path, "sleep 60")  # runs, in its own group with a child, answers nothing
    sw = LocalSeaweedFS(tmp_path / "sw", weed=weed, ready_timeout=1.0)
    with pytest.raises(RuntimeFailure, match=r"did not answer S3 on port \d+ within 1 s"):
        sw.start(free_port())
    assert sw.process() is None
    assert sw._popen is None  # reaped
    assert not (sw.root / "run.json").exists()
