"""Which rules can run on this database, from its catalogue.

A rule whose table or columns are missing, or whose status change the table's
CHECK constraint would reject, is inactive there: logged once at start,
reported by `listener rules` and `audit`, never a failing update in a loop.
A table whose declared key is not its primary key is a start-up error: the
ledger and every compare-and-set go by that key.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from listener.rules.model import Rule, RuleSet
from listener.rules.query import STATUS_CHANGED_AT, rule_columns

_LITERAL = re.compile(r"'((?:[^']|'')*)'::")
# A CHECK that is an allow-list of one column: `col = ANY (ARRAY['a'::text, ...])`
# or `col IN (...)`, nothing else. Other constraints (conditions over several
# columns) say nothing certain about which statuses a row may take.
_ALLOW_LIST = re.compile(
    r'^CHECK \(+\(?"?(?P<column>\w+)"?\)?(?:::[\w ]+)? = ANY \(+ARRAY\[(?P<values>.*)\]'
    r'(?:::[\w ]+\[\])?\)+$')


class ActivationError(ValueError):
    """The database cannot serve the rules as declared (a key that is not the
    primary key); the message names the table."""


@dataclass(frozen=True)
class TableInfo:
    exists: bool
    key: tuple[str, ...] = ()  # primary key columns
    columns: Mapping[str, str] = field(default_factory=dict)  # name -> type
    checks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # column -> CHECK defs

    @classmethod
    def from_json(cls, raw: Mapping[str, Any] | None) -> "TableInfo":
        if not raw or not raw.get("exists"):
            return cls(False)
        checks = raw.get("checks") or {}
        return cls(True, tuple(raw.get("key") or raw.get("primary_key") or ()),
                   dict(raw.get("columns") or {}),
                   {c: tuple(defs) for c, defs in checks.items()})

    def allowed_values(self, column: str) -> set[str] | None:
        """The literal values the CHECK constraints on `column` allow; None when
        no constraint lists values (anything goes)."""
        allowed: set[str] | None = None
        for definition in self.checks.get(column, ()):
            match = _ALLOW_LIST.match(definition.strip())
            if match is None or match.group("column") != column \
                    or re.search(r"\b(AND|OR)\b", match.group("values")):
                continue
            values = {v.replace("''", "'") for v in _LITERAL.findall(match.group("values"))}
            if values:
                allowed = values if allowed is None else allowed & values
        return allowed


@dataclass(frozen=True)
class Activation:
    ruleset: RuleSet  # inactive rules disabled
    inactive: dict[str, str]  # rule -> why
    available: dict[str, set[str]]  # table -> its columns
    missing_tables: tuple[str, ...] = ()


def activate(ruleset: RuleSet, catalog: Mapping[str, TableInfo]) -> Activation:
    inactive: dict[str, str] = {}
    for name in ruleset.watched_tables():
        info = catalog.get(name)
        table = ruleset.tables.get(name)
        if info is None or not info.exists or table is None:
            continue
        if info.key and info.key != (table.key,):
            raise ActivationError(
                f"table {name}: the rules key it by {table.key}, but its primary key is "
                f"({', '.join(info.key)}): declare key = \"{info.key[0]}\" or fix the rules")
        if not info.key:
            raise ActivationError(f"table {name} has no primary key: the listener needs one "
                                  "to claim each row's actions once")
    rules = []
    for rule in ruleset.all_rules:
        why = _why_inactive(rule, ruleset, catalog) if rule.enabled else None
        if why is not None:
            inactive[rule.name] = why
            rule = replace(rule, enabled=False)
        rules.append(rule)
    missing = tuple(t for t in ruleset.watched_tables()
                    if not (catalog.get(t) and catalog[t].exists))
    tables = dict(ruleset.tables)
    # A missing child table counts as no children: the plan end is the plan alone.
    for name, table in ruleset.tables.items():
        if any(t.table in missing for d in table.derived.values() for t in d.sums):
            tables[name] = replace(table, derived={
                dname: replace(d, sums=tuple(t for t in d.sums if t.table not in missing))
                for dname, d in table.derived.items()})
    active = replace(ruleset, all_rules=tuple(rules), tables=tables)
    available = {name: set(info.columns) for name, info in catalog.items() if info.exists}
    return Activation(active, inactive, available, missing)


def _why_inactive(rule: Rule, ruleset: RuleSet, catalog: Mapping[str, TableInfo]) -> str | None:
    info = catalog.get(rule.table)
    if info is None or not info.exists:
        return f"table {rule.table} does not exist"
    table = ruleset.tables[rule.table]
    needed = [table.key, table.status, *rule_columns(rule, table)]
    for column in dict.fromkeys(needed):
        if column not in info.columns and column != STATUS_CHANGED_AT:
            return f"column {rule.table}.{column} does not exist"
    allowed = info.allowed_values(table.status)
    if allowed is not None and rule.statuses and not rule.statuses & allowed:
        return (f"it applies to {', '.join(sorted(rule.statuses))}, which the CHECK "
                f"constraint of {rule.table}.{table.status} never allows")
    if rule.set_status is not None:
        if allowed is not None and rule.set_status not in allowed:
            return (f"status {rule.set_status!r} is rejected by the CHECK constraint of "
                    f"{rule.table}.{table.status}")
    return None
