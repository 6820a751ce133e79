"""``past_point_of_no_return``: finish work that can no longer be undone, whatever cancels."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def past_point_of_no_return(aw: Awaitable[T]) -> T:
    """Run ``aw`` to its end even if the calling task is cancelled meanwhile, and return its
    result as if no cancel had come.

    For work after which undoing is impossible (a snapshot committed: its VM must stop, and
    the caller must learn it completed). A cancel that arrives here is too late: it is
    withdrawn (``Task.uncancel``) rather than raised, so the caller's own timeouts still work.
    """
    task = asyncio.ensure_future(aw)
    current = asyncio.current_task()
    while True:
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if task.cancelled():  # cancelled from elsewhere: nothing left to finish
                raise
            if current is not None:
                current.uncancel()
