"""The slice of a row that the rules look at, parsed defensively, for any table.

Rows arrive from replay files, NOTIFY payloads, Realtime frames and RPC
results; any of them may carry garbage. A row without a usable key or status
is rejected (BadRow); a bad column is read as null and reported, so one bad
column never takes the daemon, or the rest of the row, down.

Memory per tracked row matters (a million of them under 1 GB): each table gets
a class with one slot per column its rules read, instants are integers, a
column a rule only tests for null is kept as True or None, and repeated
strings (statuses, plans) are interned.
"""
from __future__ import annotations

import enum
import keyword
import sys
from typing import Any, Mapping

from listener.instants import BadInstant, Instant, instant_of_text, parse_instant
# parse_instant's memo of text -> instant (pure, so reading it is always safe).
from listener.rules.model import Rule, Table
from listener.rules.query import STATUS_CHANGED_AT, optional_columns

MAX_KEY_LENGTH = 200


class BadRow(ValueError):
    pass


class ColumnKind(enum.Enum):
    INSTANT = "instant"  # an anchor: parsed to microseconds
    VALUE = "value"  # looked up in a map: kept (interned when text)
    PRESENCE = "presence"  # only tested for null: kept as True or None


class RowState:
    """Base of the per-table state classes; the subclasses add one slot per column."""

    # _queued: the heap entries (due, rule index, key) of the episodes this state
    # owes, as the engine armed them; _fired: the (rule index, due) episodes done.
    __slots__ = ("_key", "_version", "_fired", "_queued")
    COLUMNS: tuple[str, ...] = ()

    def same_facts(self, other: RowState) -> bool:
        """Equal in everything a rule reads (the version may differ)."""
        return all(getattr(self, c) == getattr(other, c) for c in self.COLUMNS)

    def __repr__(self) -> str:
        facts = ", ".join(f"{c}={getattr(self, c)!r}" for c in self.COLUMNS)
        return f"{type(self).__name__}(key={self._key!r}, {facts}, version={self._version!r})"


def key_text(value: Any) -> str | None:
    """A key as text: strings as they are, integers in decimal; else None."""
    if type(value) is str:
        return value if 0 < len(value) <= MAX_KEY_LENGTH else None
    if type(value) is int:
        return str(value)
    return None


