"""The v2 SQL functions on real PostgreSQL, through SqlStore (the calls table):
a second table with its own key and status column, sessions with a derived
plan end, a child table, the NOTIFY trigger of a watched table."""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator

import psycopg
import pytest

from listener import migrate
from listener.adapters.calls import FIRE, TRACKED_ROWS, query_json
from listener.adapters.source_notify import change_from_notify
from listener.adapters.store_sql import SqlStore
from listener.instants import MINUTE, format_instant, parse_instant
from listener.store import (
    CLAIMED, CONFLICT, DONE, FENCED, MISSING, STALE, ActionKey, Fence, FireRequest, all_tracked)
from tests.sql_tables import (
    MECHANIC, MECHANIC_NO_EMAIL, QUERIES, RECIPIENTS, USER, ago, create_tables, insert, now,
    uid)

NOW = now()
DUE = parse_instant(NOW.isoformat())
assert DUE is not None


@pytest.fixture
async def store(database: str) -> AsyncIterator[SqlStore]:
    create_tables(database)
    migrate.apply(database, queries=QUERIES)
    s = SqlStore(database, QUERIES, recipients=RECIPIENTS, min_size=1, max_size=3, page=2)
    await s.open()
    yield s
    await s.close()


@pytest.fixture
def db(database: str, store: SqlStore) -> psycopg.Connection:
    with psycopg.connect(database, autocommit=True) as conn:
        yield conn


async def fence(store: SqlStore) -> Fence:
    token = await store.acquire_lease("me", 60)
    assert token is not None
    return Fence("me", token)


def hold(no: int, state: str = "held", **kw: Any) -> dict[str, Any]:
    return {"hold_no": no, "state": state, "customer_id": USER, "expires_at": NOW, **kw}


def ledger(db: psycopg.Connection) -> list[dict[str, Any]]:
    cur = db.cursor(row_factory=psycopg.rows.dict_row)
    return cur.execute("select * from public.listener_ledger order by claimed_at").fetchall()


# ------------------------------------------------------------------- fire


async def test_fire_compare_and_sets_a_second_table(store: SqlStore, db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(7))
    f = await fence(store)
    key = ActionKey("hold_expiry", "test_holds", "7", DUE)
    fired = await store.fire(FireRequest(
        key, DUE + 1000, expected=("held",), status="expired", reason="hold_lapsed",
        set_columns={"reminder_sent": True, "no_such_column": 1}, finish="fired",
        lateness_ms=1, detail={"why": "test"}), f)
    assert fired.outcome == CLAIMED and fired.status_applied
    row = fired.row
    assert row is not None
    assert row["state"] == "expired" and row["reminder_sent"] is True
    # status_changed_at is the instant it fired, not the commit's.
    assert parse_instant(row["status_changed_at"]) == DUE + 1000
    assert row == await store.read_row("test_holds", "7")
    entry, = ledger(db)
    assert (entry["table_name"], entry["row_key"], entry["session_id"], entry["state"]) == (
        "test_holds", "7", None, "fired")
    assert entry["detail"] == {"why": "test"}
    # Done once: the same episode again changes nothing.
    again = await store.fire(FireRequest(key, DUE + 2000, expected=("held",), status="expired",
                                         reason="hold_lapsed"), f)
    assert again.outcome == DONE


