"""Rule files (TOML) to the effective RuleSet.

The shipped packs come first (sessions, then the others by name), then every
file of RULES_FILE / --rules in order. A rule whose name is already known
replaces it in place; an entry of only `name` and `enabled` switches a known
rule on or off; any other new rule comes after every shipped one. Then the
environment: RULE_<NAME> sets the size of a rule's offset (keeping its sign)
or switches it off/on, PLAN_MINUTES-style variables replace a map, and
RULES_TIME_SCALE divides every duration a rule adds to an anchor.

Every error names the file, the rule (or table) and what is wrong.
"""
from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from listener.instants import DURATION_FORMS, parse_duration
from listener.rules.model import (
    Derived, Lateness, LookupTerm, Recipient, RecipientKind, RecipientSource, Rule, RuleSet,
    SumTerm, Table)
from listener.rules.query import STATUS_CHANGED_AT

NAME = re.compile(r"^[a-z0-9_]+$")
IDENTIFIER = re.compile(r"^[a-z][a-z0-9_]*$")
SUPPORT = "support"

TOP_KEYS = {"tables", "maps", "rule"}
TABLE_KEYS = {"key", "status", "known_statuses", "derived", "recipients", "timeline", "link",
              "label", "columns", "show"}
DERIVED_KEYS = {"start", "lookup", "sum"}
LOOKUP_KEYS = {"column", "map", "unit"}
SUM_KEYS = {"table", "column", "by", "unit"}
MAP_KEYS = {"env", "values"}
RULE_KEYS = {"name", "table", "statuses", "present", "absent", "anchor", "offset", "set_status",
             "reason", "set", "notify", "webhook", "event", "lateness", "enabled",
             "description"}
TOGGLE_KEYS = {"name", "enabled"}
SESSIONS_PACK = "sessions"


class RuleConfigError(ValueError):
    """A bad rule file or RULE_* / RULES_TIME_SCALE / map variable; the message
    names where."""


@dataclass
class _Map:
    env: str | None
    values: dict[str, float]


def _fail(where: str, problem: str) -> RuleConfigError:
    return RuleConfigError(f"{where}: {problem}")


