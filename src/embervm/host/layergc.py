"""Disk layers nobody needs any more: found and deleted.

Every build step leaves a frozen qcow2 layer in ``DATA_DIR/layers/``; without a collector they
pile up forever. A layer is kept while anything reaches it through qcow2 backing files:

- a qcow2 under ``images/`` (image versions' frozen disks) or ``vms/`` (VMs' disks, suspend
  snapshots),
- a step-cache entry (the next build with the same steps reuses it), and
- a file some process holds open (a build or app VM's current top overlay: QEMU opens its
  whole chain).

Step-cache entries that no build used for ``cache_days`` are forgotten first (a hit touches its
entry), so their layers become collectable; uploaded code zips (``uploads/``) not uploaded
again for as long are deleted too. A layer changed less than ``GRACE`` seconds ago is
never deleted: a build may have just frozen it and not yet recorded it. Anything unreadable
counts as needed: the collector errs towards keeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from embervm.blobs.uploads import TEMP_GLOB, ZIP_GLOB
from embervm.imagebuild.cache import LocalLayerCache

log = logging.getLogger("embervm.host.layergc")

GRACE = 3600.0
COLLECT_EVERY = 3600.0
_QCOW2_MAGIC = b"QFI\xfb"
_HEADER = struct.Struct(">4sIQI")  # magic, version, backing file offset, backing file size
_MAX_BACKING_NAME = 4096
_MAX_CHAIN = 1000


@dataclass(frozen=True)
class Collected:
    layers_removed: int = 0
    bytes_freed: int = 0
    cache_entries_forgotten: int = 0


def backing_file(path: Path) -> Path | None:
    """The backing file a qcow2 names (absolute), None for none or for a file that is not
    qcow2. Raises OSError when the file cannot be read."""
    with path.open("rb") as f:
        header = f.read(_HEADER.size)
        if len(header) < _HEADER.size:
            return None
        magic, _, offset, size = _HEADER.unpack(header)
        if magic != _QCOW2_MAGIC or offset == 0 or not 0 < size <= _MAX_BACKING_NAME:
            return None
        f.seek(offset)
        name = os.fsdecode(f.read(size))
    return path.parent / name  # an absolute name stays absolute


def chain(path: Path) -> list[Path]:
    """``path`` and every file below it through backing files, each resolved (symlinks, ``..``)
    so that it compares equal however it was named; bounded and loop-safe. OSError when a
    file of the chain cannot be read (then what lies below it is unknown)."""
    out: list[Path] = []
    current: Path | None = path
    while current is not None and len(out) < _MAX_CHAIN:
        current = current.resolve()
        if current in out:
            break
        out.append(current)
        # A file gone since it was listed, or a dangling name, has nothing below it.
        current = backing_file(current) if current.exists() else None
    return out


def open_files_under(folder: Path) -> set[Path]:
    """Files under ``folder`` that some process has open (``/proc/<pid>/fd``)."""
    found: set[Path] = set()
    prefix = str(folder) + os.sep
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in (proc / "fd").iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith(prefix):
                        found.add(Path(target))
    return found


def needed_layers(roots: list[Path], cached: list[Path], layers_dir: Path) -> set[Path]:
    """The layers reached from the qcow2 files under ``roots``, the cached layers and the
    layer files some process holds open."""
    layers_dir = layers_dir.resolve()
    starts = [p for root in roots if root.is_dir() for p in root.rglob("*.qcow2")]
    starts += cached
    starts += sorted(open_files_under(layers_dir))
    needed: set[Path] = set()
    for start in starts:
        needed.update(p for p in chain(start) if p.parent == layers_dir)  # OSError: see _sweep
    return needed


async def collect(
    layers_dir: Path,
    roots: list[Path],
    cache: LocalLayerCache,
    *,
    cache_days: float,
    now: float | None = None,
) -> Collected:
    """Forget stale cache entries, then delete the layers nothing needs (see module doc)."""
    now = time.time() if now is None else now
    forgotten = await cache.forget_unused_since(now - cache_days * 86400)
    cached = [Path(ref.id) for ref in (await cache.layers()).values()]
    return await asyncio.to_thread(_sweep, layers_dir, roots, cached, now, forgotten)


def _sweep(
    layers_dir: Path, roots: list[Path], cached: list[Path], now: float, forgotten: int
) -> Collected:
    if not layers_dir.is_dir():
        return Collected(cache_entries_forgotten=forgotten)
    try:
        needed = needed_layers(roots, cached, layers_dir)
    except OSError as exc:  # a disk we cannot read may need any layer: delete none this time
        log.warning("disk layers not collected: %s", exc)
        return Collected(cache_entries_forgotten=forgotten)
    removed = freed = 0
    for layer in sorted(layers_dir.glob("*.qcow2")):
        if layer.resolve() in needed:
            continue
        try:
            st = layer.stat()
            if now - st.st_mtime < GRACE:
                continue
            layer.unlink()
        except OSError:
            continue
        removed += 1
        freed += st.st_blocks * 512
    return Collected(removed, freed, forgotten)


def prune_uploads(uploads: Path, cutoff: float, now: float) -> int:
    """Delete uploaded zips not uploaded again since ``cutoff`` and upload temp files a crash
    left (older than ``GRACE``). Returns how many files went."""
    removed = 0
    for path in uploads.glob(ZIP_GLOB):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    for path in uploads.glob(TEMP_GLOB):
        with contextlib.suppress(OSError):
            if now - path.stat().st_mtime > GRACE:
                path.unlink()
                removed += 1
    return removed


async def keep_collecting(
    layers_dir: Path,
    roots: list[Path],
    cache: LocalLayerCache,
    *,
    uploads: Path,
    cache_days: float,
) -> None:
    """Collect layers and prune ``uploads`` now and every ``COLLECT_EVERY`` seconds, until
    cancelled (an uploaded zip is kept as long as a cache entry: ``cache_days``)."""
    while True:
        try:
            done = await collect(layers_dir, roots, cache, cache_days=cache_days)
            now = time.time()
            pruned = await asyncio.to_thread(prune_uploads, uploads, now - cache_days * 86400, now)
            if done.layers_removed or done.cache_entries_forgotten or pruned:
                log.info(
                    "disk space: %d layers removed (%d MiB), %d build-cache entries "
                    "forgotten, %d uploads removed",
                    done.layers_removed, done.bytes_freed >> 20, done.cache_entries_forgotten,
                    pruned,
                )  # fmt: skip
        except Exception:
            log.exception("disk layer collection failed")
        await asyncio.sleep(COLLECT_EVERY)