async def test_fire_merges_metadata_and_sets_ended_and_cancelled_where_they_exist(
        store: SqlStore, db: psycopg.Connection) -> None:
    sid, other = uid(1), uid(2)
    for s in (sid, other):
        db.execute("insert into public.sessions (id, status, started_at, metadata) values "
                   "(%s, 'live', %s, '{\"app\": {\"keep\": 1}}')", (s, ago(minutes=10)))
    f = await fence(store)
    done = await store.fire(FireRequest(ActionKey("plan_time_expiry", "sessions", sid, DUE), DUE,
                                        expected=("live",), status="completed",
                                        reason="plan_time_elapsed", finish="fired"), f)
    assert done.outcome == CLAIMED
    cancelled = await store.fire(FireRequest(ActionKey("no_show", "sessions", other, DUE), DUE,
                                             expected=("live",), status="cancelled",
                                             reason="no_show", finish="fired"), f)
    assert cancelled.outcome == CLAIMED
    rows = {r[0]: r[1:] for r in db.execute(
        "select id::text, metadata, ended_at, cancelled_at from public.sessions")}
    metadata, ended, cancelled_at = rows[sid]
    assert metadata["app"] == {"keep": 1}
    assert metadata["listener"]["rule"] == "plan_time_expiry"
    assert metadata["listener"]["reason"] == "plan_time_elapsed"
    assert parse_instant(metadata["listener"]["at"]) == DUE
    assert parse_instant(ended) == DUE and cancelled_at is None
    assert parse_instant(rows[other][2]) == DUE and rows[other][1] is None
    # The ledger keeps session_id for rows of sessions (the app's admin pages join on it).
    assert {str(e["session_id"]) for e in ledger(db)} == {sid, other}
    # test_holds has no metadata column: nothing to merge, and no error.
    insert(db, "test_holds", hold(1))
    fired = await store.fire(FireRequest(ActionKey("hold_expiry", "test_holds", "1", DUE), DUE,
                                         expected=("held",), status="cancelled", reason="x"), f)
    assert fired.outcome == CLAIMED and fired.row["state"] == "cancelled"


async def test_stale_conflict_missing_fenced(store: SqlStore, db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(3))
    f = await fence(store)
    row = await store.read_row("test_holds", "3")
    assert row is not None
    key = ActionKey("hold_expiry", "test_holds", "3", DUE)
    stale = await store.fire(FireRequest(key, DUE, version=str(int(row["_version"]) + 1),
                                         expected=("held",), status="expired", reason="x"), f)
    assert stale.outcome == STALE and stale.row == row
    assert ledger(db) == []  # nothing claimed
    db.execute("update public.test_holds set state = 'confirmed' where hold_no = 3")
    conflict = await store.fire(FireRequest(key, DUE, expected=("held",), status="expired",
                                            reason="x"), f)
    assert conflict.outcome == CONFLICT and conflict.row["state"] == "confirmed"
    assert not conflict.status_applied
    missing = await store.fire(FireRequest(ActionKey("hold_expiry", "test_holds", "404", DUE), DUE,
                                           expected=("held",), status="expired", reason="x"), f)
    assert missing.outcome == MISSING
    fenced = await store.fire(FireRequest(key, DUE, status="expired", reason="x"),
                              Fence("me", f.token + 1))
    assert fenced.outcome == FENCED
    assert not await store.complete(key, Fence("other", f.token), "fired", DUE, 0, {})
    # The claim the conflict left is finished by its holder, once.
    assert await store.complete(key, f, "skipped", DUE, 0, {"why": "moved on"})
    assert not await store.complete(key, f, "skipped", DUE, 0, {"why": "moved on"})
    assert [e["state"] for e in ledger(db)] == ["skipped"]


async def test_a_version_matches_what_notify_and_reads_carry(store: SqlStore,
                                                             db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(5))
    row = await store.read_row("test_holds", "5")
    f = await fence(store)
    fired = await store.fire(FireRequest(ActionKey("hold_expiry", "test_holds", "5", DUE), DUE,
                                         version=row["_version"], expected=("held",),
                                         status="expired", reason="x"), f)
    assert fired.outcome == CLAIMED and fired.row["_version"] != row["_version"]


async def test_timeline_row_when_the_action_finishes(store: SqlStore,
                                                     db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(9))
    f = await fence(store)
    timeline = {"table": "test_hold_events",
                "row": {"event": "hold.expired", "hold_no": 9, "not_a_column": "x"}}
    key = ActionKey("hold_expiry", "test_holds", "9", DUE)
    claimed = await store.fire(FireRequest(key, DUE, expected=("held",), status="expired",
                                           reason="x", timeline=timeline), f)
    assert claimed.outcome == CLAIMED
    assert db.execute("select count(*) from public.test_hold_events").fetchone()[0] == 0
    assert await store.complete(key, f, "fired", DUE, 0, {}, timeline=timeline)
    events = db.execute("select event, hold_no, created_at is not null "
                        "from public.test_hold_events").fetchall()
    assert events == [("hold.expired", 9, True)]
    # A row the timeline refuses is recorded in the detail; the action stands.
    refused = {"table": "test_hold_events", "row": {"event": "refused", "hold_no": 9}}
    other = ActionKey("hold_reminder", "test_holds", "9", DUE)
    fired = await store.fire(FireRequest(other, DUE, finish="fired", timeline=refused,
                                         detail={"a": 1}), f)
    assert fired.outcome == CLAIMED
    detail = db.execute("select detail from public.listener_ledger where rule = 'hold_reminder'"
                        ).fetchone()[0]
    assert detail["a"] == 1 and "23514" in detail["timeline_error"]
    # A timeline table that does not exist is skipped.
    gone = ActionKey("hold_reminder", "test_holds", "9", DUE + 1)
    fired = await store.fire(FireRequest(gone, DUE, finish="fired",
                                         timeline={"table": "nope", "row": {"a": 1}}), f)
    assert fired.outcome == CLAIMED


