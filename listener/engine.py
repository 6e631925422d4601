"""The rule engine: row states and changes in, due timers and decisions out.

Pure: no I/O, no clock. Callers pass instants in and act on what comes out;
the same engine runs under the live scheduler and under replay.

Timers live in one heap of (due, rule index, row key); the rule index names the
table, and rules are numbered in table order, so the heap's order is the
firing order: due instant, then table order, then key. Each tracked state
keeps the entries of the episodes it owes (`_queued`, computed once per
change, soonest first), and only the soonest of them needs to be in the heap:
every other one comes after it, so it is pushed when the one before it fires.
Most episodes never fire (the row moves on first), so most are never pushed.
An entry is never removed when a change makes it obsolete; it is checked when
it comes due (lazy invalidation): a popped entry fires only if the row's
current state still holds it, and then it is the row's soonest. That keeps a
change O(rules of its table), a stale entry's check one lookup, and memory
per row small.
"""
from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, NamedTuple

from listener.instants import HOUR, Instant
from listener.rows import MAX_KEY_LENGTH, BadRow, ChildCodec, RowCodec, RowState
from listener.rules.model import Lateness, Outcome, Rule, RuleSet, SumTerm, Table

DueFunction = Callable[[RowState], "Instant | None"]


class Timer(NamedTuple):
    rule: Rule
    rule_index: int
    table: str
    key: str
    due: Instant


class Decision(NamedTuple):
    """What a due timer should do, decided against the freshest state."""

    timer: Timer
    fired_at: Instant
    outcome: Outcome  # FIRED: full effect; LATE: no email; SKIPPED: nothing
    recipients: tuple[str, ...]  # roles to email (empty when LATE or SKIPPED)
    detail: str | None = None

    @property
    def lateness(self) -> int:
        return self.fired_at - self.timer.due


@dataclass(slots=True)
class Applied:
    """What one change did to the engine."""

    table: str
    key: str
    problems: list[str]
    new_status: str | None = None  # set when the status is one the table does not know
    ignored: bool = False  # a table no rule reads
    armed: int = 0  # episodes this change made owed that were not before


class UnknownValue(NamedTuple):
    """A value a map lacks (a plan with no length): reported once per value."""

    table: str
    column: str
    value: Any


def compile_due(rule: Rule, table: Table, maps: Mapping[str, Mapping[str, float]],
                sums: Mapping[SumTerm, dict[str, float]],
                unknown: Callable[[str, Any], None]) -> DueFunction:
    """Turn a rule's declaration into a function of a state: its due instant or None.

    The engine evaluates rules on every change, so each declaration becomes
    straight-line code once, at start. Only column names checked as
    identifiers reach the source; values go through the namespace.
    """
    namespace: dict[str, Any] = {"STATUSES": rule.statuses, "UNKNOWN": unknown}
    status = table.status
    lines = ["def due(s):"]
    if rule.statuses:
        lines.append(f"    if s.{status} not in STATUSES: return None")
    lines += [f"    if s.{c} is None: return None" for c in rule.present if c not in table.derived]
    lines += [f"    if s.{c} is not None: return None" for c in rule.absent
              if c not in table.derived]
    lines.append("    a = None")
    for n, anchor in enumerate(rule.anchor):
        derived = table.derived.get(anchor)
        if derived is None:
            lines.append(f"    b = s.{anchor}")
        else:
            lines.append(f"    b = s.{derived.start}")
            for m, term in enumerate(derived.lookups):
                values = maps.get(term.map, {})
                namespace[f"MAP{n}_{m}"] = {k: round(v * term.unit) for k, v in values.items()}
                lines += ["    if b is not None:",
                          f"        v = s.{term.column}",
                          f"        d = MAP{n}_{m}.get(v) if v is not None else None",
                          "        if d is None:",
                          f"            UNKNOWN({term.column!r}, v)",
                          "            b = None",
                          "        else: b += d"]
            for m, term in enumerate(derived.sums):
                namespace[f"SUM{n}_{m}"] = sums[term]
                lines += [f"    if b is not None: b += round(SUM{n}_{m}.get(s._key, 0) * {term.unit})"]
        lines.append("    if b is not None and (a is None or b > a): a = b")
    lines += ["    if a is None: return None", f"    return a + {rule.offset}"]
    exec("\n".join(lines), namespace)  # noqa: S102 - source built from checked names only
    return namespace["due"]