def _strings(value: Any, where: str, what: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(where, f"{what} must be a list of strings")
    return tuple(value)


def _identifier(value: Any, where: str, what: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise _fail(where, f"{what} {value!r} is not a column name ([a-z][a-z0-9_]*)")
    return value


def _unknown(keys: Iterable[str], allowed: set[str], where: str) -> None:
    extra = sorted(set(keys) - allowed)
    if extra:
        raise _fail(where, f"unknown key {extra[0]!r} (allowed: {', '.join(sorted(allowed))})")


def signed_duration(text: Any, where: str) -> int:
    """'-24h' -> microseconds; '+3m' and '3m' alike."""
    if not isinstance(text, str):
        raise _fail(where, f"offset must be a string such as \"3m\" or \"-24h\", not {text!r}")
    body = text.strip()
    sign = -1 if body.startswith("-") else 1
    body = body.lstrip("+-")
    try:
        return sign * (0 if body == "0" else parse_duration(body))
    except ValueError:
        raise _fail(where, f"offset {text!r} is not a duration: use an optional sign (+ or -) "
                           f"and {DURATION_FORMS}".replace(", or off", "")) from None


def _unit(text: Any, where: str) -> int:
    if not isinstance(text, str):
        raise _fail(where, f"unit must be a duration string such as \"1m\", not {text!r}")
    try:
        return parse_duration(text)
    except ValueError:
        raise _fail(where, f"unit {text!r} is not a duration") from None


class _Builder:
    """Accumulates tables, maps and rules across files, in table order."""

    def __init__(self) -> None:
        self.tables: dict[str, Table] = {}
        self.table_columns: dict[str, set[str] | None] = {}
        self.maps: dict[str, _Map] = {}
        self.rules: list[Rule] = []
        self.shipped: set[str] = set()

    # -- one file ------------------------------------------------------------------

    def add_file(self, label: str, text: str, shipped: bool, pack: str) -> None:
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise _fail(label, f"not valid TOML ({exc})") from None
        _unknown(doc, TOP_KEYS, label)
        for name, raw in (doc.get("maps") or {}).items():
            self._add_map(label, name, raw)
        tables = doc.get("tables") or {}
        if not isinstance(tables, dict):
            raise _fail(label, "[tables] must be a table of tables")
        for name, raw in tables.items():
            self._add_table(label, name, raw)
        entries = doc.get("rule") or []
        if not isinstance(entries, list):
            raise _fail(label, "rules are [[rule]] entries")
        seen: set[str] = set()
        for number, raw in enumerate(entries, 1):
            where = f"{label}: rule #{number}"
            if not isinstance(raw, dict):
                raise _fail(where, "must be a table")
            name = raw.get("name")
            if not isinstance(name, str) or not NAME.match(name):
                raise _fail(where, f"name {name!r} must match [a-z0-9_]+")
            where = f"{label}: rule {name}"
            if name in seen:
                raise _fail(where, "defined twice in this file")
            seen.add(name)
            self._add_rule(where, raw, pack, shipped)

    def _add_map(self, label: str, name: str, raw: Any) -> None:
        where = f"{label}: map {name}"
        if not isinstance(raw, dict):
            raise _fail(where, "must be a table")
        _unknown(raw, MAP_KEYS, where)
        values = raw.get("values") or {}
        if not isinstance(values, dict) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
                for v in values.values()):
            raise _fail(where, "values must map keys to non-negative numbers")
        env = raw.get("env")
        if env is not None and (not isinstance(env, str) or not re.match(r"^[A-Z][A-Z0-9_]*$", env)):
            raise _fail(where, f"env {env!r} must be an environment variable name")
        self.maps[name] = _Map(env, {str(k): float(v) for k, v in values.items()})

    def _add_table(self, label: str, name: str, raw: Any) -> None:
        where = f"{label}: table {name}"
        _identifier(name, where, "table")
        if not isinstance(raw, dict):
            raise _fail(where, "must be a table")
        _unknown(raw, TABLE_KEYS, where)
        key = _identifier(raw.get("key", "id"), where, "key")
        status = _identifier(raw.get("status", "status"), where, "status")
        columns = None
        if "columns" in raw:
            columns = {_identifier(c, where, "column") for c in _strings(raw["columns"], where, "columns")}
            # status_changed_at is the listener's own column, kept on every table it reads.
            columns |= {key, status, STATUS_CHANGED_AT}
        derived: dict[str, Derived] = {}
        for dname, draw in (raw.get("derived") or {}).items():
            derived[dname] = self._derived(f"{where}: derived {dname}", dname, draw)
        recipients: dict[str, Recipient] = {}
        for role, rraw in (raw.get("recipients") or {}).items():
            recipients[role] = self._recipient(f"{where}: recipient {role}", role, rraw)
        for text_key in ("timeline", "link", "label"):
            if text_key in raw and not isinstance(raw[text_key], str):
                raise _fail(where, f"{text_key} must be a string")
        previous = self.tables.get(name)
        table = Table(
            name, key, status,
            frozenset(_strings(raw.get("known_statuses", []), where, "known_statuses")),
            {**(previous.derived if previous else {}), **derived},
            {**(previous.recipients if previous else {}), **recipients},
            raw.get("timeline", previous.timeline if previous else None),
            raw.get("link", previous.link if previous else None),
            raw.get("label", previous.label if previous else None),
            tuple(_identifier(c, where, "show column")
                  for c in _strings(raw.get("show", []), where, "show"))
            or (previous.show if previous else ()))
        if previous is not None and (previous.key, previous.status) != (key, status) \
                and ("key" in raw or "status" in raw):
            raise _fail(where, f"redeclares key/status ({previous.key}, {previous.status})")
        if previous is not None and "known_statuses" not in raw:
            table = replace(table, known_statuses=previous.known_statuses)
        self.tables[name] = table
        self.table_columns[name] = columns if columns is not None \
            else self.table_columns.get(name)

    def _derived(self, where: str, name: str, raw: Any) -> Derived:
        _identifier(name, where, "derived name")
        if not isinstance(raw, dict):
            raise _fail(where, "must be a table")
        _unknown(raw, DERIVED_KEYS, where)
        start = _identifier(raw.get("start"), where, "start")
        lookups, sums = [], []
        for term in raw.get("lookup") or []:
            if not isinstance(term, dict):
                raise _fail(where, "lookup terms are tables")
            _unknown(term, LOOKUP_KEYS, where + ": lookup")
            lookups.append(LookupTerm(_identifier(term.get("column"), where, "lookup column"),
                                      str(term.get("map")), _unit(term.get("unit", "1m"), where)))
        for term in raw.get("sum") or []:
            if not isinstance(term, dict):
                raise _fail(where, "sum terms are tables")
            _unknown(term, SUM_KEYS, where + ": sum")
            sums.append(SumTerm(_identifier(term.get("table"), where, "sum table"),
                                _identifier(term.get("column"), where, "sum column"),
                                _identifier(term.get("by"), where, "sum by"),
                                _unit(term.get("unit", "1m"), where)))
        return Derived(name, start, tuple(lookups), tuple(sums))

    @staticmethod
    def _recipient(where: str, role: str, raw: Any) -> Recipient:
        if not NAME.match(role) or role == SUPPORT:
            raise _fail(where, f"role {role!r} must match [a-z0-9_]+ and not be support")
        sources = []
        for text in _strings(raw, where, "recipient"):
            kind, _, column = text.partition(":")
            try:
                parsed = RecipientKind(kind)
            except ValueError:
                raise _fail(where, f"{text!r}: use user:<column> or mechanic:<column>") from None
            if parsed is RecipientKind.SUPPORT:
                raise _fail(where, "support needs no declaration")
            sources.append(RecipientSource(parsed, _identifier(column, where, "column")))
        return Recipient(role, tuple(sources))

    def _add_rule(self, where: str, raw: dict[str, Any], pack: str, shipped: bool) -> None:
        name = raw["name"]
        index = next((i for i, r in enumerate(self.rules) if r.name == name), None)
        if set(raw) <= TOGGLE_KEYS:
            if index is None:
                raise _fail(where, "switches a rule that no pack or earlier file defines")
            enabled = raw.get("enabled", True)
            if not isinstance(enabled, bool):
                raise _fail(where, "enabled must be true or false")
            self.rules[index] = replace(self.rules[index], enabled=enabled)
            return
        _unknown(raw, RULE_KEYS, where)
        rule = self._rule(where, raw, pack)
        if index is not None:
            self.rules[index] = rule
        else:
            self.rules.append(rule)
        if shipped:
            self.shipped.add(name)

    def _rule(self, where: str, raw: dict[str, Any], pack: str) -> Rule:
        table_name = raw.get("table")
        if not isinstance(table_name, str) or table_name not in self.tables:
            raise _fail(where, f"table {table_name!r} is not declared ([tables.{table_name}])")
        table = self.tables[table_name]
        statuses = frozenset(_strings(raw.get("statuses", []), where, "statuses"))
        if table.known_statuses:
            unknown = sorted(statuses - table.known_statuses)
            if unknown:
                raise _fail(where, f"status {unknown[0]!r} is not one of table {table_name}'s "
                                   "known_statuses")
        present = _strings(raw.get("present", []), where, "present")
        absent = _strings(raw.get("absent", []), where, "absent")
        anchor = _strings(raw.get("anchor", []), where, "anchor")
        if not anchor:
            raise _fail(where, "anchor must name at least one column")
        declared = self.table_columns.get(table_name)
        for column in (*present, *absent, *anchor):
            _identifier(column, where, "column")
            if declared is not None and column not in declared and column not in table.derived:
                raise _fail(where, f"column {column!r} is not in table {table_name}'s columns")
        for dname in anchor:
            derived = table.derived.get(dname)
            for term in derived.lookups if derived else ():
                if term.map not in self.maps:
                    raise _fail(where, f"derived {dname} looks up map {term.map!r}, "
                                       "which no [maps] declares")
        offset = signed_duration(raw.get("offset", "0s"), where)
        set_status, reason = raw.get("set_status"), raw.get("reason")
        if set_status is not None:
            if not isinstance(set_status, str) or not set_status:
                raise _fail(where, "set_status must be a status")
            if table.known_statuses and set_status not in table.known_statuses:
                raise _fail(where, f"set_status {set_status!r} is not one of table "
                                   f"{table_name}'s known_statuses")
            if not isinstance(reason, str) or not reason:
                raise _fail(where, "set_status needs a reason")
            if not statuses:
                # The compare-and-set changes a row only while it is in one of the
                # rule's statuses; with none listed it could never apply.
                raise _fail(where, "set_status needs statuses (the statuses it may change)")
        elif reason is not None:
            raise _fail(where, "reason is only for set_status")
        set_columns = raw.get("set", {})
        if not isinstance(set_columns, dict):
            raise _fail(where, "set must be a table of column = value")
        for column in set_columns:
            _identifier(column, where, "set column")
        notify = _strings(raw.get("notify", []), where, "notify")
        for role in notify:
            bare = role.rstrip("?")
            if bare != SUPPORT and bare not in table.recipients:
                raise _fail(where, f"notify role {bare!r} is not a recipient of table "
                                   f"{table_name} (declare [tables.{table_name}.recipients])")
        for text_key in ("webhook", "event", "description"):
            if text_key in raw and not isinstance(raw[text_key], str):
                raise _fail(where, f"{text_key} must be a string")
        try:
            lateness = Lateness(raw.get("lateness", Lateness.NOTIFY_LIMIT.value))
        except ValueError:
            raise _fail(where, f"lateness {raw.get('lateness')!r}: use notify_limit or "
                               "skip_past_quarter") from None
        enabled = raw.get("enabled", True)
        if not isinstance(enabled, bool):
            raise _fail(where, "enabled must be true or false")
        return Rule(raw["name"], table_name, statuses, present, absent, anchor, offset,
                    set_status, reason, dict(set_columns), notify, raw.get("webhook"),
                    raw.get("event"), lateness, enabled, pack, raw.get("description", ""))

    # -- the environment -------------------------------------------------------------

    def finish(self, env: Mapping[str, str]) -> RuleSet:
        known = {rule.env_name: rule for rule in self.rules}
        for key in env:
            if key.startswith("RULE_") and key not in known:
                raise RuleConfigError(
                    f"{key} names no rule; the rules are: {', '.join(sorted(known))}")
        scale = _time_scale(env)
        maps = {name: _map_from_env(name, m, env) for name, m in self.maps.items()}
        rules = []
        for rule in self.rules:
            raw = env.get(rule.env_name)
            if raw is not None:
                text = raw.strip().lower()
                if text == "off":
                    rule = replace(rule, enabled=False)
                elif text == "on":
                    rule = replace(rule, enabled=True)
                else:
                    try:
                        size = 0 if text == "0" else parse_duration(text)
                    except ValueError:
                        raise RuleConfigError(f"{rule.env_name}={raw!r} is not valid: use "
                                              f"{DURATION_FORMS} (or on)") from None
                    rule = replace(rule, offset=-size if rule.offset < 0 else size)
            rules.append(replace(rule, offset=round(rule.offset / scale)))
        tables = {name: _scaled_table(t, scale) for name, t in self.tables.items()}
        for table in {r.table for r in rules}:
            for derived in tables[table].derived.values():
                for term in derived.sums:
                    tables.setdefault(term.table, Table(term.table))
        return RuleSet(tables, tuple(rules), maps, scale)


def _scaled_table(table: Table, scale: float) -> Table:
    if not table.derived or scale == 1:
        return table
    derived = {
        name: replace(d, lookups=tuple(replace(t, unit=round(t.unit / scale)) for t in d.lookups),
                      sums=tuple(replace(t, unit=round(t.unit / scale)) for t in d.sums))
        for name, d in table.derived.items()}
    return replace(table, derived=derived)


def _time_scale(env: Mapping[str, str]) -> float:
    raw = env.get("RULES_TIME_SCALE", "").strip() or "1"
    try:
        scale = float(raw)
    except ValueError:
        scale = 0.0
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise RuleConfigError(
            f"RULES_TIME_SCALE={raw!r} is not a positive number (for example 1 or 60)")
    return scale


def _map_from_env(name: str, declared: _Map, env: Mapping[str, str]) -> dict[str, float]:
    """The map's env variable, when set, replaces the shipped values entirely."""
    if declared.env is None or declared.env not in env:
        return dict(declared.values)
    raw = env[declared.env]
    values: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in raw.split(","))):
        key, sep, number = part.partition("=")
        try:
            value = float(number)
            if not sep or not key.strip() or value < 0:
                raise ValueError
        except ValueError:
            raise RuleConfigError(f"{declared.env}={raw!r} is not valid: use key=number pairs "
                                  "separated by commas (for example chat10=30,video15=45)") from None
        values[key.strip()] = value
    return values


