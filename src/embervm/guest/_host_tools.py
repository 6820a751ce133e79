"""Run host tools (apt-get, dpkg-deb, depmod, mmdebstrap, mkfs.ext4) with a bound on time.

Every artifact step shells out to a distribution tool; this is the one place that turns a
failed or hung tool into an :class:`~embervm.errors.ArtifactError` carrying its stderr tail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from embervm.errors import ArtifactError

_STDERR_TAIL = 2000


async def run_tool(
    argv: Sequence[str],
    *,
    time_limit: float,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> bytes:
    """Run ``argv`` to completion within ``time_limit`` seconds and return its stdout.

    The child is killed (whole process group) on timeout or cancellation so a stuck download or
    a hung mkfs never outlives the caller.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise ArtifactError(f"cannot run {argv[0]}: {exc}") from exc
    try:
        out, err = await asyncio.wait_for(proc.communicate(), time_limit)
    except BaseException as exc:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(proc.wait(), 5)
        if isinstance(exc, TimeoutError):
            raise ArtifactError(f"{argv[0]} did not finish within {time_limit:.0f} s") from exc
        raise
    if proc.returncode != 0:
        tail = err.decode(errors="replace")[-_STDERR_TAIL:].strip()
        raise ArtifactError(f"{' '.join(argv[:3])} failed (exit {proc.returncode}): {tail}")
    return out