async def test_unfinished_claims_name_table_and_key(store: SqlStore,
                                                    db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(4))
    f = await fence(store)
    key = ActionKey("hold_expiry", "test_holds", "4", DUE)
    await store.fire(FireRequest(key, DUE + 5, expected=("held",), status="expired",
                                 reason="x"), f)
    db.execute("update public.listener_ledger set batch_key = 'b1'")
    claim, = await store.unfinished_claims()
    assert claim.key == key and claim.status_applied and claim.attempts == 1
    assert claim.fired_at == DUE + 5 and claim.batch_key == "b1"


# ------------------------------------------------------------------- reads


async def test_extreme_timestamps_come_back_as_text(store: SqlStore, db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(1, expires_at="infinity"))
    insert(db, "test_holds", hold(2, expires_at="9999-12-31T23:59:59+00:00"))
    rows = await all_tracked(store, "test_holds")
    assert [r["expires_at"] for r in rows] == ["infinity", "9999-12-31T23:59:59+00:00"]


async def test_tracked_rows_follow_the_conditions(store: SqlStore, db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(1))                                   # hold_expiry
    insert(db, "test_holds", hold(2, expires_at=None))                  # hold_reminder
    insert(db, "test_holds", hold(3, expires_at=None, mechanic_id=MECHANIC))  # absent fails
    insert(db, "test_holds", hold(4, "expired"))                        # no status matches
    insert(db, "test_holds", hold(5, expires_at=None, customer_id=None))  # present fails
    insert(db, "test_holds", hold(6, "confirmed", expires_at=None))     # hold_reminder
    # Email only and its anchor past the horizon: not loaded.
    insert(db, "test_holds", hold(8, "confirmed", expires_at=None,
                                  status_changed_at=ago(hours=3)))
    pages = [p async for p in store.tracked_pages("test_holds")]
    assert [[r["hold_no"] for r in p] for p in pages] == [[1, 2], [6]]  # keyset, page 2
    assert all(isinstance(r["_version"], str) for p in pages for r in p)


async def test_derived_plan_end_with_a_child_sum(store: SqlStore, db: psycopg.Connection) -> None:
    live_known, live_unknown, live_paid, done_recent, done_old = (uid(i) for i in range(1, 6))
    rows = [(live_known, "live", ago(minutes=5), "chat10", None),
            (live_unknown, "live", ago(minutes=5), "mystery", None),   # no computable end
            (live_paid, "live", ago(minutes=5), "mystery", ago(minutes=1)),  # expires_at
            # Completed: plan end = start + 30 min (+ extensions), horizon 2 h.
            (done_recent, "completed", ago(hours=3), "chat10", None),
            (done_old, "completed", ago(hours=3), "chat10", None)]
    for sid, status, started, plan, expires in rows:
        db.execute("insert into public.sessions (id, status, started_at, plan, expires_at) "
                   "values (%s, %s, %s, %s, %s)", (sid, status, started, plan, expires))
    # Only the extension makes done_recent's plan end recent enough: 3 h ago + 30 + 80 min.
    db.execute("insert into public.session_extensions (session_id, minutes) values "
               "(%s, 50), (%s, 30), (%s, 10)", (done_recent, done_recent, done_old))
    tracked = {r["id"] for r in await all_tracked(store, "sessions")}
    assert tracked == {live_known, live_paid, done_recent}
    children = await all_tracked(store, "session_extensions")
    assert sorted((c["session_id"], c["minutes"]) for c in children) == [
        (done_recent, 30), (done_recent, 50)]