def shipped_packs() -> list[tuple[str, str]]:
    """(label, text) of every pack inside the package: sessions first, then by name."""
    folder = resources.files("listener.rules.packs")
    files = sorted((f for f in folder.iterdir() if f.name.endswith(".toml")),
                   key=lambda f: (f.name != f"{SESSIONS_PACK}.toml", f.name))
    return [(f.name, f.read_text(encoding="utf-8")) for f in files]


def rule_files(env: Mapping[str, str], extra: Iterable[str | Path] = ()) -> list[Path]:
    paths = [p for p in (env.get("RULES_FILE") or "").split(":") if p.strip()]
    return [Path(p) for p in (*paths, *extra)]


def load_ruleset(env: Mapping[str, str], extra_files: Iterable[str | Path] = (), *,
                 packs: list[tuple[str, str]] | None = None) -> RuleSet:
    """The effective rules: shipped packs, then RULES_FILE and `extra_files`, then
    the environment's overrides."""
    builder = _Builder()
    for name, text in shipped_packs() if packs is None else packs:
        builder.add_file(f"pack {name}", text, shipped=True, pack=Path(name).stem)
    for path in rule_files(env, extra_files):
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RuleConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
        builder.add_file(str(path), text, shipped=False, pack=path.name)
    return builder.finish(env)
