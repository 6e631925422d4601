"""The default rule table of SPEC section 3, in table order (the order breaks ties)."""
from __future__ import annotations

from listener.instants import HOUR, MINUTE
from listener.rules.table import (
    CUSTOMER, MECHANIC, MECHANIC_IF_ASSIGNED, SKIP_PAST_QUARTER, SUPPORT, Condition, Rule,
    StatusChange)

S = "status_changed_at"
WAITING_FOR_MECHANIC = Condition(frozenset({"accepted", "waiting"}), present=("mechanic_id",))
UPCOMING = Condition(frozenset({"scheduled", "accepted", "waiting"}), present=("scheduled_for",))
OWES_SUMMARY = Condition(frozenset({"completed"}), present=("mechanic_id", "started_at"),
                         absent=("summary_submitted_at",))
UNASSIGNED = Condition(frozenset({"pending"}), absent=("mechanic_id",))
ACTIVE_STARTED = Condition(frozenset({"live", "reconnecting"}), present=("started_at",))
ACTIVE_PAID = Condition(frozenset({"live", "reconnecting"}), present=("expires_at",))

DEFAULT_RULES: tuple[Rule, ...] = (
    Rule("mechanic_nudge", WAITING_FOR_MECHANIC, (S, "scheduled_for"), 3 * MINUTE, +1,
         notify=(MECHANIC,)),
    Rule("support_stuck_alert", WAITING_FOR_MECHANIC, (S, "scheduled_for"), 5 * MINUTE, +1,
         notify=(SUPPORT,)),
    Rule("support_reconnect_alert", Condition(frozenset({"reconnecting"})), (S,), 2 * MINUTE, +1,
         notify=(SUPPORT,)),
    Rule("support_unassigned_alert",
         Condition(frozenset({"pending"}), absent=("mechanic_id", "scheduled_for")),
         (S,), 5 * MINUTE, +1, notify=(SUPPORT,)),
    Rule("request_expiry", UNASSIGNED, (S,), 15 * MINUTE, +1,
         set_status=StatusChange("expired", "no_mechanic_available"), notify=(CUSTOMER,)),
    Rule("waiting_timeout",
         Condition(frozenset({"accepted", "waiting"}), absent=("scheduled_for",)),
         (S,), 60 * MINUTE, +1,
         set_status=StatusChange("cancelled", "not_started"), notify=(SUPPORT,)),
    Rule("auto_end_max_duration", ACTIVE_STARTED, ("started_at",), 3 * HOUR, +1,
         set_status=StatusChange("completed", "max_duration_exceeded")),
    Rule("plan_time_expiry", ACTIVE_PAID, ("expires_at",), 0, +1,
         set_status=StatusChange("completed", "plan_time_elapsed")),
    Rule("scheduled_reminder_24h", UPCOMING, ("scheduled_for",), 24 * HOUR, -1,
         notify=(CUSTOMER, MECHANIC_IF_ASSIGNED), lateness=SKIP_PAST_QUARTER),
    Rule("scheduled_reminder_1h", UPCOMING, ("scheduled_for",), 1 * HOUR, -1,
         notify=(CUSTOMER, MECHANIC_IF_ASSIGNED), lateness=SKIP_PAST_QUARTER),
    Rule("scheduled_reminder_15m", UPCOMING, ("scheduled_for",), 15 * MINUTE, -1,
         notify=(CUSTOMER, MECHANIC_IF_ASSIGNED), lateness=SKIP_PAST_QUARTER),
    Rule("scheduled_no_show", UPCOMING, ("scheduled_for",), 10 * MINUTE, +1,
         set_status=StatusChange("cancelled", "no_show"), notify=(SUPPORT,)),
    Rule("summary_reminder", OWES_SUMMARY, ("ended_at",), 30 * MINUTE, +1, notify=(MECHANIC,)),
    Rule("summary_overdue", OWES_SUMMARY, ("ended_at",), 24 * HOUR, +1, notify=(SUPPORT,)),
)
