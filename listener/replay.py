"""`listener replay`: the engine, the in-memory store and a virtual clock.

Deterministic: no database, no email, no network, no wall clock.
"""
from __future__ import annotations

import gc
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, TextIO

import orjson

from listener import collector
from listener.adapters.store_memory import MemoryStore
from listener.changes import BadChange, Change, ChangeType, change_from_line
from listener.clock import VirtualClock
from listener.engine import Applied, Engine
from listener.executor import ActionResult, Executor
from listener.instants import HOUR, Instant, format_instant
from listener.rows import BadRow
from listener.rules.model import Outcome, RuleSet
from listener.rules.query import table_queries
from listener.store import Fence

REPLAY_FENCE = Fence("replay", 0)
PRINTED = (Outcome.FIRED, Outcome.LATE)
# Lines between full collections while the cyclic collector is paused (see
# run_replay): a bound on memory should anything ever make a cycle.
COLLECT_EVERY = 1_000_000


@dataclass
class ReplayStats:
    lines: int = 0
    applied: int = 0
    bad: int = 0
    ignored: int = 0
    after_until: int = 0
    actions: int = 0


def result_line(result: ActionResult, webhooks: Mapping[str, str | None]) -> dict:
    """The printed line of an action; `webhooks`: each rule's webhook event by rule name."""
    key = result.key
    at = format_instant(result.fired_at)
    out: dict = {"at": at, "rule": key.rule, "table": key.table, "row_id": key.row_key}
    if key.table == "sessions":
        out["session_id"] = key.row_key
    if result.status:
        out["status"] = result.status
        out["reason"] = result.reason
    if result.outcome is Outcome.LATE:
        out["late"] = True
    # Replay fires each timer at its due instant: the same text, made once.
    out["due_at"] = at if key.due_at == result.fired_at else format_instant(key.due_at)
    if result.recipients:
        out["recipients"] = list(result.recipients)
    webhook = webhooks[key.rule]
    if webhook:
        out["webhook"] = webhook
    return out


class Replay:
    """Feeds changes to the engine on a virtual clock, firing timers in between."""

    def __init__(self, ruleset: RuleSet, max_notify_lateness: int = HOUR,
                 emit: Callable[[ActionResult], None] | None = None) -> None:
        self.ruleset = ruleset
        self.clock = VirtualClock()
        queries = table_queries(ruleset, max_notify_lateness)
        self.keys = {name: q.key for name, q in queries.items()}
        self.store = MemoryStore(queries, clock=self.clock)
        self.engine = Engine(ruleset, max_notify_lateness)
        self.results: list[ActionResult] = []

        def collect(result: ActionResult) -> None:
            if result.outcome in PRINTED:
                self.results.append(result)
                if emit is not None:
                    emit(result)

        self.executor = Executor(self.engine, self.store, self.clock, REPLAY_FENCE,
                                 on_result=collect, timeline=False, metered=False)

    async def fire_until(self, limit: Instant) -> None:
        pop_due, clock, run = self.engine.pop_due, self.clock, self.executor.run
        while (timer := pop_due(limit)) is not None:
            clock.advance_to(timer.due)
            await run(timer, clock.now())

    async def apply(self, change: Change, owned: bool = False) -> Applied | None:
        """Apply one change at its instant (never before the clock); None when
        no rule reads its table. `owned`: the caller gives the change's record
        up (it parsed it for this alone), so the store keeps it uncopied."""
        engine = self.engine
        if not engine.watches(change.table):
            return None
        now = self.clock.now()
        at = change.at if change.at is not None and change.at > now else now
        # A change stamped at t goes before the timers due at t.
        if engine.may_be_due(at - 1):
            await self.fire_until(at - 1)
        return self.apply_due(change, at, owned)

    def apply_due(self, change: Change, at: Instant, owned: bool = False) -> Applied:
        """The rest of `apply`, once every timer due before `at` has fired: a plain
        call, since nothing here waits (the replay loop skips a coroutine per line)."""
        self.clock.advance_to(at)
        if change.type is ChangeType.DELETE:
            self.store.remove(change.table, change.key)
            self.engine.delete(change.table, change.key)
            return Applied(change.table, change.key, [])
        assert change.record is not None
        row = self.store.write(change.table, change.record, at, owned=owned, key=change.key)
        return self.engine.upsert(change.table, row, at)

    async def finish(self, until: Instant | None) -> None:
        await self.fire_until(until if until is not None else 2**62)


async def run_replay(lines: Iterable[str], ruleset: RuleSet, out: TextIO, err: TextIO,
                     until: Instant | None = None,
                     max_notify_lateness: int = HOUR) -> ReplayStats:
    stats = ReplayStats()
    webhooks: dict[str, str | None] = {}
    for rule in ruleset.all_rules:
        webhooks.setdefault(rule.name, rule.webhook)  # the first of a name, as by_name finds
    # Lines are written in batches: one write per line costs more than the engine.
    pending: list[bytes] = []

    def emit(result: ActionResult) -> None:
        stats.actions += 1
        pending.append(orjson.dumps(result_line(result, webhooks)))
        if len(pending) >= 256:
            flush()

    def flush() -> None:
        if pending:
            out.write(b"\n".join(pending).decode() + "\n")
            pending.clear()

    replay = Replay(ruleset, max_notify_lateness, emit)
    # Replay makes no reference cycles per line (states, rows and ledger entries
    # are acyclic), but every change leaves surviving containers, and the
    # collector kept re-traversing the engine's live objects: a third of a
    # replay's CPU time went to finding nothing.
    with collector.paused():
        try:
            await _replay_lines(replay, lines, stats, err, until)
        finally:
            collector.age_survivors()
    flush()
    return stats


async def _replay_lines(replay: Replay, lines: Iterable[str], stats: ReplayStats, err: TextIO,
                        until: Instant | None) -> None:
    engine, clock = replay.engine, replay.clock
    unknown_values = engine.new_unknown_values
    for number, line in enumerate(lines, 1):
        if number % COLLECT_EVERY == 0:
            gc.collect()
        if not line or line.isspace():
            continue
        stats.lines += 1
        try:
            change = change_from_line(line, replay.keys)
        except BadChange as exc:
            stats.bad += 1
            err.write(f"line {number}: {exc}; skipped\n")
            continue
        if until is not None and change.at is not None and change.at > until:
            stats.after_until += 1
            continue
        if not engine.watches(change.table):
            stats.ignored += 1
            continue
        # Replay.apply, inlined: a change waits only for the timers due before it.
        now = clock.now()
        at = change.at if change.at is not None and change.at > now else now
        try:
            if engine.may_be_due(at - 1):
                await replay.fire_until(at - 1)
            applied = replay.apply_due(change, at, owned=True)  # parsed from its line here
        except BadRow as exc:
            stats.bad += 1
            err.write(f"line {number}: {change.table} {change.key}: {exc}; skipped\n")
            continue
        stats.applied += 1
        for problem in applied.problems:
            err.write(f"line {number}: {change.table} {change.key}: {problem}; read as null\n")
        if applied.new_status:
            err.write(f"line {number}: {change.table} {change.key}: unknown status "
                      f"{applied.new_status!r}, treated as terminal\n")
        if unknown_values:
            for unknown in unknown_values:
                err.write(f"line {number}: {unknown.table}.{unknown.column} = {unknown.value!r} "
                          "is not in the rules' map: no computed deadline from it\n")
            unknown_values.clear()
    if stats.after_until:
        err.write(f"{stats.after_until} line(s) stamped after --until were not applied\n")
    await replay.finish(until)
