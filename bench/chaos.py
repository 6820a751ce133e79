"""Chaos and soak: how many faults the system survives with nothing lost (issue #11 §6).

    .venv/bin/python bench/chaos.py                       # every scenario at full size
    .venv/bin/python bench/chaos.py --only vm-soak --size 20
    .venv/bin/python bench/chaos.py --json

Each scenario injects faults into real microVMs and checks every record it keeps after each
one (``chaoslib``); the table says, per scenario, the cycles survived, the faults injected,
the records checked and how many were lost (a scenario stops at the first loss and says
which). ``tests/integration/chaos`` runs the same scenarios at a small size. Needs root and
QEMU (the guest artifacts of the integration tests); the VM scenarios at full size take
about 15 minutes, most of it the 200-cycle soak. Wrap it in ``flock /tmp/embervm-vm.lock``
on shared machines. A scenario is ``Scenario(name, run(size) -> Row, full_size)``; a new one
(e.g. server-level) joins the list that ``scenarios`` returns.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
import traceback
from pathlib import Path

import chaos_server
from chaoslib import Row, Scenario, StateLost, vm

from embervm.guest.artifacts import ensure_guest_artifacts


def scenarios(lab: vm.VmLab) -> list[Scenario]:
    """Every scenario, in the order the table lists them."""
    return vm.scenarios(lab) + chaos_server.scenarios()


async def run(only: list[str], size: int | None) -> list[Row]:
    cache = Path(os.environ.get("EMBERVM_TEST_CACHE", Path.home() / ".cache" / "embervm-test"))
    artifacts = await ensure_guest_artifacts(cache / "artifacts")
    lab = await vm.open_lab(artifacts, Path(f"/tmp/emb-chaos-{os.getpid()}"))
    rows = []
    try:
        for scenario in scenarios(lab):
            if only and scenario.name not in only:
                continue
            n = size or scenario.full_size
            try:
                rows.append(await scenario.run(n))
            except StateLost as exc:
                rows.append(Row(scenario.name, 0, 0, 0, 1, f"LOST: {exc}"))
            except Exception as exc:
                traceback.print_exc()
                rows.append(Row(scenario.name, 0, 0, 0, 0, f"FAILED: {exc!r}"))
    finally:
        await vm.close_lab(lab)
    return rows


def table(rows: list[Row]) -> str:
    lines = [f"{'scenario':28} {'cycles':>7} {'faults':>7} {'records':>8} {'lost':>5}  note"]
    for r in rows:
        lines.append(
            f"{r.scenario:28} {r.cycles:>7} {r.faults:>7} {r.records:>8} {r.lost:>5}  {r.note}"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=[], help="a scenario name (repeatable)")
    ap.add_argument("--size", type=int, default=None, help="instead of each one's full size")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = asyncio.run(run(args.only, args.size))
    if args.json:
        json.dump([dataclasses.asdict(r) for r in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
    else:
        print(table(rows))
    sys.exit(1 if any(r.lost or r.note.startswith("FAILED") for r in rows) else 0)


if __name__ == "__main__":
    main()