class TableState:
    """The engine's rows of one table and the rules that read them."""

    __slots__ = ("name", "table", "codec", "status", "rows", "by_status", "always",
                 "for_status", "tombstones")

    def __init__(self, table: Table, codec: RowCodec) -> None:
        self.name = table.name
        self.table = table
        self.codec = codec
        self.status = codec.status  # the status column's name
        self.rows: dict[str, RowState] = {}
        self.by_status: dict[str, tuple[tuple[int, DueFunction], ...]] = {}
        self.always: tuple[tuple[int, DueFunction], ...] = ()  # rules for every status
        self.for_status: dict[str, tuple[tuple[int, DueFunction], ...]] = {}
        # Rows that owe nothing are forgotten (memory is for live work); what is
        # left of them is the state they were in (for inferring when a later
        # change entered its status) and their fired episodes, in case the row
        # comes back with the same anchors. Bounded: live, the ledger is the authority.
        self.tombstones: OrderedDict[str, RowState] = OrderedDict()

    def add_rule(self, index: int, due: DueFunction, statuses: frozenset[str]) -> None:
        """A rule of this table: for the statuses it names, or for every status."""
        if statuses:
            for status in statuses:
                self.by_status[status] = self.by_status.get(status, ()) + ((index, due),)
        else:
            self.always += ((index, due),)
        # Per status, its rules then those for every status: made here, once,
        # rather than joined on each of the several lookups every change makes.
        self.for_status = {status: found + self.always for status, found in self.by_status.items()}

    def rules_for(self, status: str) -> tuple[tuple[int, DueFunction], ...]:
        return self.for_status.get(status, self.always)


