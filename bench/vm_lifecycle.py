"""VM lifecycle benchmark: cold boot vs restore, memory-size independence, 10 clones, suspend.

    .venv/bin/python bench/vm_lifecycle.py            # human table
    .venv/bin/python bench/vm_lifecycle.py --json     # machine-readable

Needs root (the base disk is built with mmdebstrap once), QEMU and the guest artifacts (cached in
``$EMBERVM_TEST_CACHE`` or ``~/.cache/embervm-test``). Every time is host wall clock, measured to
"the guest agent answered hello" unless the row says otherwise. Runs in about a minute; every
VM it starts is killed before it exits. Targets: docs/PERFORMANCE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from embervm.guest.artifacts import (
    GuestArtifacts,
    ensure_guest_artifacts,
    host_tsc_khz,
    kernel_cmdline,
)
from embervm.guest.client import AgentClient
from embervm.vmm import QemuProcess, QemuVmm, VmConfig, create_overlay
from embervm.vmm.snapshot import warm_memory_file

AGENT_TIMEOUT = 60.0
CLONES = 10


@dataclass
class Bench:
    art: GuestArtifacts
    root: Path
    vmm: QemuVmm
    procs: list[QemuProcess] = field(default_factory=list)
    n: int = 0

    def cfg(self, memory_mib: int) -> VmConfig:
        self.n += 1
        d = self.root / f"vm{self.n}"
        d.mkdir()
        cmd = kernel_cmdline(
            guest_ip="10.0.2.15", gateway="10.0.2.2", prefix=24, tsc_khz=host_tsc_khz()
        )
        return VmConfig.for_workdir(
            f"vm{self.n}", d, memory_mib=memory_mib, vcpus=1, kernel=self.art.kernel,
            initrd=self.art.initrd, cmdline=cmd, kernel_release=self.art.kernel_release,
        )  # fmt: skip

    async def agent(self, cfg: VmConfig, *, restored: bool) -> None:
        client = await AgentClient.connect(
            cfg.agent_socket, timeout=AGENT_TIMEOUT, after_restore=restored
        )
        await client.close()

    async def cold_boot(self, memory_mib: int) -> tuple[QemuProcess, VmConfig, float]:
        cfg = self.cfg(memory_mib)
        create_overlay(self.art.base_disk, cfg.disk, "raw")
        t0 = time.monotonic()
        proc = await self.vmm.boot(cfg)
        self.procs.append(proc)
        await self.agent(cfg, restored=False)
        return proc, cfg, time.monotonic() - t0

    async def restore(
        self, snap: Path, memory_mib: int, *, consume: bool = False, cfg: VmConfig | None = None
    ) -> tuple[QemuProcess, VmConfig, float, float]:
        cfg = cfg or self.cfg(memory_mib)
        t0 = time.monotonic()
        proc = await self.vmm.restore(cfg, snap, consume=consume)
        running = time.monotonic() - t0
        self.procs.append(proc)
        await self.agent(cfg, restored=True)
        return proc, cfg, running, time.monotonic() - t0

    async def image(self, memory_mib: int, name: str) -> tuple[Path, float, int]:
        """Cold boot, then snapshot (the VM exits): an image snapshot. Returns boot time, PSS."""
        proc, _, boot = await self.cold_boot(memory_mib)
        await asyncio.sleep(1.0)  # let the guest settle (agent started, page cache quiet)
        pss = (await proc.stats()).pss_bytes
        await proc.snapshot(self.root / name)
        return self.root / name, boot, pss


def disk_written_bytes() -> int:
    """Bytes written to all block devices since boot (/proc/diskstats; whole host, noisy)."""
    total = 0
    for line in Path("/proc/diskstats").read_text().splitlines():
        parts = line.split()
        if (
            len(parts) > 9
            and not parts[2].startswith(("loop", "ram", "dm-"))
            and not parts[2][-1].isdigit()
        ):
            total += int(parts[9]) * 512
    return total


async def suspend_resume(
    b: Bench, snap: Path, memory_mib: int, rounds: int
) -> list[dict[str, Any]]:
    proc, cfg, _, _ = await b.restore(snap, memory_mib)
    await asyncio.sleep(1.0)
    out = []
    for i in range(rounds):
        dest = cfg.workdir / "suspend"
        w0 = disk_written_bytes()
        t0 = time.monotonic()
        manifest = await proc.snapshot(dest)
        t_suspend = time.monotonic() - t0
        written_dev = disk_written_bytes() - w0
        written_files = manifest.files["device.state"].size
        t0 = time.monotonic()
        proc = await b.vmm.restore(cfg, dest, consume=True)
        t_running = time.monotonic() - t0
        b.procs.append(proc)
        await b.agent(cfg, restored=True)
        t_resume = time.monotonic() - t0
        out.append({
            "round": i + 1, "kind": manifest.kind, "suspend_s": t_suspend,
            "resume_running_s": t_running, "resume_agent_s": t_resume,
            "state_file_bytes": written_files, "disk_written_bytes": written_dev,
            "written_vs_memory": max(written_files, written_dev) / (memory_mib << 20),
        })  # fmt: skip
        await asyncio.sleep(1.0)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    cache = Path(os.environ.get("EMBERVM_TEST_CACHE", Path.home() / ".cache" / "embervm-test"))
    art = await ensure_guest_artifacts(cache / "artifacts")
    root = Path(tempfile.mkdtemp(prefix="embervm-bench-", dir=args.dir))
    b = Bench(art, root, QemuVmm(stream_restore_shared=args.stream_restore_shared))
    res: dict[str, Any] = {"accel": "tcg", "host_cores": os.cpu_count()}
    try:
        small, boot_small, pss_cold = await b.image(256, "img256")
        big, boot_big, _ = await b.image(2048, "img2048")
        res["cold_boot_agent_s"] = boot_small
        res["cold_boot_agent_2g_s"] = boot_big
        res["cold_vm_pss_bytes"] = pss_cold

        restores: dict[int, list[tuple[float, float]]] = {256: [], 2048: []}
        for _ in range(3):
            for mib, snap in ((256, small), (2048, big)):
                proc, _, running, agent = await b.restore(snap, mib)
                restores[mib].append((running, agent))
                await proc.kill()
        med = {m: sorted(v)[len(v) // 2] for m, v in restores.items()}
        res["restore_running_s"] = med[256][0]
        res["restore_agent_s"] = med[256][1]
        res["restore_2g_running_s"] = med[2048][0]
        res["restore_2g_agent_s"] = med[2048][1]
        res["cold_vs_restore_ratio"] = boot_small / med[256][1]
        res["restore_2g_vs_256m_ratio"] = med[2048][1] / med[256][1]

        t0 = time.monotonic()
        clones = await asyncio.gather(*(b.restore(small, 256) for _ in range(CLONES)))
        res["clones_all_agents_s"] = time.monotonic() - t0
        await asyncio.sleep(1.0)
        pss = [(await p.stats()).pss_bytes for p, *_ in clones]
        res["clones_total_pss_bytes"] = sum(pss)
        res["clones_pss_vs_10_cold"] = sum(pss) / (CLONES * pss_cold)
        for p, *_ in clones:
            await p.kill()

        t0 = time.monotonic()
        await asyncio.to_thread(warm_memory_file, big)
        res["warm_2g_image_s"] = time.monotonic() - t0
        await asyncio.sleep(2.0)  # let the host settle after reading 2 GiB of holes
        res["suspend_resume_2g"] = await suspend_resume(b, big, 2048, rounds=3)
    finally:
        for p in b.procs:
            with contextlib.suppress(Exception):
                await p.kill()
        shutil.rmtree(root, ignore_errors=True)
    return res


TARGETS = [
    ("cold boot -> agent (256 MiB)", "cold_boot_agent_s", "s", None),
    ("restore -> QEMU running (256 MiB)", "restore_running_s", "s", None),
    ("restore -> agent (256 MiB)", "restore_agent_s", "s", None),
    ("restore -> agent (2 GiB)", "restore_2g_agent_s", "s", None),
    ("cold boot / restore (to agent)", "cold_vs_restore_ratio", "x", ">= 15"),
    ("restore 2 GiB / 256 MiB (to agent)", "restore_2g_vs_256m_ratio", "x", "<= 1.2"),
    (f"{CLONES} restores at once -> all agents", "clones_all_agents_s", "s", "<= 3"),
    (f"PSS of {CLONES} clones / {CLONES} x cold VM", "clones_pss_vs_10_cold", "x", "<= 0.25"),
]


def table(res: dict[str, Any]) -> str:
    lines = [f"{'measure':48} {'value':>10}  target"]
    for label, key, unit, target in TARGETS:
        lines.append(f"{label:48} {res[key]:>9.3f}{unit}  {target or ''}")
    warm = "warm the 2 GiB image (once, off the path)"
    lines.append(f"{warm:48} {res['warm_2g_image_s']:>9.3f}s")
    for r in res["suspend_resume_2g"]:
        n, kind = r["round"], r["kind"]
        written = (
            f"state {r['state_file_bytes'] >> 20} MiB, disk {r['disk_written_bytes'] >> 20} MiB"
        )
        rows = [
            (f"suspend #{n} idle 2 GiB ({kind})", f"{r['suspend_s']:>9.3f}s", "<= 0.5"),
            (
                f"resume  #{n} idle 2 GiB -> running / agent",
                f"{r['resume_running_s']:.3f}s / {r['resume_agent_s']:.3f}s",
                "<= 0.5",
            ),
            (
                f"suspend #{n} written / guest memory",
                f"{r['written_vs_memory']:>9.3f}x",
                f"<= 0.25 ({written})",
            ),
        ]
        lines += [f"{a:48} {b:>10}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--dir", default=None, help="where VM files go (default: $TMPDIR)")
    ap.add_argument(
        "--stream-restore-shared", action="store_true",
        help="resume stream snapshots into a shared RAM file (the alternative design)",
    )  # fmt: skip
    args = ap.parse_args()
    res = asyncio.run(asyncio.wait_for(run(args), 170))
    if args.json:
        json.dump(res, sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(table(res))


if __name__ == "__main__":
    main()
