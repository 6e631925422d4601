"""Ending a term's tasks: a cancellation a library swallowed is asked again,
and a task that will not end is logged and left, never waited for forever."""
from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from listener.supervision import cancel_and_wait


async def swallows_one_cancellation(ended: list[str]) -> None:
    """What a connection pool losing a waiter's cancellation looks like to us:
    the first CancelledError is caught, and the loop goes on to its next sleep."""
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        pass
    try:
        await asyncio.sleep(60)
    finally:
        ended.append("ended")


async def test_a_lost_cancellation_is_asked_again() -> None:
    ended: list[str] = []
    task = asyncio.create_task(swallows_one_cancellation(ended), name="catch-up")
    await asyncio.sleep(0)
    await asyncio.wait_for(cancel_and_wait([task], part="intake", again_after=0.05), 5)
    assert task.cancelled() and ended == ["ended"]


async def test_a_task_that_never_ends_is_logged_and_left() -> None:
    let_go = False

    async def stubborn() -> None:
        while not let_go:
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                pass

    task = asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0)
    with capture_logs() as logs:
        await asyncio.wait_for(cancel_and_wait([task], part="intake", again_after=0.02,
                                               give_up_after=0.2), 5)
    assert [(e["event"], e["tasks"]) for e in logs] == [("tasks_not_cancelled", ["stubborn"])]
    assert not task.done()
    let_go = True
    task.cancel()
    await task


async def test_failed_tasks_are_retrieved() -> None:
    async def fails() -> None:
        raise RuntimeError("boom")

    task = asyncio.create_task(fails())
    await asyncio.sleep(0.01)
    await cancel_and_wait([task], part="actions")
    with pytest.raises(RuntimeError):
        task.result()