class RowCodec:
    """Parses rows of one table into its compact state class."""

    def __init__(self, table: Table, rules: list[Rule]) -> None:
        self.table = table
        self.key = table.key
        self.status = table.status
        kinds: dict[str, ColumnKind] = {table.status: ColumnKind.VALUE}
        # Ordered (dicts, not sets), so the slots and the order a row's problems
        # are reported in are the same in every process, whatever the hash seed.
        instants: dict[str, None] = {}
        values: dict[str, None] = {}
        for rule in rules:
            for anchor in rule.anchor:
                derived = table.derived.get(anchor)
                if derived is None:
                    instants[anchor] = None
                else:
                    instants[derived.start] = None
                    values.update(dict.fromkeys(t.column for t in derived.lookups))
        for rule in rules:
            for column in (*rule.present, *rule.absent, *optional_columns(rule, table)):
                if column not in table.derived:
                    kinds.setdefault(column, ColumnKind.PRESENCE)
        for column in values:
            kinds[column] = ColumnKind.VALUE
        for column in instants:
            kinds[column] = ColumnKind.INSTANT
        kinds[table.status] = ColumnKind.VALUE
        self.kinds = kinds
        self.columns = tuple(kinds)
        self.stamps_status = STATUS_CHANGED_AT in kinds
        bad = [c for c in self.columns if c.startswith("_") or not c.isidentifier()]
        if bad:
            raise ValueError(f"table {table.name}: column names {bad} cannot be read")
        self.state_class: type[RowState] = type(
            f"{table.name.title().replace('_', '')}State", (RowState,),
            {"__slots__": self.columns, "COLUMNS": self.columns})
        self._instants = tuple(c for c in self.columns
                               if kinds[c] is ColumnKind.INSTANT and c != STATUS_CHANGED_AT)
        self._values = tuple(c for c in self.columns
                             if kinds[c] is ColumnKind.VALUE and c != table.status)
        self._presence = tuple(c for c in self.columns if kinds[c] is ColumnKind.PRESENCE)
        self.parse_keyed = self._compile_parse()

    def key_of(self, row: Any) -> str:
        if type(row) is not dict and not isinstance(row, Mapping):
            raise BadRow("row is not an object")
        key = key_text(row.get(self.key))
        if key is None:
            raise BadRow(f"row has no usable {self.key} ({row.get(self.key)!r:.60})")
        return key

    def parse(self, row: Mapping[str, Any], previous: RowState | None,
              at: Instant | None) -> tuple[RowState, list[str]]:
        """The state of a row, and the problems found in it.

        `status_changed_at` missing from the row (a replay log, a row from
        before the migration) is inferred: unchanged while the status is,
        otherwise the instant of the change, `at`.
        """
        return self.parse_keyed(row, self.key_of(row), previous, at)

    def _compile_parse(self) -> Any:
        """`parse_keyed(row, key, previous, at)`: `parse` for a row whose key is
        already read, as straight-line code with one step per column.

        Every change of every watched row goes through here, and a loop of
        setattr over the columns cost more than the rest of the engine's work on
        a change. Only column names checked as identifiers reach the source.
        """
        namespace: dict[str, Any] = {
            "NEW": self.state_class, "BadRow": BadRow, "BadInstant": BadInstant,
            "PARSE": parse_instant, "TEXT": instant_of_text, "INTERN": sys.intern,
            "SCALARS": (int, float, bool), "CHANGED_AT": self._changed_at}

        def assign(column: str, value: str) -> str:
            if keyword.iskeyword(column):
                return f"setattr(s, {column!r}, {value})"
            return f"s.{column} = {value}"

        status = self.status
        lines = [
            "def parse_keyed(row, key, previous, at):",
            f"    status = row.get({status!r})",
            "    if type(status) is not str or not status:",
            f"        raise BadRow(f'row {{key}} has no usable {status} ({{status!r:.60}})')",
            "    s = NEW()",
            "    s._key = previous._key if previous is not None else key",
            "    s._fired = ()",
            "    s._queued = ()",
            "    v = row.get('_version')",
            "    s._version = v if type(v) is str else None",
            "    " + assign(status, "INTERN(status)"),
            "    problems = []",
        ]
        for column in self._instants:
            lines += [
                f"    v = row.get({column!r})",
                "    if v is not None:",
                "        try:",
                # Text (nearly always) straight to the remembering parser.
                "            v = TEXT(v) if type(v) is str else PARSE(v)",
                "        except BadInstant as exc:",
                f"            problems.append(f'{column}: {{exc}}')",
                "            v = None",
                "    " + assign(column, "v")]
        for column in self._values:
            lines += [
                f"    v = row.get({column!r})",
                "    if type(v) is str:",
                "        if len(v) <= 64: v = INTERN(v)",
                "    elif v is not None and type(v) not in SCALARS:",
                f"        problems.append(f'{column}: not a scalar ({{v!r:.60}})')",
                "        v = None",
                "    " + assign(column, "v")]
        for column in self._presence:
            lines.append("    " + assign(column, f"None if row.get({column!r}) is None else True"))
        if self.stamps_status:
            # The row's own stamp, when it reads (nearly always: the trigger or the
            # memory store sets it), without the call; the rest of the inference
            # (and the problem of a stamp that does not read) in CHANGED_AT.
            lines += [
                f"    v = row.get({STATUS_CHANGED_AT!r})",
                "    w = None",
                "    if type(v) is str:",
                "        try:",
                "            w = TEXT(v)",
                "        except BadInstant:",
                "            pass",
                "    " + assign(STATUS_CHANGED_AT,
                               "w if w is not None else CHANGED_AT(row, previous, status, at, "
                               "problems)")]
        lines.append("    return s, problems")
        exec("\n".join(lines), namespace)  # noqa: S102 - source built from checked names only
        return namespace["parse_keyed"]

    def _changed_at(self, row: Mapping[str, Any], previous: RowState | None, status: str,
                    at: Instant | None, problems: list[str]) -> Instant | None:
        changed_at = row.get(STATUS_CHANGED_AT)
        if changed_at is not None:
            try:
                return parse_instant(changed_at)
            except BadInstant as exc:
                problems.append(f"{STATUS_CHANGED_AT}: {exc}")
        if previous is not None and getattr(previous, self.status) == status:
            changed_at = previous.status_changed_at  # type: ignore[attr-defined]
            if changed_at is not None:
                return changed_at
        if at is not None:
            return at
        for column in ("updated_at", "created_at"):
            try:
                value = parse_instant(row.get(column))
            except BadInstant:
                continue
            if value is not None:
                return value
        return None


class ChildCodec:
    """Rows of a table read only for a parent's sum: key, parent key, values."""

    def __init__(self, table: str, key: str, by: str, columns: tuple[str, ...]) -> None:
        self.table = table
        self.key = key
        self.by = by
        self.columns = columns

    def key_of(self, row: Any) -> str:
        if not isinstance(row, Mapping):
            raise BadRow("row is not an object")
        key = key_text(row.get(self.key))
        if key is None:
            raise BadRow(f"row has no usable {self.key} ({row.get(self.key)!r:.60})")
        return key

    def parse(self, row: Mapping[str, Any]) -> tuple[str, str | None, tuple[float, ...],
                                                     list[str]]:
        """(key, parent key or None, one number per summed column, problems)."""
        key = self.key_of(row)
        problems: list[str] = []
        parent = key_text(row.get(self.by))
        if parent is None and row.get(self.by) is not None:
            problems.append(f"{self.by}: not a key ({row.get(self.by)!r:.60})")
        numbers = []
        for column in self.columns:
            value = row.get(column)
            if value is None:
                numbers.append(0)
            elif type(value) in (int, float) and value == value and abs(value) < 1e9:
                numbers.append(value)
            else:
                problems.append(f"{column}: not a number ({value!r:.60})")
                numbers.append(0)
        return key, parent, tuple(numbers), problems
