"""One contract, three stores: the same sequence of calls against MemoryStore,
SqlStore (psycopg) and RpcStore (PostgREST, through the test server) gives the
same answers."""
from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta
from importlib import resources
from typing import Any, Callable

import psycopg
import pytest

from listener import migrate
from listener.adapters.store_memory import MemoryStore, time_of
from listener.adapters.store_sql import SqlStore
from listener.adapters.supabase import RpcStore
from listener.instants import SECOND, parse_instant
from listener.store import ActionKey, Fence, FireRequest
from tests.servers.postgrest_server import SERVICE_ROLE_KEY, PostgrestServer, setup_supabase_roles
from tests.sql_tables import (
    MECHANIC, QUERIES, RECIPIENTS, USER, create_tables, insert, iso, now, uid)

TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT|^-?infinity$")
NOW = now()
DUE = parse_instant(NOW.isoformat())
Write = Callable[[str, dict[str, Any]], None]


def before(**kw: float) -> datetime:
    # Every store sees the same instants, however long the runs before it took.
    return NOW - timedelta(**kw)


def normal(value: Any) -> Any:
    """Answers with what may differ between stores taken out: versions (xmin or
    a counter) become "v", timestamps their instant whatever their spelling."""
    if isinstance(value, dict):
        return {k: ("v" if k == "_version" and isinstance(v, str) else normal(v))
                for k, v in value.items() if k != "_changed_at"}
    if isinstance(value, (list, tuple)):
        return [normal(v) for v in value]
    if isinstance(value, str) and TIMESTAMP.match(value):
        return ("t", time_of(value))
    return value


async def pages(store: Any, table: str) -> list[list[dict[str, Any]]]:
    return [p async for p in store.tracked_pages(table)]


