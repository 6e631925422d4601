"""The rules, as the database functions take them: one derivation per table.

The sweep (tracked rows), the incremental read, `audit` (overdue rows) and the
change triggers all ask the same question of a table: which columns do the
rules read, and which rows can owe an action. This module answers it once, as
plain JSON the SQL functions interpret (table and column names are quoted
there with format('%I'); no SQL text is built here).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from listener.rules.model import Derived, Lateness, Rule, RuleSet, Table

STATUS_CHANGED_AT = "status_changed_at"


@dataclass(frozen=True)
class TableQuery:
    table: str
    key: str
    status: str | None  # None for a child table
    columns: tuple[str, ...]  # real columns read, key first
    conditions: tuple[dict[str, Any], ...]  # one per enabled rule of the table
    parent: dict[str, str] | None = None  # child tables: {"table", "by"}
    # Whether a rule anchors on the instant the row entered its status, so the
    # table needs the status_changed_at column and its trigger.
    stamps_status: bool = False

    def as_json(self) -> dict[str, Any]:
        return {"table": self.table, "key": self.key, "status": self.status,
                "columns": list(self.columns), "conditions": list(self.conditions),
                "parent": self.parent, "stamps_status": self.stamps_status}


def anchor_json(table: Table, anchor: str, maps: dict[str, dict[str, float]]) -> dict[str, Any]:
    derived = table.derived.get(anchor)
    if derived is None:
        return {"column": anchor}
    return {"derived": derived_json(derived, maps)}


def derived_json(derived: Derived, maps: dict[str, dict[str, float]]) -> dict[str, Any]:
    return {
        "start": derived.start,
        "lookups": [{"column": t.column, "map": dict(maps.get(t.map, {})), "unit_us": t.unit}
                    for t in derived.lookups],
        "sums": [{"table": t.table, "column": t.column, "by": t.by, "unit_us": t.unit}
                 for t in derived.sums],
    }


def horizon(rule: Rule, max_notify_lateness: int) -> int | None:
    """How far back an anchor may lie and the rule still owe an effect; None
    when any age can (a status change or column set or webhook applies late too).

    An email-only rule more than its lateness limit late is recorded without
    effect, so a sweep need not load rows whose anchors are all older than
    now - horizon (a first deployment would otherwise reload years of history).
    """
    if rule.set_status or rule.webhook:
        return None
    if rule.lateness is Lateness.SKIP_PAST_QUARTER:
        # Skipped altogether when that late: its column sets do not apply either.
        limit = abs(rule.offset) // 4
    elif rule.set_columns:
        return None
    else:
        limit = max_notify_lateness
    # One minute of margin for sweeps that run a little late.
    return limit + rule.offset + 60_000_000


def condition_json(rule: Rule, table: Table, maps: dict[str, dict[str, float]],
                   max_notify_lateness: int) -> dict[str, Any]:
    return {
        "rule": rule.name,
        "statuses": sorted(rule.statuses),
        "present": [c for c in rule.present if c not in table.derived],
        "absent": [c for c in rule.absent if c not in table.derived],
        "anchors": [anchor_json(table, a, maps) for a in rule.anchor],
        "offset_us": rule.offset,
        "horizon_us": horizon(rule, max_notify_lateness),
    }


def rule_columns(rule: Rule, table: Table) -> list[str]:
    """The real columns a rule needs (derived anchors expand to their inputs)."""
    out: list[str] = []
    for column in rule.columns:
        derived = table.derived.get(column)
        out.extend(derived.columns() if derived is not None else (column,))
    return out


def optional_columns(rule: Rule, table: Table) -> list[str]:
    """Columns read where they exist: the recipients of "role?" (is there one?),
    and for a rule with a webhook every recipient column (whose row it is)."""
    out: list[str] = []
    for role in rule.notify:
        if role.endswith("?") and role[:-1] in table.recipients:
            out += [s.column for s in table.recipients[role[:-1]].sources if s.column]
    if rule.webhook:
        out += [s.column for r in table.recipients.values() for s in r.sources if s.column]
    return out


def table_queries(ruleset: RuleSet, max_notify_lateness: int,
                  available: dict[str, set[str]] | None = None) -> dict[str, TableQuery]:
    """One TableQuery per watched table: rule tables in table order, then child tables.

    `available` (table -> columns the database has), when known, drops optional
    columns the database lacks; the rules that need a missing column are made
    inactive before this is called.
    """
    maps = {name: dict(values) for name, values in ruleset.maps.items()}
    out: dict[str, TableQuery] = {}
    for name in ruleset.rule_tables():
        table = ruleset.tables[name]
        rules = [r for r in ruleset.rules if r.table == name]
        columns = [table.key, table.status]
        for rule in rules:
            columns += rule_columns(rule, table)
        have = None if available is None else available.get(name)
        for rule in rules:
            columns += [c for c in optional_columns(rule, table) if have is None or c in have]
        columns += [c for c in table.show if have is None or c in have]
        out[name] = TableQuery(
            name, table.key, table.status, tuple(dict.fromkeys(columns)),
            tuple(condition_json(r, table, maps, max_notify_lateness) for r in rules),
            stamps_status=any(STATUS_CHANGED_AT in rule_columns(r, table) for r in rules))
    for child, uses in ruleset.child_tables().items():
        if child in out:
            continue
        parent, term = uses[0]
        declared = ruleset.tables.get(child)
        key = declared.key if declared is not None else "id"
        columns = [key] + [c for _, t in uses for c in (t.by, t.column)]
        out[child] = TableQuery(child, key, None, tuple(dict.fromkeys(columns)), (),
                                parent={"table": parent, "by": term.by})
    return out
