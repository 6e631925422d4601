"""Races, crashes, two instances, storms and garbage, on real PostgreSQL."""
from __future__ import annotations

import asyncio
from pathlib import Path

import psycopg

from listener import metrics, migrate
from listener.adapters.store_sql import SqlStore
from tests.live import (
    MECHANIC, LiveDaemon, eventually, insert_session, ledger, query, seed_people,
    update_session)


class AppWinsTheRace(SqlStore):
    """The app changes the row after the daemon decided, before it acts."""

    def __init__(self, conninfo: str, **app_change: object) -> None:
        super().__init__(conninfo)
        self.app_change = app_change
        self.raced = False

    async def fire(self, request, fence):  # type: ignore[no-untyped-def]
        if request.key.rule == "request_expiry" and not self.raced:
            self.raced = True
            update_session(self.conninfo_for_app, request.key.session_id, **self.app_change)
        return await super().fire(request, fence)


async def test_compare_and_set_loses_cleanly_to_the_app(database: str, tmp_path: Path) -> None:
    seed_people(database)
    store = AppWinsTheRace(database, status="waiting", mechanic_id=MECHANIC,
                           metadata={"accepted_by": "app"})
    store.conninfo_for_app = database
    async with LiveDaemon(database, tmp_path, store=store) as live:
        await live.active()
        sid = insert_session(database, status="pending", metadata={"keep": True})
        await eventually(lambda: any(r.key.rule == "request_expiry" for r in live.results))
        result = live.fired("request_expiry")[0]
    assert result.outcome == "skipped" and result.detail["now"] == "waiting"
    status, metadata = query(database, "select status, metadata from public.sessions "
                                       "where id = %s", sid)[0]
    assert status == "waiting" and metadata == {"accepted_by": "app"}
    assert ("request_expiry", "skipped", sid) in ledger(database, sid)


class CrashAfter(SqlStore):
    """Dies (as a killed process would: nothing after it runs) at one step."""

    def __init__(self, conninfo: str, step: str) -> None:
        super().__init__(conninfo)
        self.step = step

    async def fire(self, request, fence):  # type: ignore[no-untyped-def]
        result = await super().fire(request, fence)
        if self.step == "claim" and request.key.rule == "request_expiry":
            raise asyncio.CancelledError  # claimed and expired, nobody emailed
        return result

    async def complete(self, key, *args):  # type: ignore[no-untyped-def]
        if self.step == "email" and key.rule == "request_expiry":
            raise asyncio.CancelledError  # emailed, not recorded as done
        return await super().complete(key, *args)


async def crash_then_restart(database: str, tmp_path: Path, step: str) -> str:
    seed_people(database)
    crashing = LiveDaemon(database, tmp_path, store=CrashAfter(database, step),
                          lease_ttl_s=1.0, holder="first")
    async with crashing:
        await crashing.active()
        sid = insert_session(database, status="pending")
        await eventually(lambda: query(database, "select 1 from public.listener_ledger where "
                                                 "rule = 'request_expiry'"))
        await asyncio.sleep(0.3)
    # The first instance is gone with its claim unfinished; a second one resumes it.
    async with LiveDaemon(database, tmp_path, lease_ttl_s=1.0, holder="second"):
        await eventually(lambda: ("request_expiry", "fired", sid) in ledger(database, sid))
        await asyncio.sleep(0.5)
    assert query(database, "select status from public.sessions where id = %s", sid) == [
        ("expired",)]
    assert query(database, "select attempts from public.listener_ledger where "
                           "rule = 'request_expiry'") == [(2,)]
    customer_emails = [p for p in tmp_path.glob("request_expiry-*.json")]
    assert len(customer_emails) == 1
    return sid


async def test_crash_after_claim_and_status_change_before_email(
        database: str, tmp_path: Path) -> None:
    await crash_then_restart(database, tmp_path, "claim")


async def test_crash_after_email_before_it_is_recorded(database: str, tmp_path: Path) -> None:
    await crash_then_restart(database, tmp_path, "email")


async def test_two_daemons_fire_every_action_once(database: str, tmp_path: Path) -> None:
    seed_people(database)
    one = LiveDaemon(database, tmp_path, lease_ttl_s=1.0, holder="one")
    two = LiveDaemon(database, tmp_path, lease_ttl_s=1.0, holder="two")
    async with one, two:
        await eventually(lambda: "active" in (one.daemon.readiness.role,
                                              two.daemon.readiness.role))
        sids = [insert_session(database, status="pending") for _ in range(5)]
        sids += [insert_session(database, status="waiting", mechanic_id=MECHANIC)
                 for _ in range(5)]
        await eventually(lambda: [s for _, s, _ in ledger(database) if s != "claimed"] ==
                         ["fired"] * 25, timeout=30)
        roles = sorted([one.daemon.readiness.role, two.daemon.readiness.role])
        assert roles == ["active", "standby"]
    rows = ledger(database)
    assert len(rows) == len(set(rows)) == 25
    assert all(state == "fired" for _, state, _ in rows), rows
    assert len(one.results) + len(two.results) == 25


