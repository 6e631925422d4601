"""Each rule, on virtual time, with the boundary instants of the firing rules."""
from __future__ import annotations

import pytest

from tests.helpers import MECH, at, event, fired, replay, row

# (name, events, expected [(minutes after T0, rule)], optional status/reason checks)
CASES = [
    ("nudge, stuck alert, then waiting timeout",
     [event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH))],
     [(3, "mechanic_nudge"), (5, "support_stuck_alert"), (60, "waiting_timeout")]),
    ("accepted counts like waiting",
     [event(at(0), "INSERT", row(status="accepted", mechanic_id=MECH))],
     [(3, "mechanic_nudge"), (5, "support_stuck_alert"), (60, "waiting_timeout")]),
    ("nudge measured from the state change, not created_at",
     [event(at(0), "INSERT", row()),
      event(at(10), "UPDATE", row(status="waiting", mechanic_id=MECH))],
     [(5, "support_unassigned_alert"), (13, "mechanic_nudge"), (15, "support_stuck_alert"),
      (70, "waiting_timeout")]),
    ("going live stops the waiting rules",
     [event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH)),
      event(at(4), "UPDATE", row(status="live", mechanic_id=MECH, started_at=at(4))),
      event(at(30), "UPDATE", row(status="completed", mechanic_id=MECH, started_at=at(4),
                                  ended_at=at(30), summary_submitted_at=at(31)))],
     [(3, "mechanic_nudge")]),
    ("reconnect alert after 2 minutes",
     [event(at(0), "INSERT", row(status="live", mechanic_id=MECH, started_at=at(0))),
      event(at(10), "UPDATE", row(status="reconnecting", mechanic_id=MECH, started_at=at(0))),
      event(at(20), "UPDATE", row(status="completed", mechanic_id=MECH, started_at=at(0),
                                  ended_at=at(20), summary_submitted_at=at(20)))],
     [(12, "support_reconnect_alert")]),
    ("reconnected in time: no alert",
     [event(at(0), "INSERT", row(status="reconnecting", mechanic_id=MECH, started_at=at(0))),
      event(at(1), "UPDATE", row(status="live", mechanic_id=MECH, started_at=at(0))),
      event(at(20), "DELETE", row())],
     []),
    ("pending with a booking time: no unassigned alert, still expires",
     [event(at(0), "INSERT", row(scheduled_for=at(600)))],
     [(15, "request_expiry")]),
    ("waiting timeout does not apply to scheduled sessions",
     [event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH, scheduled_for=at(0))),
      event(at(9), "UPDATE", row(status="live", mechanic_id=MECH, scheduled_for=at(0),
                                 started_at=at(9))),
      event(at(100), "DELETE", row())],
     [(3, "mechanic_nudge"), (5, "support_stuck_alert")]),
    ("three-hour limit, then summary reminders",
     [event(at(0), "INSERT", row(status="live", mechanic_id=MECH, started_at=at(0)))],
     [(180, "auto_end_max_duration"), (210, "summary_reminder"), (180 + 1440, "summary_overdue")]),
    ("summary submitted in time: no overdue alert",
     [event(at(0), "INSERT", row(status="completed", mechanic_id=MECH, started_at=at(-60),
                                 ended_at=at(0))),
      event(at(40), "UPDATE", row(status="completed", mechanic_id=MECH, started_at=at(-60),
                                  ended_at=at(0), summary_submitted_at=at(40)))],
     [(30, "summary_reminder")]),
    ("no summary rules without a mechanic or a start",
     [event(at(0), "INSERT", row(sid="a", status="completed", started_at=at(-5), ended_at=at(0))),
      event(at(0), "INSERT", row(sid="b", status="completed", mechanic_id=MECH, ended_at=at(0)))],
     []),
    ("a change stamped exactly at the due instant wins",
     [event(at(0), "INSERT", row()),
      event(at(5), "UPDATE", row(status="waiting", mechanic_id=MECH))],
     [(8, "mechanic_nudge"), (10, "support_stuck_alert"), (65, "waiting_timeout")]),
    ("a paid extension moves plan time expiry",
     [event(at(0), "INSERT", row(status="live", mechanic_id=MECH, started_at=at(0),
                                 expires_at=at(30))),
      event(at(20), "UPDATE", row(status="live", mechanic_id=MECH, started_at=at(0),
                                  expires_at=at(45))),
      event(at(50), "UPDATE", row(status="completed", mechanic_id=MECH, started_at=at(0),
                                  ended_at=at(45), summary_submitted_at=at(50)))],
     [(45, "plan_time_expiry")]),
    ("plan time and the 3-hour limit both overdue: the earlier deadline ends it",
     [event(at(0), "INSERT", row(status="live", mechanic_id=MECH, started_at=at(-200),
                                 expires_at=at(-30), summary_submitted_at=None))],
     [(0, "plan_time_expiry"), (30, "summary_reminder"), (1440, "summary_overdue")]),
    ("re-entering waiting starts a new episode",
     [event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH)),
      event(at(4), "UPDATE", row(status="accepted", mechanic_id=MECH)),
      event(at(6), "UPDATE", row(status="waiting", mechanic_id=MECH)),
      event(at(20), "DELETE", row())],
     [(3, "mechanic_nudge"), (9, "mechanic_nudge"), (11, "support_stuck_alert")]),
    ("an update that keeps the status keeps the episode",
     [event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH)),
      event(at(4), "UPDATE", row(status="waiting", mechanic_id=MECH, metadata={"x": 1})),
      event(at(20), "DELETE", row())],
     [(3, "mechanic_nudge"), (5, "support_stuck_alert")]),
    ("DELETE cancels every timer",
     [event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH)),
      event(at(1), "DELETE", row())],
     []),
    ("reminders before a booking, then the no-show",
     [event(at(0), "INSERT", row(status="scheduled", scheduled_for=at(48 * 60)))],
     [(24 * 60, "scheduled_reminder_24h"), (47 * 60, "scheduled_reminder_1h"),
      (48 * 60 - 15, "scheduled_reminder_15m"), (48 * 60 + 10, "scheduled_no_show")]),
    ("catch-up: a reminder under a quarter late fires at arming",
     [event(at(0), "INSERT", row(status="scheduled", scheduled_for=at(50))),
      event(at(45), "DELETE", row())],
     [(0, "scheduled_reminder_1h"), (35, "scheduled_reminder_15m")]),
    ("catch-up: a reminder over a quarter late is skipped",
     [event(at(0), "INSERT", row(status="scheduled", scheduled_for=at(40))),
      event(at(30), "DELETE", row())],
     [(25, "scheduled_reminder_15m")]),
    ("a rebooked appointment moves its reminders",
     [event(at(0), "INSERT", row(status="scheduled", scheduled_for=at(120))),
      event(at(10), "UPDATE", row(status="scheduled", scheduled_for=at(240))),
      event(at(230), "DELETE", row())],
     [(180, "scheduled_reminder_1h"), (225, "scheduled_reminder_15m")]),
]


