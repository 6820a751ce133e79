"""A content-addressed directory cache that is safe for concurrent builders.

Each artifact lives in ``<artifacts_dir>/<kind>-<key>/`` where ``key`` hashes every input of
its recipe. A builder holds an exclusive ``flock`` on ``.<kind>-<key>.lock``, fills a private
temporary directory and publishes it with one ``rename``: readers see either nothing or a
complete directory, never a half-built one, and two processes never build the same thing twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path

from embervm.errors import ArtifactError

_LOCK_POLL = 0.2


def hash_inputs(parts: Iterable[bytes | str]) -> str:
    """A short stable key over ``parts`` (length-prefixed so parts cannot run together)."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return h.hexdigest()[:16]


@contextlib.asynccontextmanager
async def _locked(lock_path: Path, wait_limit: float) -> AsyncIterator[None]:
    """Hold an exclusive flock on ``lock_path``, polling so the wait is cancellable."""
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_limit
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if loop.time() > deadline:
                    raise ArtifactError(
                        f"timed out after {wait_limit:.0f} s waiting for {lock_path}"
                    ) from None
                await asyncio.sleep(_LOCK_POLL)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


async def cached_dir(
    root: Path,
    kind: str,
    key: str,
    build: Callable[[Path], Awaitable[None]],
    *,
    lock_timeout: float,
) -> Path:
    """Return ``root/<kind>-<key>``, running ``build(tmpdir)`` first if it does not exist yet."""
    final = root / f"{kind}-{key}"
    if await asyncio.to_thread(_prepare, root, final):
        return final
    async with _locked(root / f".{kind}-{key}.lock", lock_timeout):
        if final.is_dir():  # someone else built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{kind}-", dir=root))
        try:
            await build(tmp)
            _publish(tmp, final)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            raise
        _fsync_dir(root)
    return final


def _prepare(root: Path, final: Path) -> bool:
    """Create ``root`` if needed; True when ``final`` is already there."""
    if final.is_dir():
        return True
    root.mkdir(parents=True, exist_ok=True)
    return False


def _publish(tmp: Path, final: Path) -> None:
    # mkdtemp makes 0700; an unprivileged VMM process must be able to read the artifact.
    os.chmod(tmp, 0o755)  # noqa: S103
    os.rename(tmp, final)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
