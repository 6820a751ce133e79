"""How long the start-up walk that tightens an open data dir takes (server/datadir.py, B1).

    .venv/bin/python bench/datadir_walk.py [entries]

Builds a tree of ``entries`` files (0644) in folders of 1,000 (0755) under a temp dir, then
times ``tighten_tree`` over it twice: the first pass changes every mode, the second (a tree
already private) only reads them.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

from embervm.server.datadir import tighten_tree


def main(entries: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(entries):
            folder = root / f"d{i // 1000}"
            if i % 1000 == 0:
                folder.mkdir(mode=0o755)
                os.chmod(folder, 0o755)
            path = folder / f"f{i}"
            path.touch()
            os.chmod(path, 0o644)
        for label in ("open tree", "private tree"):
            start = time.perf_counter()
            changed = tighten_tree(root)
            took = time.perf_counter() - start
            print(f"{label}: {entries} files, {changed} changed in {took:.3f} s")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
