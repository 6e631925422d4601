"""Replay skips the work nobody consumes there; the live executor keeps it.

Replay serves no /metrics and logs at WARNING, so its executor counts nothing
in the process's metrics; the executor the daemon builds (metered, the
default) counts every action. The cyclic collector, paused for the replay,
is as it was afterwards.
"""
from __future__ import annotations

import asyncio
import gc
import io

from benchmarks.lifecycles import generate
from listener import metrics
from listener.changes import change_from_line
from listener.executor import Executor
from listener.replay import REPLAY_FENCE, Replay, run_replay
from listener.rules import load_rules

LINES = generate(40, seed=5)


def actions_counted() -> float:
    return sum(sample.value for family in metrics.ACTIONS.collect()
               for sample in family.samples if sample.name == "listener_actions_total")


def test_a_replay_counts_nothing_in_the_process_metrics() -> None:
    before = actions_counted()
    stats = asyncio.run(run_replay(LINES, load_rules({}), io.StringIO(), io.StringIO()))
    assert stats.actions > 0
    assert actions_counted() == before


def test_the_executor_the_daemon_builds_counts_every_action() -> None:
    replay = Replay(load_rules({}))
    fired: list = []
    # As daemon.py builds it: metered by default.
    replay.executor = Executor(replay.engine, replay.store, replay.clock, REPLAY_FENCE,
                               on_result=fired.append, timeline=False)

    async def play() -> None:
        for line in LINES:
            await replay.apply(change_from_line(line, replay.keys))
        await replay.finish(None)

    before = actions_counted()
    asyncio.run(play())
    assert fired
    assert actions_counted() - before == len(fired)


def test_the_collector_is_as_it_was_after_a_replay() -> None:
    assert gc.isenabled()
    asyncio.run(run_replay(LINES, load_rules({}), io.StringIO(), io.StringIO()))
    assert gc.isenabled()
    gc.disable()
    try:
        asyncio.run(run_replay(LINES, load_rules({}), io.StringIO(), io.StringIO()))
        assert not gc.isenabled()
    finally:
        gc.enable()