@pytest.mark.parametrize("name,events,expected", CASES, ids=[c[0] for c in CASES])
def test_rule_case(name, events, expected) -> None:
    lines, err = replay(events)
    assert fired(lines) == expected, err


def test_status_changes_carry_status_and_reason() -> None:
    lines, _ = replay([event(at(0), "INSERT", row())])
    assert lines[-1]["rule"] == "request_expiry"
    assert (lines[-1]["status"], lines[-1]["reason"]) == ("expired", "no_mechanic_available")
    assert "status" not in lines[0]


def test_reminders_name_mechanic_only_when_assigned() -> None:
    lines, _ = replay([event(at(0), "INSERT", row(sid="a", status="scheduled",
                                                   scheduled_for=at(30))),
                       event(at(0), "INSERT", row(sid="b", status="scheduled", mechanic_id=MECH,
                                                  scheduled_for=at(30))),
                       event(at(20), "DELETE", row(sid="a")), event(at(20), "DELETE", row(sid="b"))])
    by_sid = {line["session_id"]: line["recipients"] for line in lines}
    assert by_sid == {"a": ["customer"], "b": ["customer", "mechanic"]}


def test_late_past_max_notify_lateness_still_changes_status() -> None:
    lines, _ = replay([event(at(0), "INSERT", row(status="live", mechanic_id=MECH,
                                                   started_at=at(-300), expires_at=at(-130),
                                                   summary_submitted_at=at(0)))])
    assert lines[0]["rule"] == "plan_time_expiry" and lines[0]["late"] is True
    assert lines[0]["status"] == "completed" and "recipients" not in lines[0]


def test_late_email_rule_is_marked_late() -> None:
    lines, _ = replay([event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH,
                                                   status_changed_at=at(-120))),
                       event(at(1), "DELETE", row())])
    assert [(x["rule"], x.get("late")) for x in lines] == [
        ("mechanic_nudge", True), ("support_stuck_alert", True), ("waiting_timeout", None)]
    # 60 min after S is 60 min late: not more than MAX_NOTIFY_LATENESS, so it emails.


def test_catch_up_fires_at_the_arming_instant() -> None:
    lines, _ = replay([event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH,
                                                   status_changed_at=at(-4))),
                       event(at(2), "DELETE", row())])
    assert [(x["at"], x["rule"], x["due_at"]) for x in lines] == [
        ("2026-03-02T10:00:00Z", "mechanic_nudge", "2026-03-02T09:59:00Z"),
        ("2026-03-02T10:01:00Z", "support_stuck_alert", "2026-03-02T10:01:00Z")]


def test_until_stops_the_clock() -> None:
    lines, err = replay([event(at(0), "INSERT", row()),
                         event(at(30), "UPDATE", row(status="waiting", mechanic_id=MECH))],
                        until=at(10))
    assert fired(lines) == [(5, "support_unassigned_alert")]
    assert "after --until" in err


