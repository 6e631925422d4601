"""Faults on real PostgreSQL with the real daemon: a change the source drops, rows
with timestamps Python cannot hold, garbage NOTIFY payloads, a contacts lookup
whose backend is terminated, a bug in the sweep. Each time the ordinary rows are
still handled, on time, once."""
from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog

from listener import daemon as daemon_module
from listener import metrics
from listener.adapters.calls import CONTACTS, TRACKED_ROWS, key_fits_type
from listener.adapters.source_notify import NotifySource
from listener.adapters.store_sql import SqlStore
from tests.live import LiveDaemon, eventually, insert_session, ledger, query, seed_people


def bad_input(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("listener_bad_input_total", {"kind": kind}) or 0.0


class DroppingSource(NotifySource):
    """The real NOTIFY source, but the change of one row never reaches the daemon,
    as a Realtime socket that looks healthy can lose a frame."""

    def __init__(self, conninfo: str, **kwargs: Any) -> None:
        super().__init__(conninfo, **kwargs)
        self.drop: set[str] = set()
        self.dropped = 0

    async def run(self, sink: Any) -> None:
        source = self

        class Lossy:
            def __getattr__(self, name: str) -> Any:
                return getattr(sink, name)

            def put(self, change: Any) -> None:
                if change.key in source.drop:
                    source.dropped += 1
                    return
                sink.put(change)

        await super().run(Lossy())


async def seconds_to_act_on_a_dropped_request(live: LiveDaemon, source: DroppingSource,
                                              sid: str) -> float:
    """Commit a request the source drops, already 16 minutes old (it owes its
    expiry the moment it is seen); the seconds from its commit to the action."""
    source.drop.add(sid)
    committed = time.monotonic()
    with psycopg.connect(live.conninfo, autocommit=True) as conn:
        conn.execute("insert into public.sessions (id, status, customer_user_id, "
                     "status_changed_at) values (%s, 'pending', "
                     "'22222222-2222-4222-8222-222222222222', now() - interval '16 minutes')",
                     (sid,))
    await eventually(lambda: any(r.key.row_key == sid for r in live.fired("request_expiry")),
                     timeout=10)
    assert source.dropped >= 1, "the change was not dropped: the test proves nothing"
    return time.monotonic() - committed


async def test_a_change_the_source_dropped_is_acted_on_within_seconds(
        database: str, tmp_path: Path) -> None:
    seed_people(database)
    source = DroppingSource(database, idle_probe=2.0)
    # Real-time thresholds and a full sweep only every 10 minutes: only the
    # incremental read can find the row in time.
    async with LiveDaemon(database, tmp_path, env={}, source=source, reconcile_s=600) as live:
        await live.active()
        sid = "0a000000-0000-4000-8000-00000000000d"
        elapsed = await seconds_to_act_on_a_dropped_request(live, source, sid)
    assert elapsed < 5.0, f"found {elapsed:.2f} s after its commit"
    print(f"\ndropped change acted on {elapsed:.2f} s after its commit")
    assert query(database, "select status from public.sessions where id = %s", sid) == [
        ("expired",)]


async def test_a_change_dropped_after_a_burst_larger_than_a_page_is_still_found(
        database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A burst of more changed rows than one page of the incremental read, within
    # its overlap: the read must page on past it to the change the source lost.
    monkeypatch.setattr(daemon_module, "CATCH_UP_PAGE", 50)
    seed_people(database)
    source = DroppingSource(database, idle_probe=2.0)
    async with LiveDaemon(database, tmp_path, env={}, source=source, reconcile_s=600) as live:
        await live.active()
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("insert into public.sessions (status, customer_user_id) "
                         "select 'pending', '22222222-2222-4222-8222-222222222222' "
                         "from generate_series(1, 400)")
        await asyncio.sleep(2.5)  # an incremental read or two over the burst alone
        sid = "0a000000-0000-4000-8000-00000000001d"
        elapsed = await seconds_to_act_on_a_dropped_request(live, source, sid)
    assert elapsed < 5.0, f"found {elapsed:.2f} s after its commit"


async def test_extreme_timestamps_are_bad_columns_and_blind_nobody(
        database: str, tmp_path: Path) -> None:
    seed_people(database)
    before = bad_input("column")
    odd = []
    with psycopg.connect(database, autocommit=True) as conn:
        for value in ("infinity", "-infinity", "0001-01-01 00:00:00+00 BC", "9999-12-31 23:59:59+00"):
            row = conn.execute(
                "insert into public.sessions (status, customer_user_id, scheduled_for, "
                "started_at, ended_at, expires_at, status_changed_at) values ('pending', "
                "'22222222-2222-4222-8222-222222222222', %s, %s, %s, %s, now()) returning id",
                (value,) * 4).fetchone()
            odd.append(str(row[0]))
    async with LiveDaemon(database, tmp_path) as live:
        await live.active()
        ordinary = insert_session(database, status="pending")
        await eventually(lambda: any(r.key.row_key == ordinary for r in live.fired("request_expiry")))
        assert live.daemon.readiness.database_reachable
    assert bad_input("column") > before
    # The odd rows are rows too: pending with no mechanic, so they expire like any other.
    assert ("request_expiry", "fired", ordinary) in ledger(database, ordinary)


async def test_garbage_notify_payloads_are_counted_and_the_daemon_goes_on(
        database: str, tmp_path: Path) -> None:
    seed_people(database)
    before = bad_input("notify_payload")
    async with LiveDaemon(database, tmp_path) as live:
        await live.active()
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute("select pg_notify('listener_changes', 'not json')")
            conn.execute("select pg_notify('listener_changes', '[1, 2, 3]')")
            conn.execute("select pg_notify('listener_changes', %s)",
                         ('{"type": "UPDATE", "table": "sessions", "record": {"id": "x", '
                          '"pad": "' + "y" * 7800 + '"}}',))
            # A row that does not exist: read, found missing, nothing owed.
            conn.execute("select pg_notify('listener_changes', %s)",
                         ('{"type": "UPDATE", "table": "sessions", "key": '
                          '"0b000000-0000-4000-8000-000000000000", "truncated": true}',))
        sid = insert_session(database, status="pending")
        await eventually(lambda: any(r.key.row_key == sid for r in live.fired("request_expiry")))
        assert live.daemon.readiness.ready() or live.daemon.readiness.database_reachable
    assert bad_input("notify_payload") >= before + 2


class TerminatedContacts(SqlStore):
    """The backend running the first contacts lookup is terminated mid-call, as a
    pooler recycling it or a failover would."""

    def __init__(self, conninfo: str) -> None:
        super().__init__(conninfo)
        self.terminated = 0

    async def invoke(self, call: Any, args: dict[str, Any]) -> Any:
        if call is CONTACTS and not self.terminated:
            self.terminated += 1
            return await super().invoke(_Terminating(call), args)  # type: ignore[arg-type]
        return await super().invoke(call, args)


class _Terminating:
    """A call that kills its own backend before answering."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.function = call.function

    def sql(self) -> str:
        return "select pg_terminate_backend(pg_backend_pid())"

    def sql_args(self, args: dict[str, Any]) -> dict[str, Any]:
        return {}


async def test_a_terminated_contacts_lookup_still_sends_the_email_once(
        database: str, tmp_path: Path) -> None:
    seed_people(database)
    store = TerminatedContacts(database)
    async with LiveDaemon(database, tmp_path, store=store) as live:
        await live.active()
        sid = insert_session(database, status="pending")
        await eventually(lambda: any(r.key.row_key == sid for r in live.fired("request_expiry")))
        result = next(r for r in live.fired("request_expiry") if r.key.row_key == sid)
    assert store.terminated == 1
    assert result.outcome == "fired", result.detail
    customer_emails = [p for p in tmp_path.glob("request_expiry-*-customer-*.json")]
    assert len(customer_emails) == 1


class BuggySweep(SqlStore):
    """A bug in the sweep (not the database): the first full sweep raises."""

    def __init__(self, conninfo: str) -> None:
        super().__init__(conninfo)
        self.raised = 0

    async def invoke(self, call: Any, args: dict[str, Any]) -> Any:
        if call is TRACKED_ROWS and not self.raised:
            self.raised += 1
            raise RuntimeError("a bug in the sweep")
        return await super().invoke(call, args)


async def test_a_bug_in_the_sweep_is_a_bug_not_an_outage(database: str, tmp_path: Path) -> None:
    seed_people(database)
    bugs = metrics.REGISTRY.get_sample_value("listener_bugs_total", {"part": "reconcile"}) or 0
    store = BuggySweep(database)
    sid = insert_session(database, status="pending")
    async with LiveDaemon(database, tmp_path, store=store) as live:
        # The first sweep failed on the bug; the supervisor restarts the loop and
        # the sweep after the next subscription (or interval) runs.
        await eventually(lambda: store.raised == 1)
        assert live.daemon.readiness.database_reachable
        live.daemon.term._sweep_requested.set()
        await asyncio.wait_for(live.daemon.events.swept(1), 20)
        await eventually(lambda: any(r.key.row_key == sid for r in live.fired("request_expiry")))
    after = metrics.REGISTRY.get_sample_value("listener_bugs_total", {"part": "reconcile"}) or 0
    assert after == bugs + 1


def bugs() -> float:
    return sum(s.value for m in metrics.REGISTRY.collect() if m.name == "listener_bugs"
               for s in m.samples if s.name == "listener_bugs_total")


async def test_a_forged_change_under_a_key_its_table_cannot_hold_is_bad_input(
        database: str, tmp_path: Path) -> None:
    """A NOTIFY anyone with database access can send: a pending row due at once,
    keyed "123" in a table keyed by uuid. Acting on it failed on the cast in
    every call, a bug counted again every 30 s; now it is refused at intake."""
    seed_people(database)
    before, bugs_before = bad_input("row"), bugs()
    async with LiveDaemon(database, tmp_path) as live:
        await live.active()
        with structlog.testing.capture_logs() as logs:
            with psycopg.connect(database, autocommit=True) as conn:
                conn.execute("select pg_notify('listener_changes', %s)", (
                    '{"type": "INSERT", "table": "sessions", "record": {"id": "123", '
                    '"status": "pending", "status_changed_at": "2020-01-01T00:00:00Z", '
                    '"_version": "1"}}',))
                conn.execute("select pg_notify('listener_changes', %s)", (
                    '{"type": "UPDATE", "table": "sessions", "key": "not-a-uuid", '
                    '"truncated": true}',))
            sid = insert_session(database, status="pending")
            await eventually(lambda: any(r.key.row_key == sid
                                         for r in live.fired("request_expiry")))
            await asyncio.sleep(0.5)  # the forged row was due before the ordinary one
    refused = {(e["table"], e["row_id"]) for e in logs
               if e.get("event") == "bad_input" and e.get("kind") == "row"}
    assert {("sessions", "123"), ("sessions", "not-a-uuid")} <= refused
    assert bad_input("row") >= before + 2
    assert bugs() == bugs_before
    assert not [e for e in logs if e.get("event") in ("action_error", "bug")]
    assert not [r for r in live.results if r.key.row_key == "123"]


async def test_key_fits_type_reads_keys_as_postgresql_does(database: str) -> None:
    texts = ["6d0ac6f9-baa1-461a-9bc7-dbf4f3dc7207", "6D0AC6F9BAA1461A9BC7DBF4F3DC7207",
             "{6d0ac6f9-baa1-461a-9bc7-dbf4f3dc7207}", "6d0a-c6f9-baa1-461a-9bc7-dbf4-f3dc-7207",
             "{6d0ac6f9-baa1-461a-9bc7-dbf4f3dc7207", " 6d0ac6f9-baa1-461a-9bc7-dbf4f3dc7207",
             "6d0ac6f9-baa1-461a-9bc7-dbf4f3dc72-07", "6d0ac6f9-baa1-461a-9bc7-dbf4f3dc720",
             "123", "-5", " 42 ", "+7", "2147483647", "2147483648", "-2147483648",
             "9223372036854775808", "x", "", "1.5", "1e3", "0x1F", "1_000", "--1"]
    with psycopg.connect(database, autocommit=True) as conn:
        for sql_type in ("uuid", "integer", "bigint", "smallint"):
            for text in texts:
                try:
                    with conn.transaction():
                        conn.execute(f"select %s::text::{sql_type}", (text,))
                    accepted = True
                except psycopg.errors.DataError:
                    accepted = False
                fits = key_fits_type(text, sql_type)
                # Never refuse a key PostgreSQL holds; refuse every decimal or
                # uuid text it does not.
                assert fits or not accepted, (sql_type, text)
                if sql_type == "uuid" or text.strip().lstrip("+-").isdigit():
                    assert fits == accepted, (sql_type, text)
    assert key_fits_type("anything", "text") and key_fits_type("anything", None)