async def test_a_notify_storm_of_ten_thousand_changes(database: str, tmp_path: Path) -> None:
    async with LiveDaemon(database, tmp_path, env={}) as live:  # real-time thresholds
        await live.active()
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("insert into public.sessions (status, scheduled_for) "
                         "select 'scheduled', now() + interval '3 days' "
                         "from generate_series(1, 5000)")
            conn.execute("update public.sessions set scheduled_for = scheduled_for + "
                         "interval '1 hour'")
        await eventually(lambda: len(live.daemon.engine.tables["sessions"].rows) == 5000
                         and live.daemon.term._changes.empty(), timeout=60)
        # Every session owes its 24 h, 1 h, 15 min reminders and a no-show check.
        assert live.daemon.engine.armed == 5000 * 4
        assert live.results == []


def bad_notify_payloads() -> float:
    return metrics.REGISTRY.get_sample_value("listener_bad_input_total",
                                             {"kind": "notify_payload"}) or 0.0


async def test_garbage_is_logged_counted_and_survived(database: str, tmp_path: Path) -> None:
    seed_people(database)
    with psycopg.connect(database, autocommit=True) as conn:
        # A schema that drifted from the rules: statuses the pack does not know.
        conn.execute("alter table public.sessions drop constraint if exists sessions_status_check")
    before = bad_notify_payloads()
    async with LiveDaemon(database, tmp_path) as live:
        await live.active()
        with psycopg.connect(database, autocommit=True) as conn:
            for payload in ["not json", "[]", '{"type": "UPSERT"}', '{"type": "INSERT"}',
                            '{"type": "UPDATE", "record": {"id": 7.5}}']:
                conn.execute("select pg_notify('listener_changes', %s)", (payload,))
        odd = insert_session(database, status="on_hold")
        bad = insert_session(database, status="live", started_at="now()")
        update_session(database, bad, status="")
        sid = insert_session(database, status="pending")
        await eventually(lambda: live.fired("request_expiry"))
        assert bad_notify_payloads() - before == 5
        assert live.daemon.engine.row("sessions", odd) is None
        assert [r.key.session_id for r in live.fired("request_expiry")] == [sid]


async def test_an_oversized_row_is_read_back(database: str, tmp_path: Path) -> None:
    seed_people(database)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("alter table public.sessions add column notes text")
    async with LiveDaemon(database, tmp_path) as live:
        await live.active()
        sid = insert_session(database, status="pending", notes="x" * 20_000)
        await eventually(lambda: live.fired("support_unassigned_alert"))
        assert live.fired("support_unassigned_alert")[0].key.session_id == sid


def test_migrations_apply_twice_and_keep_app_data(database: str) -> None:
    seed_people(database)
    sid = insert_session(database, status="live", metadata={"a": [1, 2]}, started_at="now()")
    before = query(database, "select * from public.sessions")
    assert migrate.apply(database) == []  # already up to date
    with psycopg.connect(database, autocommit=True) as conn:
        for m in migrate.listener_migrations():
            conn.execute(m.sql)  # each file again, as a second paste would
    assert query(database, "select * from public.sessions") == before
    assert migrate.missing(database) == []
    assert sid


def test_functions_are_not_executable_by_api_roles(database: str) -> None:
    # Trigger functions are nobody's to call; the rest are service_role's alone.
    rows = query(database, """
        select p.proname, r.rolname, has_function_privilege(r.oid, p.oid, 'execute')
          from pg_proc p join pg_namespace n on n.oid = p.pronamespace
          cross join pg_roles r
         where n.nspname = 'public' and p.proname like 'listener\\_%%'
           and p.prorettype <> 'trigger'::regtype
           and r.rolname in ('anon', 'authenticated', 'service_role')""")
    if not rows:  # no Supabase roles on this server: PUBLIC must be revoked at least
        rows = query(database, """
            select p.proname, 'public', has_function_privilege('public', p.oid, 'execute')
              from pg_proc p join pg_namespace n on n.oid = p.pronamespace
             where n.nspname = 'public' and p.proname like 'listener\\_%%'""")
    assert rows
    for name, role, allowed in rows:
        assert allowed == (role == "service_role"), (name, role)
    assert query(database, "select relrowsecurity from pg_class where relname in "
                           "('listener_ledger', 'listener_lease')") == [(True,), (True,)]
