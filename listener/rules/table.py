"""What a rule is, and how the effective table is built from configuration.

A rule is data: a condition on the row, an anchor and a signed offset (its due
instant), what it does, and how it behaves when it fires late. The engine
interprets these declarations; nothing here does I/O.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from listener.instants import DURATION_FORMS, format_duration, parse_duration

PRE_LIVE = frozenset({"pending", "scheduled", "accepted", "waiting"})
ACTIVE = frozenset({"live", "reconnecting"})
TERMINAL = frozenset({"completed", "cancelled", "expired", "unattended", "refunded", "archived"})
KNOWN_STATUSES = PRE_LIVE | ACTIVE | TERMINAL

# How a rule that fires after its due instant behaves.
NOTIFY_LIMIT = "notify_limit"  # past MAX_NOTIFY_LATENESS: change status, send no email
SKIP_PAST_QUARTER = "skip_past_quarter"  # past a quarter of its offset: do nothing

# Email recipients, by role. The `_if_assigned` form is silently left out when
# the session has no mechanic; a plain `mechanic` without one is a failure.
CUSTOMER, MECHANIC, SUPPORT, MECHANIC_IF_ASSIGNED = (
    "customer", "mechanic", "support", "mechanic_if_assigned")


@dataclass(frozen=True, slots=True)
class Condition:
    statuses: frozenset[str]
    present: tuple[str, ...] = ()  # columns that must be non-null
    absent: tuple[str, ...] = ()  # columns that must be null

    def describe(self) -> str:
        statuses = sorted(self.statuses)
        parts = [f"status = {statuses[0]}" if len(statuses) == 1
                 else "status in {" + ", ".join(statuses) + "}"]
        parts += [f"{c} set" for c in self.present]
        parts += [f"{c} null" for c in self.absent]
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class StatusChange:
    status: str
    reason: str


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    when: Condition
    # The due instant is max(non-null anchor columns) + direction * offset.
    anchor: tuple[str, ...]
    offset: int  # microseconds, >= 0, after scaling
    direction: int  # +1 after the anchor, -1 before it
    set_status: StatusChange | None = None
    notify: tuple[str, ...] = ()
    lateness: str = NOTIFY_LIMIT
    enabled: bool = True

    @property
    def env_name(self) -> str:
        return "RULE_" + self.name.upper()

    def describe_due(self) -> str:
        anchor = self.anchor[0] if len(self.anchor) == 1 else f"max({', '.join(self.anchor)})"
        if self.offset == 0:
            return anchor
        sign = "+" if self.direction > 0 else "-"
        return f"{anchor} {sign} {format_duration(self.offset)}"

    def describe_actions(self) -> str:
        parts = []
        if self.set_status:
            parts.append(f"set status {self.set_status.status} ({self.set_status.reason})")
        if self.notify:
            roles = [r.replace("_if_assigned", " if assigned") for r in self.notify]
            parts.append("email " + ", ".join(roles))
        return "; ".join(parts) or "none"


class RuleConfigError(ValueError):
    """A bad RULE_* or RULES_TIME_SCALE value; the message names the variable."""


@dataclass(frozen=True)
class RuleTable:
    rules: tuple[Rule, ...]  # enabled rules, in table order
    all_rules: tuple[Rule, ...]  # as configured, disabled ones included
    time_scale: float

    def __iter__(self):
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def by_name(self, name: str) -> Rule:
        for rule in self.all_rules:
            if rule.name == name:
                return rule
        raise KeyError(name)


def build_table(defaults: tuple[Rule, ...], env: Mapping[str, str]) -> RuleTable:
    """Apply RULE_<NAME> overrides and RULES_TIME_SCALE to the default rules."""
    known = {rule.env_name: rule for rule in defaults}
    for key in env:
        if key.startswith("RULE_") and key not in known:
            raise RuleConfigError(
                f"{key} names no rule; the rules are: {', '.join(sorted(known))}")
    raw_scale = env.get("RULES_TIME_SCALE", "").strip() or "1"
    try:
        scale = float(raw_scale)
    except ValueError:
        scale = 0.0
    if not scale > 0 or scale != scale or scale == float("inf"):
        raise RuleConfigError(
            f"RULES_TIME_SCALE={raw_scale!r} is not a positive number (for example 1 or 60)")
    effective = []
    for rule in defaults:
        raw = env.get(rule.env_name)
        if raw is not None:
            text = raw.strip().lower()
            if text == "off":
                rule = replace(rule, enabled=False)
            else:
                try:
                    offset = 0 if text == "0" else parse_duration(text)
                except ValueError:
                    raise RuleConfigError(
                        f"{rule.env_name}={raw!r} is not valid: use {DURATION_FORMS}") from None
                rule = replace(rule, offset=offset)
        effective.append(replace(rule, offset=round(rule.offset / scale)))
    return RuleTable(
        rules=tuple(r for r in effective if r.enabled),
        all_rules=tuple(effective),
        time_scale=scale,
    )