async def scenario(store: Any, write: Write) -> list[Any]:
    """Every port method, each outcome of fire; the answers, in order."""
    out: list[Any] = []
    token = await store.acquire_lease("a", 60)
    out.append(("acquire", token is not None, await store.acquire_lease("b", 60)))
    f = Fence("a", token)
    stamp = iso(before(minutes=1))
    for no, state, extra in ((1, "held", {}), (2, "held", {"expires_at": None}),
                             (3, "confirmed", {"mechanic_id": MECHANIC}),
                             (4, "expired", {}), (5, "held", {"expires_at": "infinity"}),
                             (6, "held", {"expires_at": "9999-12-31T00:00:00+00:00"}),
                             (7, "confirmed", {"status_changed_at": iso(before(hours=3))})):
        write("test_holds", {"hold_no": no, "state": state, "customer_id": USER,
                             "mechanic_id": None, "expires_at": iso(NOW),
                             "reminder_sent": False, "status_changed_at": stamp, **extra})
    sessions = {uid(1): ("live", before(minutes=5), "chat10"), uid(2): ("live", before(minutes=5), "x"),
                uid(3): ("completed", before(hours=3), "chat10"),
                uid(4): ("completed", before(hours=3), "chat10")}
    for sid, (status, started, plan) in sessions.items():
        write("sessions", {"id": sid, "status": status, "started_at": iso(started),
                           "expires_at": None, "ended_at": None, "plan": plan,
                           "status_changed_at": stamp})
    for n, (sid, minutes) in enumerate(((uid(3), 50), (uid(3), 30), (uid(4), 10),
                                        (uid(1), 5)), start=11):
        write("session_extensions", {"id": uid(n), "session_id": sid, "minutes": minutes})
    for table in ("test_holds", "sessions", "session_extensions"):
        out.append((f"tracked {table}", await pages(store, table)))
    out.append(("read", await store.read_row("test_holds", "1"),
                await store.read_row("test_holds", "404")))

    hold = ActionKey("hold_expiry", "test_holds", "1", DUE)
    out.append(("fire", await store.fire(FireRequest(
        hold, DUE + SECOND, expected=("held",), status="expired", reason="lapsed",
        set_columns={"reminder_sent": True, "no_such_column": 1}, finish="fired",
        lateness_ms=1000, detail={"k": 1},
        timeline={"table": "test_hold_events", "row": {"event": "hold.expired",
                                                       "hold_no": 1}}), f)))
    out.append(("again", await store.fire(FireRequest(hold, DUE, status="expired",
                                                      reason="lapsed"), f)))
    out.append(("stale", await store.fire(FireRequest(
        ActionKey("hold_expiry", "test_holds", "2", DUE), DUE, version="0",
        expected=("held",), status="expired", reason="lapsed"), f)))
    out.append(("conflict", await store.fire(FireRequest(
        ActionKey("hold_expiry", "test_holds", "4", DUE), DUE, expected=("held",),
        status="cancelled", reason="x"), f)))
    out.append(("missing", await store.fire(FireRequest(
        ActionKey("hold_expiry", "test_holds", "404", DUE), DUE, expected=("held",),
        status="expired", reason="x"), f)))
    out.append(("fenced", await store.fire(FireRequest(hold, DUE), Fence("a", token + 1))))
    reminder = ActionKey("hold_reminder", "test_holds", "3", DUE)
    out.append(("claim", await store.fire(FireRequest(reminder, DUE + 2 * SECOND), f)))
    out.append(("unfinished", sorted(
        (c.key, c.status_applied, c.attempts, c.fired_at) for c in await store.unfinished_claims())))
    out.append(("complete", await store.complete(reminder, f, "fired", DUE, 5, {"sent": 1}),
                await store.complete(reminder, f, "fired", DUE, 5, {"sent": 1})))
    out.append(("unfinished after", await store.unfinished_claims()))
    out.append(("contacts", await store.contacts("test_holds", "3"),
                await store.contacts("test_holds", "404")))
    out.append(("tracked after", await pages(store, "test_holds")))
    out.append(("renew", await store.renew_lease(f, 60),
                await store.renew_lease(Fence("b", token), 60)))
    await store.release_lease(f)
    out.append(("released", await store.fire(FireRequest(hold, DUE), f),
                await store.renew_lease(f, 60)))
    return normal(out)


async def changes(store: Any, write: Write, since: int) -> list[Any]:
    for no in (31, 33, 32):
        write("test_holds", {"hold_no": no, "state": "expired", "customer_id": None,
                             "mechanic_id": None, "expires_at": None, "reminder_sent": False,
                             "status_changed_at": iso(NOW)})
    rows = await store.changed_since("test_holds", since, 100)
    return [r["hold_no"] for r in rows if r["hold_no"] > 30] + [
        len(await store.changed_since("test_holds", since, 2))]


@pytest.fixture
def prepared(database: str) -> str:
    create_tables(database)
    migrate.apply(database, queries=QUERIES)
    return database


def sql_writer(conninfo: str) -> tuple[Write, psycopg.Connection]:
    conn = psycopg.connect(conninfo, autocommit=True)
    return (lambda table, record: insert(conn, table, record)), conn


def memory_writer(store: MemoryStore) -> Write:
    return lambda table, record: store.write(table, record, store.clock.now())


def seed_memory_contacts(store: MemoryStore) -> None:
    store.write("auth.users", {"id": USER, "email": "cust@example.com"}, 0)
    store.write("profiles", {"id": USER, "full_name": "Cus Tomer"}, 0)
    store.write("mechanics", {"id": MECHANIC, "name": "Mec Hanic", "email": "mech@example.com"}, 0)


async def run_memory() -> tuple[list[Any], list[Any]]:
    store = MemoryStore(QUERIES, recipients=RECIPIENTS, page=2)
    seed_memory_contacts(store)
    answers = await scenario(store, memory_writer(store))
    since = store.clock.now()
    return answers, await changes(store, memory_writer(store), since)


