"""RowCache: rows stay until a write; a read that raced a write does not fill the cache."""

from __future__ import annotations

from embervm.store.rowcache import MAX_ROWS, RowCache


def test_a_row_read_before_any_write_is_kept_until_invalidated() -> None:
    cache: RowCache[str, str] = RowCache()
    cache.put("web", "row", cache.generation)
    assert cache.get("web") == "row"
    cache.invalidate()
    assert cache.get("web") is None


def test_a_row_read_across_a_write_is_not_kept() -> None:
    cache: RowCache[str, str] = RowCache()
    generation = cache.generation  # the read starts...
    cache.invalidate()  # ...a write ends meanwhile...
    cache.put("web", "old row", generation)  # ...the read's answer may predate it
    assert cache.get("web") is None


def test_missing_rows_are_not_kept() -> None:
    cache: RowCache[str, str] = RowCache()
    cache.put("ghost", None, cache.generation)
    assert cache.get("ghost") is None


def test_the_cache_is_bounded() -> None:
    cache: RowCache[int, int] = RowCache()
    for n in range(MAX_ROWS + 1):
        cache.put(n, n, cache.generation)
    assert cache.get(MAX_ROWS) == MAX_ROWS
    assert cache.get(0) is None
