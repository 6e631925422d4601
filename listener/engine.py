"""The rule engine: session states and changes in, due timers and decisions out.

Pure: no I/O, no clock. Callers pass instants in and act on what comes out;
the same engine runs under the live scheduler and under replay.

Timers live in one heap of (due, rule index, session id). An entry is never
removed when a change makes it obsolete; it is checked when it comes due
(lazy invalidation): the rule's due instant is recomputed from the session's
current state, and the entry fires only if it still matches and that episode
has not fired. That keeps a change O(rules) and memory per session small.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from listener.instants import HOUR, Instant
from listener.sessions import SessionState, parse_row, session_id_of
from listener.rules.table import (
    KNOWN_STATUSES, MECHANIC_IF_ASSIGNED, SKIP_PAST_QUARTER, TERMINAL, Rule, RuleTable)

FIRE, LATE, SKIP = "fired", "late", "skipped"


class Timer(NamedTuple):
    rule: Rule
    rule_index: int
    session_id: str
    due: Instant


class Decision(NamedTuple):
    """What a due timer should do, decided against the freshest state."""

    timer: Timer
    fired_at: Instant
    outcome: str  # FIRE: full effect; LATE: status change only; SKIP: nothing
    recipients: tuple[str, ...]  # roles to email (empty when LATE or SKIP)
    detail: str | None = None

    @property
    def lateness(self) -> int:
        return self.fired_at - self.timer.due


@dataclass(slots=True)
class Applied:
    """What one change did to the engine."""

    session_id: str
    problems: list[str]
    new_status: str | None = None  # set when the status is one the engine does not know


DueFunction = Callable[[SessionState], "Instant | None"]


def compile_due(rule: Rule) -> DueFunction:
    """Turn a rule's declaration into a function of a state: its due instant or None.

    The engine evaluates rules on every change, so each declaration becomes
    straight-line code once, at start. Column names are checked against the
    state's slots, so nothing but a known attribute reaches the source.
    """
    columns = rule.when.present + rule.when.absent + rule.anchor
    unknown = [c for c in columns if c not in SessionState.__slots__]
    if unknown:
        raise ValueError(f"rule {rule.name}: unknown columns {unknown}")
    lines = ["def due(s):", "    if s.status not in STATUSES: return None"]
    lines += [f"    if s.{c} is None: return None" for c in rule.when.present]
    lines += [f"    if s.{c} is not None: return None" for c in rule.when.absent]
    lines.append(f"    a = s.{rule.anchor[0]}")
    for column in rule.anchor[1:]:
        lines += [f"    b = s.{column}", "    if b is not None and (a is None or b > a): a = b"]
    lines += ["    if a is None: return None", f"    return a + {rule.direction * rule.offset}"]
    namespace: dict = {"STATUSES": rule.when.statuses}
    exec("\n".join(lines), namespace)  # noqa: S102 - source built from checked names only
    return namespace["due"]


class Engine:
    def __init__(self, table: RuleTable, max_notify_lateness: int = HOUR) -> None:
        self.rules: tuple[Rule, ...] = tuple(table)
        self.max_notify_lateness = max_notify_lateness
        self.sessions: dict[str, SessionState] = {}
        self.armed = 0  # pending (rule, session, due) episodes
        self._heap: list[tuple[Instant, int, str]] = []
        self._due = [compile_due(rule) for rule in self.rules]
        self._by_status: dict[str, tuple[tuple[int, DueFunction], ...]] = {}
        for index, rule in enumerate(self.rules):
            for status in rule.when.statuses:
                self._by_status[status] = (self._by_status.get(status, ())
                                           + ((index, self._due[index]),))
        self._unknown_statuses: set[str] = set()
        # Fired episodes of sessions forgotten as terminal, in case the row comes
        # back with the same anchors. Bounded: live, the ledger is the authority.
        self._tombstones: OrderedDict[str, tuple[tuple[int, Instant], ...]] = OrderedDict()
        self.max_tombstones = 100_000

    # -- the rules, interpreted ------------------------------------------------

    def due_of(self, index: int, state: SessionState) -> Instant | None:
        """The rule's due instant for this state, or None when it does not apply."""
        return self._due[index](state)

    def pending(self, state: SessionState) -> list[tuple[int, Instant]]:
        """(rule index, due) of every episode this state still owes."""
        out = []
        fired = state.fired
        for index, due_of in self._by_status.get(state.status, ()):
            due = due_of(state)
            if due is not None and (not fired or (index, due) not in fired):
                out.append((index, due))
        return out

    # -- changes -----------------------------------------------------------------

    def upsert(self, row: Mapping[str, Any], at: Instant | None) -> Applied:
        """Apply an INSERT or UPDATE (or a row read back from the store).

        Raises BadRow when the row has no usable id or status.
        """
        sid = session_id_of(row)
        old = self.sessions.get(sid)
        new, problems = parse_row(row, old, at)
        applied = Applied(sid, problems)
        if new.status not in KNOWN_STATUSES and new.status not in self._unknown_statuses:
            self._unknown_statuses.add(new.status)
            applied.new_status = new.status
        if old is not None:
            new.fired = old.fired
            old_pending = self.pending(old)
        else:
            new.fired = self._tombstones.pop(sid, ())
            old_pending = []
        new_pending = self.pending(new)
        self.armed += len(new_pending) - len(old_pending)
        for index, due in new_pending:
            if (index, due) not in old_pending:
                heapq.heappush(self._heap, (due, index, new.id))
        if new_pending or new.status not in TERMINAL and new.status in KNOWN_STATUSES:
            self.sessions[sid] = new
        else:
            # Terminal with nothing owed: forget it, memory is for live work.
            self._forget(sid, new)
        self._compact_if_bloated()
        return applied

    def delete(self, session_id: str) -> bool:
        old = self.sessions.get(session_id)
        if old is None:
            return False
        self.armed -= len(self.pending(old))
        self._forget(session_id, old)
        return True

    def _forget(self, sid: str, state: SessionState) -> None:
        self.sessions.pop(sid, None)
        if state.fired:
            self._tombstones[sid] = state.fired
            if len(self._tombstones) > self.max_tombstones:
                self._tombstones.popitem(last=False)

    # -- time ----------------------------------------------------------------------

    def next_due(self) -> Instant | None:
        """The earliest instant a timer may be due (obsolete entries dropped first)."""
        heap = self._heap
        while heap:
            due, index, sid = heap[0]
            state = self.sessions.get(sid)
            if state is not None and self.due_of(index, state) == due \
                    and (index, due) not in state.fired:
                return due
            heapq.heappop(heap)
        return None

    def pop_due(self, until: Instant) -> Timer | None:
        """The next timer due at or before `until`, marked as fired; None if none.

        Order: due instant, then table order, then session id. Each pop sees the
        state left by everything applied before it.
        """
        heap = self._heap
        while heap and heap[0][0] <= until:
            due, index, sid = heapq.heappop(heap)
            state = self.sessions.get(sid)
            if state is None or self.due_of(index, state) != due or (index, due) in state.fired:
                continue
            state.fired = state.fired + ((index, due),)
            self.armed -= 1
            if state.status in TERMINAL and not self.pending(state):
                self._forget(sid, state)
            return Timer(self.rules[index], index, sid, due)
        return None

    def release(self, timer: Timer) -> None:
        """Undo pop_due for a timer that was not acted on (its guard failed live)."""
        state = self.sessions.get(timer.session_id)
        if state is None or (timer.rule_index, timer.due) not in state.fired:
            return
        state.fired = tuple(f for f in state.fired if f != (timer.rule_index, timer.due))
        if self.due_of(timer.rule_index, state) == timer.due:
            self.armed += 1
            heapq.heappush(self._heap, (timer.due, timer.rule_index, timer.session_id))

    # -- deciding ------------------------------------------------------------------

    def holds(self, timer: Timer, state: SessionState) -> bool:
        """The guard: does the timer's rule still apply, with the same due, to `state`?"""
        return self.due_of(timer.rule_index, state) == timer.due

    def decide(self, timer: Timer, state: SessionState, fired_at: Instant) -> Decision:
        rule = timer.rule
        lateness = fired_at - timer.due
        if rule.lateness == SKIP_PAST_QUARTER:
            # Reminders answer only to this limit, not to MAX_NOTIFY_LATENESS.
            if lateness * 4 > rule.offset:
                return Decision(timer, fired_at, SKIP, (), "too late to remind")
        elif lateness > self.max_notify_lateness:
            return Decision(timer, fired_at, LATE, (), "past MAX_NOTIFY_LATENESS: no email")
        recipients = []
        for role in rule.notify:
            if role == MECHANIC_IF_ASSIGNED:
                if state.mechanic_id:
                    recipients.append("mechanic")
            else:
                recipients.append(role)
        return Decision(timer, fired_at, FIRE, tuple(recipients))

    # -- inspection ------------------------------------------------------------------

    def upcoming(self) -> Iterator[tuple[Instant, Rule, str]]:
        """Every pending episode, soonest first (for `listener plan`)."""
        items = [(due, index, sid) for sid, state in self.sessions.items()
                 for index, due in self.pending(state)]
        items.sort()
        for due, index, sid in items:
            yield due, self.rules[index], sid

    def _compact_if_bloated(self) -> None:
        # Obsolete entries normally drain as they come due; a row whose far-future
        # deadline moves often would grow the heap without bound, so rebuild it.
        if len(self._heap) > 4 * self.armed + 10_000:
            self._heap = [(due, index, sid) for sid, state in self.sessions.items()
                          for index, due in self.pending(state)]
            heapq.heapify(self._heap)
