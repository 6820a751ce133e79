"""``embervm doctor``: check the host, and say how to fix each problem."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import typer
from rich.markup import escape

from embervm.cli._app import current
from embervm.cli._output import OutputFormat, OutputOption, console, emit, one_line
from embervm.config import DEFAULT_API_PORT, DEFAULT_PROXY_HTTP_PORT, DEFAULT_PROXY_PORT, DataDir

MIN_FREE_BYTES = 5 * 1024**3
PROBE_SECONDS = 180
SETUP_FIX = "run `make setup` (installs the missing Debian packages)"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    fatal: bool = True


def _run(argv: list[str], timeout: float = 10) -> tuple[int, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 127, str(exc)
    return done.returncode, (done.stdout or done.stderr).strip()


def check_binary(name: str, package: str, version_flag: str = "--version") -> Check:
    path = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )
    if path is None:
        return Check(name, False, "not installed", f"{SETUP_FIX} (package {package})")
    code, out = _run([path, version_flag])
    first = out.splitlines()[0] if out else ""
    return Check(name, code == 0, first or path, "" if code == 0 else f"reinstall {package}")


def check_root() -> Check:
    ok = os.geteuid() == 0
    return Check(
        "privileges",
        ok,
        "root" if ok else f"uid {os.geteuid()}",
        "" if ok else "run the server as root (it creates network namespaces and cgroups)",
    )


def check_kvm() -> Check:
    import asyncio

    from embervm.guest.artifacts import ensure_boot_artifacts
    from embervm.vmm.accel import detect_accelerator

    data_dir = current().data_dir

    async def probe() -> str:
        # Fetching the guest kernel goes to the network: bounded, so doctor never hangs.
        async with asyncio.timeout(PROBE_SECONDS):
            boot = await ensure_boot_artifacts(DataDir(data_dir).artifacts)
            return await detect_accelerator(DataDir(data_dir).accel_cache, kernel=boot.kernel)

    try:
        accel = asyncio.run(probe())
    except TimeoutError:
        return Check(
            "accelerator",
            False,
            f"probe did not finish in {PROBE_SECONDS} s",
            SETUP_FIX,
            fatal=False,
        )
    except Exception as exc:  # the probe is advisory; say why it could not run
        return Check("accelerator", False, f"probe failed: {exc}", SETUP_FIX, fatal=False)
    if accel == "kvm":
        return Check("accelerator", True, "KVM")
    return Check(
        "accelerator",
        True,
        "TCG (software emulation): KVM is missing or does not boot guests here; VMs work, slower",
        "for full speed use a host with working /dev/kvm (bare metal or nested virt enabled)",
        fatal=False,
    )


def check_nftables() -> Check:
    code, out = _run(["nft", "list", "tables"])
    return Check(
        "nftables",
        code == 0,
        "usable" if code == 0 else out[:120],
        "" if code == 0 else "install nftables and run as root; the kernel needs nf_tables",
    )


def check_cgroups() -> Check:
    from embervm.errors import JailError
    from embervm.vmm.jail import CgroupV1, CgroupV2, detect_cgroup_driver

    try:
        driver = detect_cgroup_driver()
    except JailError as exc:
        return Check(
            "cgroups", False, str(exc), "mount cgroup v2 at /sys/fs/cgroup (or v1 cpu and memory)"
        )
    if isinstance(driver, CgroupV2):
        offered = set((driver.root / "cgroup.controllers").read_text().split())
        missing = sorted({"pids", "io"} - offered)
    else:
        assert isinstance(driver, CgroupV1)
        missing = [
            c for c, r in (("pids", driver.pids_root), ("blkio", driver.blkio_root)) if not r
        ]
    detail = f"v{driver.version}" + (f", without {', '.join(missing)}" if missing else "")
    fix = f"enable the {' and '.join(missing)} controllers (VMs get no task or disk I/O limit)"
    return Check("cgroups", not missing, detail, fix if missing else "", fatal=False)


def check_jail() -> Check:
    """The VMMs drop to uids of their own (docs/JAIL.md): no account may own one of them."""
    import pwd

    from embervm.vmm.jail import UID_BASE, UID_SPAN

    taken = [p.pw_name for p in pwd.getpwall() if UID_BASE <= p.pw_uid < UID_BASE + UID_SPAN]
    span = f"{UID_BASE}-{UID_BASE + UID_SPAN - 1}"
    if taken:
        return Check(
            "VMM jail", False, f"uids {span} are meant for VMMs but {', '.join(taken)} own some",
            "move those accounts out of that range",
        )  # fmt: skip
    if os.geteuid() != 0:
        return Check("VMM jail", False, "not root: QEMU cannot be jailed",
                     "run embervm as root")  # fmt: skip
    from embervm.errors import VmmError
    from embervm.vmm.qemu import probe_jail

    try:
        probe_jail()
    except VmmError as exc:
        return Check("VMM jail", False, str(exc), "see docs/JAIL.md, What the host must provide")
    return Check(
        "VMM jail", True,
        f"a jailed QEMU answered: own mount namespace, seccomp allow-list, uids {span}, chroot",
    )  # fmt: skip


def check_disk(data_dir: Path) -> Check:
    probe = data_dir
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    ok = free >= MIN_FREE_BYTES
    return Check(
        "disk space",
        ok,
        f"{free / 1024**3:.1f} GiB free at {probe}",
        "" if ok else "free at least 5 GiB or choose another --data-dir",
    )


def check_port(port: int, what: str) -> Check:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return Check(
                f"port {port}",
                False,
                f"in use ({what})",
                f"stop what listens on {port} (maybe a running `embervm server`) or pick another",
                fatal=False,
            )
    return Check(f"port {port}", True, f"free ({what})")


def run_checks() -> list[Check]:
    data_dir = current().data_dir
    return [
        check_root(),
        check_binary("qemu-system-x86_64", "qemu-system-x86"),
        check_binary("qemu-img", "qemu-utils"),
        check_binary("mmdebstrap", "mmdebstrap"),
        check_binary("mkfs.ext4", "e2fsprogs", "-V"),
        check_binary("nft", "nftables"),
        check_binary("ip", "iproute2", "-V"),
        check_binary("dnsmasq", "dnsmasq-base"),
        check_nftables(),
        check_cgroups(),
        check_jail(),
        check_kvm(),
        check_disk(data_dir),
        check_port(DEFAULT_API_PORT, "control API"),
        check_port(DEFAULT_PROXY_PORT, "endpoint proxy, TLS"),
        check_port(DEFAULT_PROXY_HTTP_PORT, "endpoint proxy, plain"),
    ]


def doctor(output: OutputOption = OutputFormat.text) -> None:
    """Check QEMU, the accelerator, nftables, cgroups, disk space and ports."""
    checks = run_checks()
    failed = [c for c in checks if not c.ok and c.fatal]

    def text() -> None:
        for c in checks:
            mark = (
                "[green]ok[/green]  "
                if c.ok
                else ("[red]FAIL[/red]" if c.fatal else "[yellow]warn[/yellow]")
            )
            console.print(f"{mark} {escape(c.name)}: {escape(one_line(c.detail))}")
            if c.fix and (not c.ok or not c.fatal):
                console.print(f"      fix: {c.fix}", markup=False)

    emit([c.__dict__ for c in checks], output, text)
    if failed:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command()(doctor)