async def test_memory_and_sql_answer_alike(prepared: str) -> None:
    memory, memory_changes = await run_memory()
    store = SqlStore(prepared, QUERIES, recipients=RECIPIENTS, min_size=1, max_size=2, page=2)
    await store.open()
    write, conn = sql_writer(prepared)
    try:
        sql = await scenario(store, write)
        since = parse_instant(conn.execute("select clock_timestamp()").fetchone()[0])
        sql_changes = await changes(store, write, since)
        timeline = conn.execute("select event, hold_no from public.test_hold_events").fetchall()
    finally:
        conn.close()
        await store.close()
    for step_memory, step_sql in zip(memory, sql):
        assert step_memory == step_sql
    assert len(memory) == len(sql)
    assert memory_changes == sql_changes == [31, 33, 32, 2]
    assert timeline == [("hold.expired", 1)]


async def test_rpc_answers_like_sql(prepared: str) -> None:
    # The API roles as on Supabase; re-running 0006 grants service_role what it may call.
    await setup_supabase_roles(prepared)
    with psycopg.connect(prepared, autocommit=True) as conn:
        conn.execute(resources.files("listener.migrations")
                     .joinpath("0006_rows_of_any_table.sql").read_text())
    memory, _ = await run_memory()
    async with PostgrestServer(prepared) as rest:
        store = RpcStore(rest.url, SERVICE_ROLE_KEY, QUERIES, recipients=RECIPIENTS, page=2,
                         max_attempts=1)
        await store.open()
        write, conn = sql_writer(prepared)
        try:
            await store.check()
            rpc = await scenario(store, write)
            since = parse_instant(conn.execute("select clock_timestamp()").fetchone()[0])
            rpc_changes = await changes(store, write, since)
        finally:
            conn.close()
            await store.close()
        called = {c.function for c in rest.calls}
    for step_memory, step_rpc in zip(memory, rpc):
        assert step_memory == step_rpc
    assert len(memory) == len(rpc)
    assert rpc_changes == [31, 33, 32, 2]
    assert {"listener_fire_v2", "listener_tracked_rows_v3", "listener_changed_rows_v3",
            "listener_contacts_v2", "listener_complete_v2"} <= called


async def test_rpc_fire_with_a_lost_answer_is_settled_by_the_ledger(prepared: str) -> None:
    await setup_supabase_roles(prepared)
    with psycopg.connect(prepared, autocommit=True) as conn:
        conn.execute(resources.files("listener.migrations")
                     .joinpath("0006_rows_of_any_table.sql").read_text())
        insert(conn, "test_holds", {"hold_no": 1, "state": "held", "expires_at": iso(NOW)})
    async with PostgrestServer(prepared) as rest:
        store = RpcStore(rest.url, SERVICE_ROLE_KEY, QUERIES, timeout=0.5, max_attempts=3,
                         retry_initial_s=0.01)
        await store.open()
        try:
            f = Fence("a", await store.acquire_lease("a", 60))
            version = (await store.read_row("test_holds", "1"))["_version"]
            rest.hang_after_commit, rest.hang_seconds = True, 2.0
            request = FireRequest(ActionKey("hold_expiry", "test_holds", "1", DUE), DUE,
                                  version=version, expected=("held",), status="expired",
                                  reason="lapsed")
            task = asyncio.ensure_future(store.fire(request, f))
            await rest.wait_for(lambda: any(c.function == "listener_fire_v2"
                                            for c in rest.calls))
            await asyncio.sleep(0.2)  # committed, and sitting on the answer
            rest.hang_after_commit, rest.hang_seconds = False, 0.0
            fired = await task
        finally:
            await store.close()
    # The first attempt committed; its answer was lost. The ledger says so: applied
    # (a blind retry would find the row at a new version, its own: 'stale').
    assert fired.outcome == "claimed" and fired.status_applied
    assert fired.row["state"] == "expired"