class Engine:
    def __init__(self, ruleset: RuleSet, max_notify_lateness: int = HOUR) -> None:
        self.ruleset = ruleset
        self.rules: tuple[Rule, ...] = ruleset.rules
        self.max_notify_lateness = max_notify_lateness
        self.armed = 0  # pending (rule, row, due) episodes
        self.max_tombstones = 100_000
        self._heap: list[tuple[Instant, int, str]] = []
        self._unknown_values: set[UnknownValue] = set()
        self._unknown_statuses: set[tuple[str, str]] = set()
        self.new_unknown_values: list[UnknownValue] = []  # drained by the caller
        self.tables: dict[str, TableState] = {}
        # Child tables: child rows by key -> (parent key, numbers), and the sums per term.
        self._sums: dict[SumTerm, dict[str, float]] = {}
        self._children: dict[str, tuple[ChildCodec, list[tuple[str, SumTerm]],
                                        dict[str, tuple[str | None, tuple[float, ...]]]]] = {}
        for child, uses in ruleset.child_tables().items():
            declared = ruleset.tables.get(child) or Table(child)
            codec = ChildCodec(child, declared.key, uses[0][1].by,
                               tuple(dict.fromkeys(t.column for _, t in uses)))
            self._children[child] = (codec, uses, {})
            for _, term in uses:
                self._sums.setdefault(term, {})
        # Per rule, its recipients when none depends on the row (no "role?").
        self._recipients: list[tuple[str, ...] | None] = [
            None if any(role.endswith("?") for role in rule.notify) else tuple(rule.notify)
            for rule in self.rules]
        self._due: list[DueFunction] = []
        self._rule_table: list[TableState] = []
        for index, rule in enumerate(self.rules):
            state = self.tables.get(rule.table)
            if state is None:
                table = ruleset.tables[rule.table]
                codec = RowCodec(table, [r for r in self.rules if r.table == rule.table])
                state = self.tables[rule.table] = TableState(table, codec)
            due = compile_due(rule, state.table, ruleset.maps, self._sums,
                              self._unknown_reporter(rule.table))
            self._due.append(due)
            self._rule_table.append(state)
            state.add_rule(index, due, rule.statuses)

    def _unknown_reporter(self, table: str) -> Callable[[str, Any], None]:
        def report(column: str, value: Any) -> None:
            if value is None:
                return
            item = UnknownValue(table, column, value)
            if item not in self._unknown_values:
                self._unknown_values.add(item)
                self.new_unknown_values.append(item)
        return report

    # -- the rules, interpreted ------------------------------------------------

    def watches(self, table: str) -> bool:
        return table in self.tables or table in self._children

    def row(self, table: str, key: str) -> RowState | None:
        state = self.tables.get(table)
        return None if state is None else state.rows.get(key)

    def seen_version(self, table: str, key: str) -> str | None:
        """The version of the row as memory holds it, or as it was when memory
        last forgot it (it owed nothing then, and the same version owes
        nothing now); None when memory knows neither."""
        ts = self.tables.get(table)
        if ts is None:
            return None
        state = ts.rows.get(key) or ts.tombstones.get(key)
        return None if state is None else state._version

    @property
    def tracked(self) -> int:
        return sum(len(t.rows) for t in self.tables.values())

    def due_of(self, index: int, state: RowState) -> Instant | None:
        """The rule's due instant for this state, or None when it does not apply."""
        return self._due[index](state)

    def pending(self, table: TableState, state: RowState) -> list[tuple[int, Instant]]:
        """(rule index, due) of every episode this state still owes."""
        rules = table.for_status.get(getattr(state, table.status), table.always)
        fired = state._fired
        if not fired:
            return [(index, due) for index, due_of in rules if (due := due_of(state)) is not None]
        return [(index, due) for index, due_of in rules
                if (due := due_of(state)) is not None and (index, due) not in fired]

    def parse(self, table: str, row: Mapping[str, Any], at: Instant | None) -> RowState:
        """A row as state, without applying it (the guard reads fresh rows so)."""
        ts = self.tables[table]
        key = ts.codec.key_of(row)
        return ts.codec.parse(row, ts.rows.get(key), at)[0]

    # -- changes -----------------------------------------------------------------

    def upsert(self, table: str, row: Mapping[str, Any], at: Instant | None) -> Applied:
        """Apply an INSERT or UPDATE (or a row read back from the store).

        Raises BadRow when the row has no usable key or status.
        """
        ts = self.tables.get(table)
        if ts is None:
            if table in self._children:
                return self._upsert_child(table, row)
            return Applied(table, "", [], ignored=True)
        codec = ts.codec
        # codec.key_of, inlined for the usual text key of a dict row.
        key = row.get(codec.key) if type(row) is dict else None
        if type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH:
            key = codec.key_of(row)
        old = ts.rows.get(key)
        gone = ts.tombstones.pop(key, None) if old is None else None
        new, problems = codec.parse_keyed(row, key, old or gone, at)
        applied = Applied(table, key, problems)
        status = getattr(new, codec.status)
        known = ts.table.known_statuses
        if known and status not in known and (table, status) not in self._unknown_statuses:
            self._unknown_statuses.add((table, status))
            applied.new_status = status
        if old is not None:
            new._fired = old._fired
            old_queued = old._queued
        else:
            new._fired = gone._fired if gone is not None else ()
            old_queued = ()
        applied.armed = self._arm(ts, key, new, old_queued)
        return applied

    def _arm(self, ts: TableState, key: str, new: RowState,
             old_queued: tuple[tuple[Instant, int, str], ...]) -> int:
        """Put `new` in place of the row's state, whose heap entries were
        `old_queued`; the number of episodes newly owed."""
        fired = new._fired
        row_key = new._key
        queued = []
        added = 0
        for index, due_of in ts.for_status.get(getattr(new, ts.status), ts.always):
            due = due_of(new)
            if due is None or (fired and (index, due) in fired):
                continue
            entry = (due, index, row_key)
            if not old_queued or entry not in old_queued:
                added += 1
            queued.append(entry)
        self.armed += len(queued) - len(old_queued)
        if queued:
            if len(queued) > 1:
                queued.sort()
            # Only the soonest is pushed; the state owed it before if it was
            # the soonest then too, and then it is in the heap already.
            if not old_queued or old_queued[0] != queued[0]:
                heapq.heappush(self._heap, queued[0])
            new._queued = tuple(queued)
            ts.rows[key] = new
        else:
            new._queued = ()
            self._forget(ts, key, new)
        if len(self._heap) > 4 * self.armed + 10_000:
            self._compact()
        return added

    def _upsert_child(self, table: str, row: Mapping[str, Any]) -> Applied:
        codec, uses, rows = self._children[table]
        key, parent, numbers, problems = codec.parse(row)
        old = rows.get(key)
        if parent is None:
            rows.pop(key, None)
        else:
            rows[key] = (parent, numbers)
        self._child_changed(uses, codec, old, (parent, numbers) if parent is not None else None)
        return Applied(table, key, problems)

    def _child_changed(self, uses: list[tuple[str, SumTerm]], codec: ChildCodec,
                       old: tuple[str | None, tuple[float, ...]] | None,
                       new: tuple[str | None, tuple[float, ...]] | None) -> None:
        parents = {p for p in (old and old[0], new and new[0]) if p is not None}
        before = {}
        for parent_table in {t for t, _ in uses}:
            ts = self.tables[parent_table]
            for parent in parents:
                state = ts.rows.get(parent)
                if state is not None:
                    before[(parent_table, parent)] = state._queued
        for _, term in uses:
            sums = self._sums[term]
            index = codec.columns.index(term.column)
            for side, sign in ((old, -1), (new, +1)):
                if side is not None and side[0] is not None:
                    total = sums.get(side[0], 0) + sign * side[1][index]
                    if total:
                        sums[side[0]] = total
                    else:
                        sums.pop(side[0], None)
        for (parent_table, parent), old_pending in before.items():
            ts = self.tables[parent_table]
            self._arm(ts, parent, ts.rows[parent], old_pending)

    def delete(self, table: str, key: str) -> bool:
        ts = self.tables.get(table)
        if ts is None:
            if table in self._children:
                codec, uses, rows = self._children[table]
                old = rows.pop(key, None)
                if old is not None:
                    self._child_changed(uses, codec, old, None)
                    return True
            return False
        old = ts.rows.get(key)
        if old is None:
            return False
        self.armed -= len(old._queued)
        old._queued = ()
        self._forget(ts, key, old)
        return True

    def _forget(self, ts: TableState, key: str, state: RowState) -> None:
        ts.rows.pop(key, None)
        ts.tombstones[key] = state
        ts.tombstones.move_to_end(key)
        if len(ts.tombstones) > self.max_tombstones:
            ts.tombstones.popitem(last=False)

    def keys(self, table: str) -> list[str]:
        ts = self.tables.get(table)
        if ts is not None:
            return list(ts.rows)
        if table in self._children:
            return list(self._children[table][2])
        return []

    # -- time ----------------------------------------------------------------------

    def _live(self, entry: tuple[Instant, int, str]) -> RowState | None:
        """The row's state if it still owes the episode of this heap entry."""
        state = self._rule_table[entry[1]].rows.get(entry[2])
        # Held, it is the row's soonest (see pop_due).
        return state if state is not None and state._queued[:1] == (entry,) else None

    def next_due(self) -> Instant | None:
        """The earliest instant a timer may be due (obsolete entries dropped first)."""
        heap = self._heap
        while heap:
            if self._live(heap[0]) is not None:
                return heap[0][0]
            heapq.heappop(heap)
        return None

    def may_be_due(self, until: Instant) -> bool:
        """Whether pop_due(until) may find a timer (false: it certainly finds none)."""
        return bool(self._heap) and self._heap[0][0] <= until

    def pop_due(self, until: Instant) -> Timer | None:
        """The next timer due at or before `until`, marked as fired; None if none.

        Order: due instant, then table order, then key. Each pop sees the state
        left by everything applied before it.
        """
        heap = self._heap
        while heap and heap[0][0] <= until:
            entry = heapq.heappop(heap)
            # _live, inlined: many entries popped are obsolete, checked and dropped here.
            due, index, key = entry
            ts = self._rule_table[index]
            state = ts.rows.get(key)
            if state is None:
                continue
            queued = state._queued
            # A held entry popped is the row's soonest: the soonest is always
            # in the heap, and nothing in the heap comes before this one.
            if not queued or queued[0] != entry:
                continue
            state._queued = rest = queued[1:]
            if rest:
                heapq.heappush(heap, rest[0])
            state._fired += ((index, due),)
            self.armed -= 1
            return Timer(self.rules[index], index, ts.name, key, due)
        return None

    def release(self, timer: Timer) -> None:
        """Undo pop_due for a timer that was not acted on (its guard failed live)."""
        ts = self._rule_table[timer.rule_index]
        state = ts.rows.get(timer.key)
        if state is None:
            # Forgotten meanwhile: the episode must not stay "fired" in what is
            # left of it, or the row read back by the next sweep would not re-arm it.
            gone = ts.tombstones.get(timer.key)
            if gone is not None:
                gone._fired = tuple(f for f in gone._fired
                                    if f != (timer.rule_index, timer.due))
            return
        if (timer.rule_index, timer.due) not in state._fired:
            return
        state._fired = tuple(f for f in state._fired if f != (timer.rule_index, timer.due))
        if self._due[timer.rule_index](state) == timer.due:
            self.armed += 1
            entry = (timer.due, timer.rule_index, state._key)
            state._queued = tuple(sorted(state._queued + (entry,)))
            heapq.heappush(self._heap, entry)

    def settle(self, table: str, key: str) -> None:
        """Forget a row that owes nothing more, once its last action is done."""
        ts = self.tables.get(table)
        state = ts.rows.get(key) if ts is not None else None
        if state is not None and not state._queued:
            self._forget(ts, key, state)

    # -- deciding ------------------------------------------------------------------

    def holds(self, timer: Timer, state: RowState) -> bool:
        """The guard: does the timer's rule still apply, with the same due, to `state`?"""
        return self._due[timer.rule_index](state) == timer.due

    def decide(self, timer: Timer, state: RowState, fired_at: Instant) -> Decision:
        rule = timer.rule
        lateness = fired_at - timer.due
        if rule.lateness is Lateness.SKIP_PAST_QUARTER:
            # Reminders answer only to this limit, not to MAX_NOTIFY_LATENESS.
            if lateness * 4 > abs(rule.offset):
                return Decision(timer, fired_at, Outcome.SKIPPED, (), "too late to remind")
        elif lateness > self.max_notify_lateness:
            return Decision(timer, fired_at, Outcome.LATE, (),
                            "past MAX_NOTIFY_LATENESS: no email")
        recipients = self._recipients[timer.rule_index]
        if recipients is not None:
            return Decision(timer, fired_at, Outcome.FIRED, recipients)
        recipients = []
        table = self._rule_table[timer.rule_index].table
        for role in rule.notify:
            if role.endswith("?"):
                bare = role[:-1]
                sources = table.recipients[bare].sources
                if any(getattr(state, s.column, None) for s in sources if s.column):
                    recipients.append(bare)
            else:
                recipients.append(role)
        return Decision(timer, fired_at, Outcome.FIRED, tuple(recipients))

    # -- inspection ------------------------------------------------------------------

    def upcoming(self) -> Iterator[tuple[Instant, Rule, str, str]]:
        """Every pending episode, soonest first: (due, rule, table, key)."""
        items = [(due, index, key) for ts in self.tables.values()
                 for key, state in ts.rows.items() for index, due in self.pending(ts, state)]
        items.sort()
        for due, index, key in items:
            yield due, self.rules[index], self._rule_table[index].name, key

    def _compact(self) -> None:
        # Obsolete entries normally drain as they come due; a row whose far-future
        # deadline moves often would grow the heap without bound, so _arm
        # rebuilds it past four times the armed episodes, of each row's soonest.
        self._heap = [state._queued[0] for ts in self.tables.values()
                      for state in ts.rows.values() if state._queued]
        heapq.heapify(self._heap)


__all__ = ["Applied", "BadRow", "Decision", "Engine", "Timer", "UnknownValue"]