def test_clock_never_moves_back() -> None:
    lines, _ = replay([event(at(0), "INSERT", row(sid="a")),
                       event(at(20), "INSERT", row(sid="x", status="completed")),
                       event(at(1), "UPDATE", row(sid="a", status="waiting", mechanic_id=MECH)),
                       event(at(30), "DELETE", row(sid="a"))])
    # The line stamped 10:01 is applied at 10:20, after the request expired:
    # the wait it starts is measured from 10:20, not 10:01.
    assert fired(lines) == [(5, "support_unassigned_alert"), (15, "request_expiry"),
                            (23, "mechanic_nudge"), (25, "support_stuck_alert")]


def test_unknown_status_is_terminal_and_reported_once() -> None:
    lines, err = replay([event(at(0), "INSERT", row(sid="a", status="on_hold")),
                         event(at(1), "INSERT", row(sid="b", status="on_hold"))])
    assert lines == []
    assert err.count("unknown status 'on_hold'") == 1


def test_unparsable_timestamp_is_null_and_reported() -> None:
    lines, err = replay([event(at(0), "INSERT", row(status="live", mechanic_id=MECH,
                                                     started_at="yesterday-ish",
                                                     expires_at=at(20))),
                         event(at(40), "DELETE", row())])
    assert fired(lines) == [(20, "plan_time_expiry")]
    assert "started_at" in err and "unparsable" in err


def test_far_future_dates_are_bad_input() -> None:
    lines, err = replay([event(at(0), "INSERT", row(status="live", mechanic_id=MECH,
                                                     started_at=at(0),
                                                     expires_at="9999-12-31T00:00:00Z")),
                         event(at(10), "DELETE", row())])
    assert lines == [] and "out of range" in err


def test_malformed_lines_are_reported_and_skipped() -> None:
    good = event(at(0), "INSERT", row())
    lines, err = replay(["{not json", '{"at": "2026-03-02T10:00:00Z", "type": "UPSERT"}',
                         '{"at": "nope", "type": "INSERT", "record": {"id": "z"}}',
                         '{"at": "2026-03-02T10:00:00Z", "type": "INSERT", "record": {"id": 5}}',
                         '{"at": "2026-03-02T10:00:00Z", "type": "INSERT",'
                         ' "record": {"id": "q", "status": null}}', "[]", good])
    assert [x["rule"] for x in lines] == ["support_unassigned_alert", "request_expiry"]
    for number in range(1, 7):
        assert f"line {number}:" in err
    assert "line 7" not in err


def test_huge_metadata_is_fine() -> None:
    big = {"k" + str(i): "v" * 100 for i in range(2000)}
    lines, _ = replay([event(at(0), "INSERT", row(metadata=big))])
    assert len(lines) == 2


def test_rule_override_and_off() -> None:
    env = {"RULE_MECHANIC_NUDGE": "10m", "RULE_SUPPORT_STUCK_ALERT": "off",
           "RULE_WAITING_TIMEOUT": "2h"}
    lines, _ = replay([event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH))], env)
    assert fired(lines) == [(10, "mechanic_nudge"), (120, "waiting_timeout")]


def test_time_scale_divides_offsets() -> None:
    lines, _ = replay([event(at(0), "INSERT", row())], {"RULES_TIME_SCALE": "60"})
    assert fired(lines) == [(5 / 60, "support_unassigned_alert"), (15 / 60, "request_expiry")]


def test_an_episode_left_and_re_entered_before_due_fires_once() -> None:
    # The booking time dominates the nudge's anchor, so leaving and re-entering
    # `waiting` before it is due gives the same (rule, session, due): one episode.
    lines, _ = replay([event(at(0), "INSERT", row(status="waiting", mechanic_id=MECH,
                                                   scheduled_for=at(30))),
                       event(at(5), "UPDATE", row(status="live", mechanic_id=MECH,
                                                  scheduled_for=at(30))),
                       event(at(6), "UPDATE", row(status="waiting", mechanic_id=MECH,
                                                  scheduled_for=at(30))),
                       event(at(34), "DELETE", row())])
    assert fired(lines) == [(15, "scheduled_reminder_15m"), (33, "mechanic_nudge")]


def test_a_session_forgotten_as_terminal_does_not_repeat_an_episode() -> None:
    # Ended by the listener with nothing owed, then reopened with the same start:
    # the 3-hour limit (same due instant) must not fire a second time.
    live = row(status="live", started_at=at(-200))
    lines, _ = replay([event(at(0), "INSERT", live), event(at(1), "UPDATE", live),
                       event(at(2), "DELETE", live)])
    assert fired(lines) == [(0, "auto_end_max_duration")]


def test_a_day_reminder_two_hours_late_is_still_sent() -> None:
    # Under a quarter of 24 h late: reminders ignore MAX_NOTIFY_LATENESS.
    lines, _ = replay([event(at(0), "INSERT", row(status="scheduled", scheduled_for=at(22 * 60))),
                       event(at(60), "DELETE", row())])
    assert [(x["rule"], x.get("late")) for x in lines] == [("scheduled_reminder_24h", None)]