async def test_changed_rows_are_the_incremental_read(store: SqlStore,
                                                     db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(1))
    insert(db, "test_holds", hold(2, "expired"))  # changed, though no rule tracks it
    mark = parse_instant(db.execute("select clock_timestamp()").fetchone()[0])
    insert(db, "test_holds", hold(3))
    db.execute("update public.test_holds set reminder_sent = true where hold_no = 1")
    rows = await store.changed_since("test_holds", mark, 10)
    assert [r["hold_no"] for r in rows] == [3, 1]
    stamps = [parse_instant(r["_changed_at"]) for r in rows]
    assert stamps == sorted(stamps) and stamps[0] >= mark
    assert [r["hold_no"] for r in await store.changed_since("test_holds", mark, 1)] == [3]
    plan = db.execute(
        "explain select * from public.test_holds where listener_changed_at >= now() "
        "order by listener_changed_at limit 10").fetchall()
    assert "listener_changed_at" in " ".join(r[0] for r in plan)


def v2_rows(db: psycopg.Connection, function: str, table: str, arg: Any, limit: int) -> Any:
    """The same read through the release-2 function (one jsonb object per row)."""
    return db.execute(f"select public.{function}(%s::jsonb, %s, %s)",
                      (json.dumps(query_json(QUERIES, table)), arg, limit)).fetchone()[0]


async def test_lean_pages_hold_what_the_v2_functions_answered(store: SqlStore,
                                                              db: psycopg.Connection) -> None:
    # Pages name their columns once; each row, rebuilt from them, is the row
    # object the v2 functions answered: same rows, order, values and versions.
    mark = parse_instant(db.execute("select clock_timestamp()").fetchone()[0])
    insert(db, "test_holds", hold(1))
    insert(db, "test_holds", hold(2, expires_at=None, customer_id=None))
    insert(db, "test_holds", hold(3, expires_at="infinity"))
    insert(db, "test_holds", hold(4, expires_at=None))
    db.execute("update public.test_holds set reminder_sent = true where hold_no = 1")
    assert await all_tracked(store, "test_holds") == v2_rows(
        db, "listener_tracked_rows_v2", "test_holds", None, 100)
    changed = await store.changed_since("test_holds", mark, 100)
    assert [r["hold_no"] for r in changed] == [2, 3, 4, 1]
    assert changed == v2_rows(db, "listener_changed_rows_v2", "test_holds", format_instant(mark),
                              100)
    page = db.execute("select public.listener_tracked_rows_v3(%s::jsonb, null, 10)",
                      (json.dumps(query_json(QUERIES, "test_holds")),)).fetchone()[0]
    assert page["columns"][-1] == "_version" and "hold_no" in page["columns"]
    assert all(isinstance(r, list) and len(r) == len(page["columns"]) for r in page["rows"])


async def test_a_page_of_rows_with_more_columns_than_a_call_takes(database: str) -> None:
    # json_build_array, like every function call, takes at most 100 arguments.
    names = [f"c{i:03}" for i in range(150)]
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("create table public.wide (id bigint primary key, state text, "
                     "due timestamptz, " + ", ".join(f"{n} integer" for n in names) + ")")
        conn.execute("insert into public.wide (id, state, due, " + ", ".join(names)
                     + ") values (1, 'on', now(), " + ", ".join(str(i) for i in range(150)) + ")")
    query = {"table": "wide", "key": "id", "status": "state",
             "columns": ["id", "state", "due", *names],
             "conditions": [{"rule": "r", "statuses": ["on"], "present": [], "absent": [],
                             "anchors": [{"column": "due"}], "offset_us": 0,
                             "horizon_us": None}]}
    migrate.apply(database)
    s = SqlStore(database, {}, min_size=1, max_size=1)
    await s.open()
    try:
        row, = await s._call(TRACKED_ROWS, {"p_query": query, "p_after": None, "p_limit": 10})
    finally:
        await s.close()
    assert [row[n] for n in names] == list(range(150))
    assert (row["id"], row["state"], isinstance(row["_version"], str)) == (1, "on", True)


async def test_contacts_by_declared_columns(store: SqlStore, db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(1, mechanic_id=MECHANIC))
    insert(db, "test_holds", hold(2, mechanic_id=MECHANIC_NO_EMAIL))
    insert(db, "test_holds", hold(3, customer_id=None))
    one = await store.contacts("test_holds", "1")
    assert one["customer"].email == "cust@example.com" and one["customer"].name == "Cus Tomer"
    assert one["mechanic"].email == "mech@example.com" and one["mechanic"].name == "Mec Hanic"
    assert "helper" not in one and "support" not in one  # no such column; no column at all
    # The first source without an email falls through to the next.
    assert (await store.contacts("test_holds", "2"))["mechanic"].email == "cust@example.com"
    assert await store.contacts("test_holds", "3") == {}
    assert await store.contacts("test_holds", "404") == {}


