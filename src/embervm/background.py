"""Background tasks whose lifetime is an exit stack's: started now, cancelled and awaited when
the stack closes (in reverse order, with everything else the stack holds)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any


def start_background(
    stack: contextlib.AsyncExitStack, work: Coroutine[Any, Any, None], *, name: str
) -> asyncio.Task[None]:
    """Run ``work`` as a task named ``name``; closing ``stack`` cancels it and waits for it."""
    task = asyncio.create_task(work, name=name)
    stack.push_async_callback(_cancel_and_wait, task)
    return task


async def _cancel_and_wait(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
