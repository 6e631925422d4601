"""Sources for any table: NOTIFY payloads of the watch trigger and Realtime
frames of several tables on one channel, keyed by each table's key column."""
from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from listener import migrate
from listener.adapters.source_notify import NotifySource
from listener.adapters.supabase import RealtimeSource
from listener.changes import Change
from listener.source import Backoff
from tests.servers.postgrest_server import SERVICE_ROLE_KEY
from tests.servers.realtime_server import RealtimeServer
from tests.sql_tables import QUERIES, USER, create_tables, uid

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # realtime / websockets


class Sink:
    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.bad: list[tuple[str, str]] = []
        self.subscriptions = 0

    def put(self, change: Change) -> None:
        self.changes.append(change)

    def bad_input(self, kind: str, detail: str, session_id: str | None = None) -> None:
        self.bad.append((kind, detail))

    def subscribed(self, source: str) -> None:
        self.subscriptions += 1

    def unsubscribed(self, source: str, reason: str) -> None:
        pass


async def until(predicate: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


def write_rows(conninfo: str) -> None:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("insert into public.test_holds (hold_no, state, customer_id) "
                     "values (41, 'held', %s)", (USER,))
        conn.execute("insert into public.sessions (id, status) values (%s, 'pending')", (uid(9),))
        conn.execute("update public.test_holds set state = 'confirmed' where hold_no = 41")
        conn.execute("delete from public.test_holds where hold_no = 41")


async def test_notify_source_reads_every_watched_table(database: str) -> None:
    create_tables(database)
    migrate.apply(database, queries=QUERIES)
    source = NotifySource(database, {t: q for t, q in QUERIES.items() if t != "sessions"})
    sink = Sink()
    task = asyncio.create_task(source.run(sink))
    try:
        await until(lambda: sink.subscriptions == 1)
        write_rows(database)
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("select pg_notify('listener_changes', 'not json')")
            conn.execute("insert into public.session_extensions (session_id, minutes) "
                         "values (%s, 5)", (uid(9),))
        await until(lambda: len(sink.changes) == 4 and sink.bad)
    finally:
        task.cancel()
    got = [(c.type, c.table, c.key, None if c.record is None else c.record.get("state"))
           for c in sink.changes]
    # sessions is not among this source's tables: its change is ignored.
    assert got[:3] == [("INSERT", "test_holds", "41", "held"),
                       ("UPDATE", "test_holds", "41", "confirmed"),
                       ("DELETE", "test_holds", "41", None)]
    assert got[3][:2] == ("INSERT", "session_extensions")
    assert sink.changes[1].record["_version"]
    assert sink.bad[0][0] == "notify_payload"


async def test_realtime_source_one_channel_for_several_tables(database: str) -> None:
    create_tables(database)
    migrate.apply(database, queries=QUERIES)
    async with RealtimeServer(database, tables=("public.test_holds", "public.sessions")) as rt:
        queries = {t: QUERIES[t] for t in ("test_holds", "sessions")}
        source = RealtimeSource(rt.url, SERVICE_ROLE_KEY, queries,
                                backoff=Backoff(0.05, 0.2))
        sink = Sink()
        task = asyncio.create_task(source.run(sink))
        try:
            await until(lambda: sink.subscriptions == 1)
            write_rows(database)
            await until(lambda: len(sink.changes) == 4)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        joined = [f for _, f in rt.frames_in if f.get("event") == "phx_join"]
    assert len(joined) == 1
    bindings = joined[0]["payload"]["config"]["postgres_changes"]
    assert sorted(b["table"] for b in bindings) == ["sessions", "test_holds"]
    got = sorted((c.type, c.table, c.key) for c in sink.changes)
    assert got == sorted([("INSERT", "test_holds", "41"), ("UPDATE", "test_holds", "41"),
                          ("DELETE", "test_holds", "41"), ("INSERT", "sessions", uid(9))])
    insert = next(c for c in sink.changes if c.type == "INSERT" and c.table == "test_holds")
    assert insert.record is not None and insert.record["state"] == "held"
    assert not sink.bad
