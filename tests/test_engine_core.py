"""The engine's own API, below the executor and its ledger."""
from __future__ import annotations

from listener.engine import Engine
from listener.instants import MINUTE, parse_instant
from listener.rules import load_rules
from listener.rules.model import Outcome
from tests.helpers import MECH, at, iso, row

T = parse_instant(iso(at(0)))
SESSIONS = "sessions"


def engine(env: dict[str, str] | None = None) -> Engine:
    return Engine(load_rules(env or {}))


def drain(e: Engine, until: int) -> list[tuple[str, int]]:
    out = []
    while (timer := e.pop_due(until)) is not None:
        out.append((timer.rule.name, (timer.due - T) // MINUTE))
    return out


def test_an_episode_pushed_twice_pops_once() -> None:
    e = engine()
    e.upsert(SESSIONS, row(status="waiting", mechanic_id=MECH, scheduled_for=at(30)), T)
    e.upsert(SESSIONS, row(status="live", mechanic_id=MECH, scheduled_for=at(30)), T + 5 * MINUTE)
    e.upsert(SESSIONS, row(status="waiting", mechanic_id=MECH, scheduled_for=at(30)),
             T + 6 * MINUTE)
    names = [name for name, _ in drain(e, T + 34 * MINUTE)]
    assert names.count("mechanic_nudge") == 1


def test_fired_episodes_survive_forgetting_a_terminal_session() -> None:
    e = engine()
    live = row(status="live", started_at=at(-200))
    e.upsert(SESSIONS, live, T)
    assert drain(e, T) == [("auto_end_max_duration", -20)]
    e.upsert(SESSIONS, row(status="completed", started_at=at(-200), ended_at=at(0)), T)
    assert "s1" not in e.tables[SESSIONS].rows  # nothing owed: forgotten
    e.upsert(SESSIONS, live, T + MINUTE)
    assert drain(e, T + MINUTE) == []


def test_the_version_of_a_forgotten_row_is_still_seen() -> None:
    # The incremental read skips a row memory has seen at its version, also one
    # it forgot because it owed nothing: reparsing it every read was wasted work.
    e = engine()
    e.upsert(SESSIONS, {**row(), "_version": "7"}, T)
    assert e.seen_version(SESSIONS, "s1") == "7"
    e.upsert(SESSIONS, {**row(status="cancelled"), "_version": "8"}, T)
    assert "s1" not in e.tables[SESSIONS].rows  # nothing owed: forgotten
    assert e.seen_version(SESSIONS, "s1") == "8"
    assert e.seen_version(SESSIONS, "s2") is None
    assert e.seen_version("no_such_table", "s1") is None


def test_release_gives_a_timer_back() -> None:
    e = engine()
    e.upsert(SESSIONS, row(), T)
    timer = e.pop_due(T + 5 * MINUTE)
    assert timer is not None and e.armed == 1
    assert (timer.table, timer.key, timer.rule.name) == (SESSIONS, "s1", "support_unassigned_alert")
    e.release(timer)
    assert e.armed == 2
    assert e.pop_due(T + 5 * MINUTE) == timer


def test_next_due_skips_obsolete_entries() -> None:
    e = engine()
    e.upsert(SESSIONS, row(), T)
    assert e.next_due() == T + 5 * MINUTE
    e.upsert(SESSIONS, row(status="live", started_at=at(1)), T + MINUTE)
    assert e.next_due() == T + 181 * MINUTE
    assert e.delete(SESSIONS, "s1")
    assert e.next_due() is None and e.armed == 0


def test_heap_is_compacted_when_deadlines_keep_moving() -> None:
    e = engine()
    for minute in range(30_000):
        e.upsert(SESSIONS, row(status="live", started_at=at(0), expires_at=at(10_000 + minute)), T)
    assert e.armed == 2
    assert len(e._heap) < 20_000


def test_upcoming_is_sorted() -> None:
    e = engine()
    e.upsert(SESSIONS, row(sid="a"), T)
    e.upsert(SESSIONS, row(sid="b", status="waiting", mechanic_id=MECH), T)
    items = list(e.upcoming())
    dues = [due for due, _, _, _ in items]
    assert dues == sorted(dues) and len(dues) == 5
    assert {(table, key) for _, _, table, key in items} == {(SESSIONS, "a"), (SESSIONS, "b")}


def test_a_signed_offset_comes_before_its_anchor() -> None:
    e = engine()
    assert e.ruleset.by_name("scheduled_reminder_24h").offset == -24 * 60 * MINUTE
    e.upsert(SESSIONS, row(status="scheduled", scheduled_for=at(48 * 60)), T)
    assert drain(e, T + 24 * 60 * MINUTE) == [("scheduled_reminder_24h", 24 * 60)]


def test_an_extension_moves_the_plan_end_and_its_deletion_moves_it_back() -> None:
    e = engine()
    e.upsert(SESSIONS, row(status="live", plan="chat10", started_at=at(0)), T)
    assert e.next_due() == T + 30 * MINUTE
    e.upsert("session_extensions", {"id": "x1", "session_id": "s1", "minutes": 15}, T)
    assert e.next_due() == T + 45 * MINUTE
    e.upsert("session_extensions", {"id": "x1", "session_id": "s1", "minutes": 5}, T)
    assert e.next_due() == T + 35 * MINUTE
    assert e.delete("session_extensions", "x1")
    assert e.next_due() == T + 30 * MINUTE
    assert drain(e, T + 30 * MINUTE) == [("plan_time_expiry", 30)]


def test_an_extension_moved_to_another_session_moves_both() -> None:
    e = engine()
    for sid in ("a", "b"):
        e.upsert(SESSIONS, row(sid, status="live", plan="chat10", started_at=at(0)), T)
    e.upsert("session_extensions", {"id": "x", "session_id": "a", "minutes": 10}, T)
    e.upsert("session_extensions", {"id": "x", "session_id": "b", "minutes": 10}, T)
    assert drain(e, T + 60 * MINUTE) == [("plan_time_expiry", 30), ("plan_time_expiry", 40)]


def test_an_unknown_plan_is_reported_once_per_value() -> None:
    e = engine()
    e.upsert(SESSIONS, row("a", status="live", plan="gold", started_at=at(0)), T)
    e.upsert(SESSIONS, row("b", status="live", plan="gold", started_at=at(0)), T)
    e.upsert(SESSIONS, row("c", status="live", plan="silver", started_at=at(0)), T)
    assert [(u.table, u.column, u.value) for u in e.new_unknown_values] == [
        (SESSIONS, "plan", "gold"), (SESSIONS, "plan", "silver")]
    # No computed end: only the 3-hour limit is owed.
    assert {r.name for _, r, _, _ in e.upcoming()} == {"auto_end_max_duration"}


def test_decisions_use_the_outcome_enum() -> None:
    e = engine()
    e.upsert(SESSIONS, row(status="scheduled", scheduled_for=at(70)), T)
    day = e.pop_due(T)
    assert day is not None and day.rule.name == "scheduled_reminder_24h"
    assert e.decide(day, e.row(SESSIONS, "s1"), T).outcome is Outcome.SKIPPED
    timer = e.pop_due(T + 10 * MINUTE)
    assert timer is not None and timer.rule.name == "scheduled_reminder_1h"
    on_time = e.decide(timer, e.row(SESSIONS, "s1"), timer.due)
    assert on_time.outcome is Outcome.FIRED and on_time.recipients == ("customer",)
    skipped = e.decide(timer, e.row(SESSIONS, "s1"), timer.due + 16 * MINUTE)
    assert skipped.outcome is Outcome.SKIPPED
    e.upsert(SESSIONS, row("late", status="live", started_at=at(-500)), T)
    timer = e.pop_due(T)
    assert timer is not None and timer.rule.name == "auto_end_max_duration"
    assert e.decide(timer, e.row(SESSIONS, "late"), T).outcome is Outcome.LATE


def test_memory_per_tracked_session_is_under_a_kilobyte() -> None:
    import tracemalloc

    tracemalloc.start()
    e = engine()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20_000):
        e.upsert(SESSIONS, row(sid=f"{i:08d}-0000-4000-8000-000000000000", status="waiting",
                               mechanic_id=MECH, scheduled_for=at(600)), T)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert used / 20_000 < 1024, f"{used / 20_000:.0f} bytes per session"


def test_lateness_limits_are_inclusive() -> None:
    e = engine()
    e.upsert(SESSIONS, row("a", status="live", started_at=at(0)), T)
    e.upsert(SESSIONS, row("b", status="scheduled", scheduled_for=at(2000)), T)
    timers = {}
    while (timer := e.pop_due(T + 3000 * MINUTE)) is not None:
        timers[timer.rule.name] = timer
    limit = timers["auto_end_max_duration"]
    assert e.decide(limit, e.row(SESSIONS, "a"), limit.due + 60 * MINUTE).outcome is Outcome.FIRED
    assert e.decide(limit, e.row(SESSIONS, "a"), limit.due + 60 * MINUTE + 1).outcome \
        is Outcome.LATE
    reminder = timers["scheduled_reminder_1h"]  # a quarter of an hour may pass, no more
    assert e.decide(reminder, e.row(SESSIONS, "b"), reminder.due + 15 * MINUTE).outcome \
        is Outcome.FIRED
    assert e.decide(reminder, e.row(SESSIONS, "b"), reminder.due + 15 * MINUTE + 1).outcome \
        is Outcome.SKIPPED
