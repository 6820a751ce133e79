"""``embervm.point_of_no_return``: work past its point of no return finishes, and the caller
hears it did."""

from __future__ import annotations

import asyncio

import pytest

from embervm.point_of_no_return import past_point_of_no_return


async def test_a_cancel_during_the_work_is_withdrawn_and_the_result_returned() -> None:
    finished = asyncio.Event()

    async def work() -> str:
        await asyncio.sleep(0.05)
        finished.set()
        return "committed"

    async def caller() -> str:
        result = await past_point_of_no_return(work())
        await asyncio.sleep(0)  # not cancelled any more: later awaits run normally
        return result

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    assert await task == "committed"
    assert finished.is_set()
    assert not task.cancelled()


async def test_the_work_failing_raises_its_error() -> None:
    async def work() -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        await past_point_of_no_return(work())


async def test_the_withdrawn_cancel_leaves_the_caller_not_cancelling() -> None:
    async def caller() -> int:
        await past_point_of_no_return(asyncio.sleep(0.05))
        current = asyncio.current_task()
        assert current is not None
        return current.cancelling()  # what asyncio.timeout and TaskGroup look at

    task = asyncio.create_task(caller())
    await asyncio.sleep(0.01)
    task.cancel()
    assert await task == 0
