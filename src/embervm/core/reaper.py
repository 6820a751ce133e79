"""The reaper of a fleet's API processes: hosts whose lease ran out (the database's clock) are
marked LOST, their running VMs TERMINATED with a reason that names the host, their suspended
VMs freed to resume elsewhere (``HostRegistry.mark_lost_expired``: one statement; each host is
marked once however many API processes reap at the same time), and the builds they ran fail."""

from __future__ import annotations

import asyncio
import logging

from embervm.core.builds import BuildRunner
from embervm.store import HostRecord, HostRegistry

log = logging.getLogger("embervm.core.reaper")

REAP_SECONDS = 1.0
"""How often an API process looks: a host is marked within its lease plus this."""


async def reap_once(hosts: HostRegistry) -> list[HostRecord]:
    lost = await hosts.mark_lost_expired()
    for host in lost:
        log.warning(
            "host %s (epoch %d) stopped answering: marked LOST; its running VMs are "
            "TERMINATED, its suspended VMs resume on another host",
            host.host_id,
            host.epoch,
        )
    return lost


async def keep_reaping(
    hosts: HostRegistry,
    interval: float = REAP_SECONDS,
    *,
    builds: BuildRunner | None = None,
) -> None:
    """Reap every ``interval``; the builds the lost hosts ran fail (``builds``)."""
    failing = False
    while True:
        try:
            lost = await reap_once(hosts)
            if lost and builds is not None:
                await builds.fail_builds_of([host.host_id for host in lost])
            failing = False
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the store is down: the next look retries
            if not failing:
                log.warning("reaping lost hosts failed: %s (retrying)", exc)
            failing = True
        await asyncio.sleep(interval)
