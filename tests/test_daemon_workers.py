"""The daemon's workers take due timers from one queue: a timer never waits
behind an unrelated row's slow action, and the actions of one row run one
after another, in the order their timers came due."""
from __future__ import annotations

import asyncio
import collections
from types import SimpleNamespace

from listener.daemon import Term

Due = collections.namedtuple("Due", "table key name")


class SlowActions:
    """Stands in for the executor: each action waits until released."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.release: dict[str, asyncio.Event] = {}
        self.running: set[tuple[str, str]] = set()
        self.overlapped = False

    async def run(self, timer: Due, fired_at: int) -> None:
        row = (timer.table, timer.key)
        self.overlapped |= row in self.running
        self.running.add(row)
        self.started.append(timer.name)
        await self.release.setdefault(timer.name, asyncio.Event()).wait()
        self.running.discard(row)


async def test_a_slow_row_holds_up_only_its_own_timers() -> None:
    actions = SlowActions()
    term = SimpleNamespace(_acting={}, executor=actions, _lose=lambda exc: None)
    queue: asyncio.Queue = asyncio.Queue()
    workers = [asyncio.create_task(Term._worker(term, queue)) for _ in range(3)]  # type: ignore[arg-type]
    for timer in (Due("t", "a", "a1"), Due("t", "a", "a2"), Due("t", "b", "b1"),
                  Due("t", "a", "a3")):
        queue.put_nowait((timer, 0))
    for _ in range(5):
        await asyncio.sleep(0)
    # Row a's first action is slow: b's runs meanwhile; a's others wait for it.
    assert actions.started == ["a1", "b1"]
    actions.release.setdefault("a1", asyncio.Event()).set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert actions.started == ["a1", "b1", "a2"]
    for name in ("a2", "b1", "a3"):
        actions.release.setdefault(name, asyncio.Event()).set()
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.wait_for(asyncio.gather(*workers), 5)
    assert actions.started == ["a1", "b1", "a2", "a3"]
    assert not actions.overlapped and term._acting == {}
