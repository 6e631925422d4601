"""`listener replay`: the engine, the in-memory store and a virtual clock.

Deterministic: no database, no email, no network, no wall clock.
"""
from __future__ import annotations

import orjson
from dataclasses import dataclass
from typing import Callable, Iterable, TextIO

from listener.adapters.store_memory import MemoryStore
from listener.changes import BadChange, Change, change_from_line
from listener.clock import VirtualClock
from listener.engine import Applied, Engine
from listener.executor import ActionResult, Executor
from listener.instants import HOUR, Instant, format_instant
from listener.sessions import BadRow
from listener.store import Fence
from listener.rules.table import RuleTable

REPLAY_FENCE = Fence("replay", 0)


@dataclass
class ReplayStats:
    lines: int = 0
    applied: int = 0
    bad: int = 0
    after_until: int = 0
    actions: int = 0


def result_line(result: ActionResult) -> dict:
    out: dict = {"at": format_instant(result.fired_at), "rule": result.key.rule,
                 "session_id": result.key.session_id}
    if result.status:
        out["status"] = result.status
        out["reason"] = result.reason
    if result.outcome == "late":
        out["late"] = True
    out["due_at"] = format_instant(result.key.due_at)
    if result.recipients:
        out["recipients"] = list(result.recipients)
    return out


class Replay:
    """Feeds changes to the engine on a virtual clock, firing timers in between."""

    def __init__(self, table: RuleTable, max_notify_lateness: int = HOUR,
                 emit: Callable[[ActionResult], None] | None = None) -> None:
        self.clock = VirtualClock()
        self.store = MemoryStore()
        self.engine = Engine(table, max_notify_lateness)
        self.results: list[ActionResult] = []

        def collect(result: ActionResult) -> None:
            if result.outcome in ("fired", "late"):
                self.results.append(result)
                if emit is not None:
                    emit(result)

        self.executor = Executor(self.engine, self.store, self.clock, REPLAY_FENCE,
                                 on_result=collect)

    async def fire_until(self, limit: Instant) -> None:
        while (timer := self.engine.pop_due(limit)) is not None:
            self.clock.advance_to(timer.due)
            await self.executor.run(timer, self.clock.now())

    async def apply(self, change: Change) -> Applied | None:
        """Apply one change at its instant (never before the clock)."""
        at = max(change.at if change.at is not None else self.clock.now(), self.clock.now())
        # A change stamped at t goes before the timers due at t.
        await self.fire_until(at - 1)
        self.clock.advance_to(at)
        if change.type == "DELETE":
            self.store.remove(change.session_id)
            self.engine.delete(change.session_id)
            return None
        assert change.record is not None
        row = self.store.write(change.record, at)
        return self.engine.upsert(row, at)

    async def finish(self, until: Instant | None) -> None:
        await self.fire_until(until if until is not None else 2**62)


async def run_replay(lines: Iterable[str], table: RuleTable, out: TextIO, err: TextIO,
                     until: Instant | None = None,
                     max_notify_lateness: int = HOUR) -> ReplayStats:
    stats = ReplayStats()

    def emit(result: ActionResult) -> None:
        stats.actions += 1
        out.write(orjson.dumps(result_line(result)).decode() + "\n")

    replay = Replay(table, max_notify_lateness, emit)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        stats.lines += 1
        try:
            change = change_from_line(line)
            if change.table != "sessions":
                raise BadChange(f"table {change.table!r} is not sessions")
        except BadChange as exc:
            stats.bad += 1
            err.write(f"line {number}: {exc}; skipped\n")
            continue
        if until is not None and change.at is not None and change.at > until:
            stats.after_until += 1
            continue
        try:
            applied = await replay.apply(change)
        except BadRow as exc:
            stats.bad += 1
            err.write(f"line {number}: {exc}; skipped\n")
            continue
        stats.applied += 1
        if applied is None:
            continue
        for problem in applied.problems:
            err.write(f"line {number}: session {change.session_id}: {problem}; read as null\n")
        if applied.new_status:
            err.write(f"line {number}: session {change.session_id}: unknown status "
                      f"{applied.new_status!r}, treated as terminal\n")
    if stats.after_until:
        err.write(f"{stats.after_until} line(s) stamped after --until were not applied\n")
    await replay.finish(until)
    return stats
