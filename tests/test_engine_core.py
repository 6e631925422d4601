"""The engine's own API, below the executor and its ledger."""
from __future__ import annotations

from listener.engine import Engine
from listener.instants import MINUTE, parse_instant
from listener.rules import load_rules
from tests.helpers import MECH, at, iso, row

T = parse_instant(iso(at(0)))


def engine() -> Engine:
    return Engine(load_rules({}))


def drain(e: Engine, until: int) -> list[tuple[str, int]]:
    out = []
    while (timer := e.pop_due(until)) is not None:
        out.append((timer.rule.name, (timer.due - T) // MINUTE))
    return out


def test_an_episode_pushed_twice_pops_once() -> None:
    e = engine()
    e.upsert(row(status="waiting", mechanic_id=MECH, scheduled_for=at(30)), T)
    e.upsert(row(status="live", mechanic_id=MECH, scheduled_for=at(30)), T + 5 * MINUTE)
    e.upsert(row(status="waiting", mechanic_id=MECH, scheduled_for=at(30)), T + 6 * MINUTE)
    names = [name for name, _ in drain(e, T + 34 * MINUTE)]
    assert names.count("mechanic_nudge") == 1


def test_fired_episodes_survive_forgetting_a_terminal_session() -> None:
    e = engine()
    live = row(status="live", started_at=at(-200))
    e.upsert(live, T)
    assert drain(e, T) == [("auto_end_max_duration", -20)]
    e.upsert(row(status="completed", started_at=at(-200), ended_at=at(0)), T)
    assert "s1" not in e.sessions  # nothing owed: forgotten
    e.upsert(live, T + MINUTE)
    assert drain(e, T + MINUTE) == []


def test_release_gives_a_timer_back() -> None:
    e = engine()
    e.upsert(row(), T)
    timer = e.pop_due(T + 5 * MINUTE)
    assert timer is not None and e.armed == 1
    e.release(timer)
    assert e.armed == 2
    assert e.pop_due(T + 5 * MINUTE) == timer


def test_next_due_skips_obsolete_entries() -> None:
    e = engine()
    e.upsert(row(), T)
    assert e.next_due() == T + 5 * MINUTE
    e.upsert(row(status="live", started_at=at(1)), T + MINUTE)
    assert e.next_due() == T + 181 * MINUTE
    e.delete("s1")
    assert e.next_due() is None and e.armed == 0


def test_heap_is_compacted_when_deadlines_keep_moving() -> None:
    e = engine()
    for minute in range(30_000):
        e.upsert(row(status="live", started_at=at(0), expires_at=at(10_000 + minute)), T)
    assert e.armed == 2
    assert len(e._heap) < 20_000


def test_upcoming_is_sorted() -> None:
    e = engine()
    e.upsert(row(sid="a"), T)
    e.upsert(row(sid="b", status="waiting", mechanic_id=MECH), T)
    dues = [due for due, _, _ in e.upcoming()]
    assert dues == sorted(dues) and len(dues) == 5


def test_memory_per_tracked_session_is_under_a_kilobyte() -> None:
    import tracemalloc

    tracemalloc.start()
    e = engine()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(20_000):
        e.upsert(row(sid=f"{i:08d}-0000-4000-8000-000000000000", status="waiting",
                     mechanic_id=MECH, scheduled_for=at(600)), T)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert used / 20_000 < 1024, f"{used / 20_000:.0f} bytes per session"
