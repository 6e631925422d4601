"""The daemon on real PostgreSQL: NOTIFY in, timers, compare-and-set, ledger."""
from __future__ import annotations

import gc
from pathlib import Path

from tests.live import (
    MECHANIC, LiveDaemon, eventually, insert_session, ledger, query, seed_people,
    update_session)


async def test_a_pending_request_alerts_then_expires(database: str, tmp_path: Path) -> None:
    seed_people(database)
    async with LiveDaemon(database, tmp_path) as live:
        await live.active()
        sid = insert_session(database, status="pending", metadata={"source": "app", "n": 1})
        await eventually(lambda: live.fired("request_expiry"))
        status, metadata, = query(database, "select status, metadata from public.sessions "
                                            "where id = %s", sid)[0]
        assert status == "expired"
        assert metadata["source"] == "app" and metadata["n"] == 1
        assert metadata["listener"]["reason"] == "no_mechanic_available"
        assert metadata["listener"]["rule"] == "request_expiry"
        assert ledger(database, sid) == [("support_unassigned_alert", "fired", sid),
                                         ("request_expiry", "fired", sid)]
        assert len(list(tmp_path.glob("*.json"))) == 2


async def test_an_accepted_session_is_nudged_and_going_live_stops_the_rest(
        database: str, tmp_path: Path) -> None:
    seed_people(database)
    async with LiveDaemon(database, tmp_path) as live:
        await live.active()
        sid = insert_session(database, status="waiting", mechanic_id=MECHANIC)
        await eventually(lambda: live.fired("support_stuck_alert"))
        update_session(database, sid, status="live", started_at="now()")
        await eventually(lambda: live.daemon.engine.row("sessions", sid) is not None
                         and live.daemon.engine.row("sessions", sid).status == "live")
        assert [r.key.rule for r in live.results] == ["mechanic_nudge", "support_stuck_alert"]
        assert not live.fired("waiting_timeout")


async def test_sessions_present_at_start_are_loaded_and_caught_up(
        database: str, tmp_path: Path) -> None:
    seed_people(database)
    old = insert_session(database, status="waiting", mechanic_id=MECHANIC,
                         status_changed_at="2020-01-01T00:00:00Z")
    async with LiveDaemon(database, tmp_path) as live:
        await eventually(lambda: live.fired("waiting_timeout"))
        outcomes = {r.key.rule: r.outcome for r in live.results}
        # The first sweep loaded with the collector off: it is on again, and
        # what was loaded is left out of its passes until the term ends.
        assert gc.isenabled() and gc.get_freeze_count() > 0
    assert gc.isenabled() and gc.get_freeze_count() == 0
    # Years late: status still changes, nobody is emailed (catch-up).
    assert outcomes == {"mechanic_nudge": "late", "support_stuck_alert": "late",
                        "waiting_timeout": "late"}
    assert query(database, "select status from public.sessions where id = %s", old) == [
        ("cancelled",)]
    assert list(tmp_path.glob("*.json")) == []
