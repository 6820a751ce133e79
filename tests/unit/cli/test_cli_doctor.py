"""``embervm doctor``: each check's verdict from faked probes, and the command's exit code and
output (a failed fatal check fails the command; a warning does not)."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import shutil
import socket
import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from embervm.cli import doctor
from embervm.cli._context import CliContext
from embervm.cli.doctor import Check
from embervm.errors import JailError, VmmError
from embervm.vmm import jail

runner = CliRunner()


def _tool(tmp_path: Path, name: str, script: str) -> Path:
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\n{script}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


# -- binaries, root, nftables ----------------------------------------------------------------


def test_a_missing_binary_names_its_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shutil, "which", lambda _name: None)
    check = doctor.check_binary("embervm-no-such-tool", "embervm-pkg")
    assert (check.ok, check.fatal, check.detail) == (False, True, "not installed")
    assert "make setup" in check.fix
    assert "(package embervm-pkg)" in check.fix


def test_a_working_binary_shows_the_first_line_of_its_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = _tool(tmp_path, "qemu-img", 'echo "qemu-img version 9.9 ($1)"; echo second line')
    monkeypatch.setattr(shutil, "which", lambda _name: str(tool))
    check = doctor.check_binary("qemu-img", "qemu-utils", "-V")
    assert (check.ok, check.detail, check.fix) == (True, "qemu-img version 9.9 (-V)", "")


def test_a_binary_that_fails_is_reinstalled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tool = _tool(tmp_path, "nft", "echo 'broken library' >&2; exit 3")
    monkeypatch.setattr(shutil, "which", lambda _name: str(tool))
    check = doctor.check_binary("nft", "nftables")
    assert (check.ok, check.detail, check.fix) == (False, "broken library", "reinstall nftables")


def test_run_turns_a_missing_program_and_a_timeout_into_exit_127(tmp_path: Path) -> None:
    code, out = doctor._run([str(tmp_path / "absent")])
    assert code == 127
    assert "absent" in out
    sleeper = _tool(tmp_path, "sleeper", "exec sleep 30")
    code, out = doctor._run([str(sleeper)], timeout=0.2)
    assert code == 127
    assert "timed out" in out


@pytest.mark.parametrize(("uid", "ok"), [(0, True), (1000, False)])
def test_check_root(monkeypatch: pytest.MonkeyPatch, uid: int, ok: bool) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: uid)
    check = doctor.check_root()
    assert check.ok is ok
    assert check.detail == ("root" if ok else "uid 1000")
    assert bool(check.fix) is not ok


def test_nftables_that_cannot_list_tables_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(doctor, "_run", lambda argv, timeout=10: (1, "Operation not permitted"))
    check = doctor.check_nftables()
    assert (check.ok, check.detail) == (False, "Operation not permitted")
    monkeypatch.setattr(doctor, "_run", lambda argv, timeout=10: (0, ""))
    assert doctor.check_nftables().ok


# -- cgroups and the jail --------------------------------------------------------------------


def test_cgroup_v2_without_pids_and_io_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu memory\n")
    monkeypatch.setattr(jail, "detect_cgroup_driver", lambda: jail.CgroupV2(tmp_path))
    check = doctor.check_cgroups()
    assert (check.ok, check.fatal, check.detail) == (False, False, "v2, without io, pids")
    assert check.fix.startswith("enable the io and pids controllers")


def test_cgroup_v2_with_every_controller_is_ok(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "cgroup.controllers").write_text("cpu io memory pids\n")
    monkeypatch.setattr(jail, "detect_cgroup_driver", lambda: jail.CgroupV2(tmp_path))
    assert (doctor.check_cgroups().ok, doctor.check_cgroups().detail) == (True, "v2")


def test_cgroup_v1_names_the_hierarchies_it_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = jail.CgroupV1(tmp_path / "cpu", tmp_path / "memory", pids_root=tmp_path / "pids")
    monkeypatch.setattr(jail, "detect_cgroup_driver", lambda: driver)
    check = doctor.check_cgroups()
    assert (check.ok, check.detail) == (False, "v1, without blkio")


def test_no_usable_cgroups_is_fatal(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail() -> None:
        raise JailError("no cgroup mounts")

    monkeypatch.setattr(jail, "detect_cgroup_driver", fail)
    check = doctor.check_cgroups()
    assert (check.ok, check.fatal, check.detail) == (False, True, "no cgroup mounts")


def _account(name: str, uid: int) -> Any:
    return SimpleNamespace(pw_name=name, pw_uid=uid)


def test_the_jail_fails_when_an_account_owns_a_vmm_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = [_account("root", 0), _account("intruder", jail.UID_BASE + 5)]
    monkeypatch.setattr(pwd, "getpwall", lambda: accounts)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    check = doctor.check_jail()
    assert not check.ok
    assert "intruder own some" in check.detail
    assert "root" not in check.detail.split("but")[1]


def test_the_uid_just_past_the_span_is_not_the_jails(monkeypatch: pytest.MonkeyPatch) -> None:
    accounts = [_account("below", jail.UID_BASE - 1), _account("above", jail.UID_BASE + 0x10000)]
    monkeypatch.setattr(pwd, "getpwall", lambda: accounts)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert doctor.check_jail().detail == "not root: QEMU cannot be jailed"


@pytest.mark.parametrize("error", [None, "seccomp refused"])
def test_the_jail_probe_decides_for_root(
    monkeypatch: pytest.MonkeyPatch, error: str | None
) -> None:
    from embervm.vmm import qemu

    def probe() -> None:
        if error:
            raise VmmError(error)

    monkeypatch.setattr(pwd, "getpwall", lambda: [])
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(qemu, "probe_jail", probe)
    check = doctor.check_jail()
    assert check.ok is (error is None)
    if error is None:
        assert check.detail.startswith("a jailed QEMU answered")
    else:
        assert (check.detail, check.fix) == (error, "see docs/JAIL.md, What the host must provide")


# -- the accelerator -------------------------------------------------------------------------


def _fake_probe(monkeypatch: pytest.MonkeyPatch, accel: Any) -> None:
    from embervm.guest import artifacts
    from embervm.vmm import accel as accel_module

    async def boot(_root: Path) -> Any:
        return SimpleNamespace(kernel=Path("/k"))

    async def detect(_cache: Path, *, kernel: Path) -> str:
        if isinstance(accel, BaseException):
            raise accel
        if accel == "hang":
            await asyncio.sleep(3600)
        return str(accel)

    monkeypatch.setattr(artifacts, "ensure_boot_artifacts", boot)
    monkeypatch.setattr(accel_module, "detect_accelerator", detect)


@pytest.mark.usefixtures("ctx")
def test_kvm_is_ok(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_probe(monkeypatch, "kvm")
    assert doctor.check_kvm() == Check("accelerator", True, "KVM")


@pytest.mark.usefixtures("ctx")
def test_tcg_works_but_is_a_warning_with_a_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_probe(monkeypatch, "tcg")
    check = doctor.check_kvm()
    assert (check.ok, check.fatal) == (True, False)
    assert check.detail.startswith("TCG")
    assert "/dev/kvm" in check.fix


@pytest.mark.usefixtures("ctx")
def test_a_probe_that_fails_or_hangs_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_probe(monkeypatch, OSError("no network"))
    check = doctor.check_kvm()
    assert (check.ok, check.fatal, check.detail) == (False, False, "probe failed: no network")
    _fake_probe(monkeypatch, "hang")
    monkeypatch.setattr(doctor, "PROBE_SECONDS", 0.05)
    check = doctor.check_kvm()
    assert (check.ok, check.fatal, check.detail) == (False, False, "probe did not finish in 0.05 s")


# -- disk and ports --------------------------------------------------------------------------


@pytest.mark.parametrize(("free_gib", "ok"), [(5.0, True), (4.9, False)])
def test_disk_space_is_measured_at_the_nearest_existing_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free_gib: float, ok: bool
) -> None:
    asked: list[Path] = []

    def usage(path: Path) -> Any:
        asked.append(path)
        return SimpleNamespace(free=int(free_gib * 1024**3))

    monkeypatch.setattr(shutil, "disk_usage", usage)
    check = doctor.check_disk(tmp_path / "not" / "yet")
    assert asked == [tmp_path]
    assert check.ok is ok
    assert check.detail == f"{free_gib:.1f} GiB free at {tmp_path}"


def test_a_port_in_use_is_a_warning_and_a_free_one_is_ok() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        check = doctor.check_port(port, "control API")
        assert (check.name, check.ok, check.fatal) == (f"port {port}", False, False)
        assert check.detail == "in use (control API)"
    assert doctor.check_port(port, "control API").ok


# -- the command -----------------------------------------------------------------------------


def _invoke(monkeypatch: pytest.MonkeyPatch, checks: list[Check], *args: str) -> Any:
    monkeypatch.setattr(doctor, "run_checks", lambda: checks)
    cli = typer.Typer()
    doctor.register(cli)
    cli.command("noop")(lambda: None)  # two commands: `doctor` is a subcommand
    return runner.invoke(cli, ["doctor", *args])


def test_warnings_alone_do_not_fail_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = [
        Check("privileges", True, "root"),
        Check("port 8700", False, "in use", "stop it", fatal=False),
        Check("accelerator", True, "TCG", "use KVM", fatal=False),
    ]
    result = _invoke(monkeypatch, checks)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "ok   privileges: root",
        "warn port 8700: in use",
        "      fix: stop it",
        "ok   accelerator: TCG",
        "      fix: use KVM",
    ]


def test_a_fatal_failure_fails_the_command_and_shows_its_fix(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    checks = [
        Check("qemu-img", False, "not installed [bold]x[/bold]\nnext", "run [make] setup"),
        Check("privileges", True, "root", "never shown"),
    ]
    result = _invoke(monkeypatch, checks)
    assert result.exit_code == 1
    assert result.stdout.splitlines() == [
        "FAIL qemu-img: not installed [bold]x[/bold] next",
        "      fix: run [make] setup",
        "ok   privileges: root",
    ]


def test_json_lists_every_check(monkeypatch: pytest.MonkeyPatch) -> None:
    checks = [Check("a", True, "fine"), Check("b", False, "bad", "fix it")]
    result = _invoke(monkeypatch, checks, "--output", "json")
    assert result.exit_code == 1
    assert json.loads(result.stdout) == [
        {"name": "a", "ok": True, "detail": "fine", "fix": "", "fatal": True},
        {"name": "b", "ok": False, "detail": "bad", "fix": "fix it", "fatal": True},
    ]


def test_run_checks_checks_the_contexts_data_dir(
    ctx: CliContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[Path] = []
    for name in ("check_root", "check_nftables", "check_cgroups", "check_jail", "check_kvm"):
        monkeypatch.setattr(doctor, name, lambda name=name: Check(name, True, ""))
    monkeypatch.setattr(doctor, "check_binary", lambda n, p, f="": Check(n, True, p))
    monkeypatch.setattr(doctor, "check_disk", lambda d: seen.append(d) or Check("disk", True, ""))
    monkeypatch.setattr(doctor, "check_port", lambda port, what: Check(f"port {port}", True, what))
    names = [c.name for c in doctor.run_checks()]
    assert seen == [ctx.data_dir]
    assert {"qemu-system-x86_64", "qemu-img", "nft", "dnsmasq", "mkfs.ext4"} <= set(names)
    assert {"port 8700", "port 8443", "port 8780"} <= set(names)
