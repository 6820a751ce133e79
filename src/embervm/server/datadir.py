"""The data dir is private to the server's user (B1).

It holds every VM's RAM and disks, the state DB (image environments, run hook payloads), the
logs and the keys. Before this, only the secrets were 0600 and everything else followed the
process umask (0644 files in a 0755 dir), so with ``--data-dir /var/lib/embervm`` any local user
could read every VM's memory.

At start the server sets ``umask 077`` (everything it creates from then on is private,
whatever the code that creates it asks) and makes the data dir 0700, which alone closes the
tree to other users: they cannot traverse it. The tree below is walked and tightened (group and
other bits cleared, symlinks never followed) only when the data dir itself was open — a data
dir made before this, or loosened by hand — not on every start: a walk costs about 1 s per
100,000 entries (bench/datadir_walk.py) and buys nothing while the dir is 0700.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

PRIVATE_UMASK = 0o077
OPEN_BITS = 0o077


def secure_data_dir(data_dir: Path) -> int:
    """Private from now on: umask 077, ``data_dir`` (created if missing) 0700, and when it was
    open, every entry below tightened. Returns how many entries were tightened."""
    os.umask(PRIVATE_UMASK)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    mode = stat.S_IMODE(data_dir.stat().st_mode)
    if not mode & OPEN_BITS:
        return 0
    tightened = tighten_tree(data_dir)
    os.chmod(data_dir, mode & ~OPEN_BITS)
    return tightened + 1


def tighten_tree(root: Path) -> int:
    """Clear the group and other bits of every file and folder below ``root`` (not ``root``
    itself; symlinks are neither followed nor changed). Returns how many were changed."""
    changed = 0
    pending = [os.fspath(root)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    continue
                try:
                    mode = stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode)
                    if mode & OPEN_BITS:
                        # Not a symlink (checked above); only the server's user can write
                        # here, so it cannot become one before this call.
                        os.chmod(entry.path, mode & ~OPEN_BITS)
                        changed += 1
                except FileNotFoundError:
                    continue  # removed while we walked
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
    return changed