async def test_describe_tables(store: SqlStore) -> None:
    described = await store.describe(["test_holds", "no_such_table"])
    holds = described["test_holds"]
    assert holds["exists"] and holds["primary_key"] == ["hold_no"]
    assert holds["columns"]["expires_at"] == "timestamp with time zone"
    assert "'expired'::text" in holds["checks"]["state"][0]
    assert described["no_such_table"] == {"exists": False, "primary_key": [], "columns": {},
                                          "checks": {}}


async def test_missing_columns_make_a_condition_inactive_not_an_error(store: SqlStore,
                                                                     db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(1))
    query = query_json(QUERIES, "test_holds")
    query["columns"].append("no_such_column")
    query["conditions"] = [{**query["conditions"][0], "present": ["no_such_column"]}]
    page = await store._call(store_calls().TRACKED_ROWS,
                             {"p_query": query, "p_after": None, "p_limit": 10})
    assert [r["hold_no"] for r in page] == []


def store_calls() -> Any:
    from listener.adapters import calls

    return calls


# ------------------------------------------------------------------- the watch


async def test_notify_payloads_of_a_watched_table(store: SqlStore, database: str,
                                                  db: psycopg.Connection) -> None:
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as listen:
        await listen.execute("LISTEN listener_changes")
        insert(db, "test_holds", hold(1))
        db.execute("update public.test_holds set state = 'confirmed' where hold_no = 1")
        xid = db.execute("select xmin::text from public.test_holds where hold_no = 1").fetchone()[0]
        db.execute("update public.test_holds set customer_id = null where hold_no = 1")
        db.execute("delete from public.test_holds where hold_no = 1")
        payloads = []
        async for note in listen.notifies(timeout=2, stop_after=4):
            payloads.append(note.payload)
    first, second, _, deleted = (json.loads(p) for p in payloads)
    assert first["type"] == "INSERT" and first["table"] == "test_holds"
    assert set(first["record"]) == {"hold_no", "state", "customer_id", "mechanic_id",
                                    "expires_at", "reminder_sent", "status_changed_at",
                                    "_version"}
    assert second["record"]["_version"] == xid and second["record"]["state"] == "confirmed"
    assert deleted == {"type": "DELETE", "table": "test_holds", "old_record": {"hold_no": 1}}
    change = change_from_notify(payloads[1], {"test_holds": "hold_no"})
    assert (change.table, change.key, change.record["state"]) == ("test_holds", "1", "confirmed")


async def test_status_changed_at_follows_the_declared_status_column(
        store: SqlStore, db: psycopg.Connection) -> None:
    insert(db, "test_holds", hold(1))
    first = db.execute("select status_changed_at from public.test_holds").fetchone()[0]
    db.execute("update public.test_holds set reminder_sent = true")
    assert db.execute("select status_changed_at from public.test_holds").fetchone()[0] == first
    await asyncio.sleep(0.01)
    db.execute("update public.test_holds set state = 'confirmed'")
    assert db.execute("select status_changed_at from public.test_holds").fetchone()[0] > first


async def test_an_oversized_row_notifies_its_key_alone(store: SqlStore, database: str,
                                                       db: psycopg.Connection) -> None:
    db.execute("alter table public.test_holds drop constraint test_holds_state_check")
    async with await psycopg.AsyncConnection.connect(database, autocommit=True) as listen:
        await listen.execute("LISTEN listener_changes")
        insert(db, "test_holds", hold(12, "x" * 9000))
        note = await anext(listen.notifies(timeout=2, stop_after=1))
    assert json.loads(note.payload) == {"type": "INSERT", "table": "test_holds", "key": "12",
                                        "truncated": True}
    change = change_from_notify(note.payload)
    assert (change.table, change.key, change.record) == ("test_holds", "12", None)


def test_fire_call_names_every_parameter() -> None:
    assert FIRE.sql().startswith("select public.listener_fire_v2(p_table => %(p_table)s::text")
    assert MINUTE == 60_000_000
