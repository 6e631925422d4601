"""What a rule file declares, as typed values.

Rules are data: a condition on a row, an anchor and a signed offset (its due
instant), what it does, and how it behaves when it fires late. Tables say which
column is the key and which the status, which derived instants they offer (a
start plus a looked-up duration plus a sum over child rows) and who the
recipients are. The loader builds these from TOML; the engine, the SQL layer,
`audit` and `report` all read them, so nothing else restates a rule.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterator, Mapping

from listener.instants import format_duration


class Lateness(str, enum.Enum):
    """How a rule that fires after its due instant behaves."""

    # Past MAX_NOTIFY_LATENESS: still change the status and call the webhook, send no email.
    NOTIFY_LIMIT = "notify_limit"
    # Past a quarter of its offset: do nothing (a reminder that late misleads).
    SKIP_PAST_QUARTER = "skip_past_quarter"


class Outcome(str, enum.Enum):
    """What became of one action: its ledger state once finished."""

    FIRED = "fired"
    LATE = "late"  # status change (and webhook) only: too late to email
    SKIPPED = "skipped"
    FAILED = "failed"


class RecipientKind(str, enum.Enum):
    """How a recipient column resolves to an address."""

    USER = "user"  # an auth user id: auth.users.email, profiles.full_name
    MECHANIC = "mechanic"  # public.mechanics.id: mechanics.email, mechanics.name
    SUPPORT = "support"  # SUPPORT_EMAIL, no column


@dataclass(frozen=True, slots=True)
class RecipientSource:
    kind: RecipientKind
    column: str | None = None  # None for support

    def text(self) -> str:
        return self.kind.value if self.column is None else f"{self.kind.value}:{self.column}"


@dataclass(frozen=True, slots=True)
class Recipient:
    """A role a rule may email; the first source with a value wins."""

    role: str
    sources: tuple[RecipientSource, ...]


@dataclass(frozen=True, slots=True)
class LookupTerm:
    """A duration read through a map: `map[row.column] * unit`. A value the map
    lacks makes the derived instant unknown (never guessed)."""

    column: str
    map: str
    unit: int  # microseconds per map unit, after time scaling


@dataclass(frozen=True, slots=True)
class SumTerm:
    """The sum of `column` over rows of `table` whose `by` column is this row's
    key, times `unit`. No child rows: zero."""

    table: str
    column: str
    by: str
    unit: int


@dataclass(frozen=True, slots=True)
class Derived:
    """A derived instant a rule may anchor on: `start + lookup + sums`."""

    name: str
    start: str
    lookups: tuple[LookupTerm, ...] = ()
    sums: tuple[SumTerm, ...] = ()

    def columns(self) -> tuple[str, ...]:
        return (self.start, *(t.column for t in self.lookups))

    def describe(self) -> str:
        parts = [self.start]
        parts += [f"{t.map}[{t.column}]" for t in self.lookups]
        parts += [f"sum({t.table}.{t.column})" for t in self.sums]
        return " + ".join(parts)


@dataclass(frozen=True, slots=True)
class Table:
    """A table rules read: its key, its status column, what it offers rules."""

    name: str
    key: str = "id"
    status: str = "status"
    # Statuses the app writes; a row in any other is logged once and treated as
    # terminal. Empty: every status is taken as it comes.
    known_statuses: frozenset[str] = frozenset()
    derived: Mapping[str, Derived] = field(default_factory=dict)
    recipients: Mapping[str, Recipient] = field(default_factory=dict)
    # Where the app keeps this table's timeline (one row per action), if it has one.
    timeline: str | None = None
    # The app page a row's emails link to, with {key} for the row's key.
    link: str | None = None
    label: str | None = None  # how emails name a row of this table ("session", "reservation")
    # Columns emails show (read where they exist; no rule reads them).
    show: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    table: str
    statuses: frozenset[str]
    present: tuple[str, ...]  # columns that must be non-null
    absent: tuple[str, ...]  # columns that must be null
    # The due instant is max(non-null anchors) + offset; an anchor is a column
    # or the name of one of the table's derived instants.
    anchor: tuple[str, ...]
    offset: int  # signed microseconds, after overrides and time scaling
    set_status: str | None = None
    reason: str | None = None
    # Other columns set in the same compare-and-set (the app's reminder flags).
    set_columns: Mapping[str, object] = field(default_factory=dict)
    notify: tuple[str, ...] = ()  # roles; "<role>?" means "if the row has one"
    webhook: str | None = None  # event name the app is told
    event: str | None = None  # the timeline event name
    lateness: Lateness = Lateness.NOTIFY_LIMIT
    enabled: bool = True
    pack: str = ""  # the pack or file it came from
    description: str = ""

    @property
    def env_name(self) -> str:
        return "RULE_" + self.name.upper()

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column (or derived name) the rule reads."""
        return tuple(dict.fromkeys((*self.present, *self.absent, *self.anchor)))

    def describe_when(self) -> str:
        statuses = sorted(self.statuses)
        parts = []
        if statuses:
            parts.append(f"status = {statuses[0]}" if len(statuses) == 1
                         else "status in {" + ", ".join(statuses) + "}")
        parts += [f"{c} set" for c in self.present]
        parts += [f"{c} null" for c in self.absent]
        return ", ".join(parts) or "always"

    def describe_due(self) -> str:
        anchor = self.anchor[0] if len(self.anchor) == 1 else f"max({', '.join(self.anchor)})"
        if self.offset == 0:
            return anchor
        sign = "+" if self.offset > 0 else "-"
        return f"{anchor} {sign} {format_duration(abs(self.offset))}"

    def describe_actions(self) -> str:
        parts = []
        if self.set_status:
            parts.append(f"set status {self.set_status} ({self.reason})")
        if self.set_columns:
            parts.append("set " + ", ".join(self.set_columns))
        if self.notify:
            roles = [r[:-1] + " if assigned" if r.endswith("?") else r for r in self.notify]
            parts.append("email " + ", ".join(roles))
        if self.webhook:
            parts.append(f"webhook {self.webhook}")
        return "; ".join(parts) or "none"


@dataclass(frozen=True)
class RuleSet:
    """The effective rules of every pack and file, in table order."""

    tables: Mapping[str, Table]
    all_rules: tuple[Rule, ...]  # as configured, disabled ones included
    maps: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    time_scale: float = 1.0

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.all_rules if r.enabled)

    def __iter__(self) -> Iterator[Rule]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def by_name(self, name: str) -> Rule:
        for rule in self.all_rules:
            if rule.name == name:
                return rule
        raise KeyError(name)

    def rule_tables(self) -> tuple[str, ...]:
        """Tables enabled rules read, in table order."""
        return tuple(dict.fromkeys(r.table for r in self.rules))

    def child_tables(self) -> dict[str, list[tuple[str, SumTerm]]]:
        """Tables read only as sums of a parent's derived instant: child table ->
        [(parent table, term)], for the rules in use."""
        out: dict[str, list[tuple[str, SumTerm]]] = {}
        for table in self.rule_tables():
            used = {a for r in self.rules if r.table == table for a in r.anchor}
            for name, derived in self.tables[table].derived.items():
                if name in used:
                    for term in derived.sums:
                        out.setdefault(term.table, []).append((table, term))
        return out

    def watched_tables(self) -> tuple[str, ...]:
        """Every table whose changes matter: rule tables, then child tables."""
        return tuple(dict.fromkeys((*self.rule_tables(), *self.child_tables())))
