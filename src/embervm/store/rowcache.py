"""Image and version rows kept in memory between writes (SQLite only).

RunMicrovm reads the image and its version before admission; they change only when an image
operation writes them, while MicroVMs come and go. On SQLite this process is the only writer,
so the repository drops the whole cache after every write that may touch image rows, and a
read that raced a write does not fill the cache (the generation moved on). Admission still
re-checks the version inside its transaction, so a cached row is never trusted for a write.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

MAX_ROWS = 4096


class RowCache(Generic[K, V]):
    def __init__(self) -> None:
        self._rows: dict[K, V] = {}
        self.generation = 0

    def get(self, key: K) -> V | None:
        """The cached row, or ``None`` (a miss; missing rows are not cached)."""
        return self._rows.get(key)

    def put(self, key: K, row: V | None, generation: int) -> None:
        """Keep ``row``, read when the cache was at ``generation``, unless a write followed."""
        if row is None or generation != self.generation:
            return
        if len(self._rows) >= MAX_ROWS:
            self._rows.clear()
        self._rows[key] = row

    def invalidate(self) -> None:
        self.generation += 1
        self._rows.clear()
