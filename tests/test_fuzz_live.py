"""Hostile rows and change payloads through the real parsing path of a running
daemon on real PostgreSQL: rows PostgreSQL stores with the worst values it
accepts (written to the app's tables, read by NOTIFY and by the sweep), forged
NOTIFY payloads, and malformed Realtime frames through the real `realtime`
client. After every example: no exception escaped a loop of the daemon (no
bug counted, no part failed, the same lease term, still active), every bad
input was logged with its table and key and counted, and the ordinary rows
committed beside the hostile ones were acted on within LATE_S of their due
instant.

One daemon per test; hypothesis drives the examples from a worker thread while
the daemon runs on the test's event loop. LISTENER_FUZZ_EXAMPLES sets the
number of examples per test (default 20).
"""
from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import psycopg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from psycopg.types.json import Jsonb
from structlog.testing import capture_logs

from listener import metrics
from listener.adapters.calls import query_json
from listener.adapters.source_notify import CHANNEL
from listener.rows import ColumnKind
from tests.fuzz_rows import (SESSION_TIMESTAMPS, SESSIONS, JsonText, no_deadline,
                             notify_payloads, realtime_payloads, rows, stored_sessions,
                             stored_waitlist)
from tests.live import CUSTOMER, MECHANIC, LiveDaemon, seed_people

EXAMPLES = int(os.environ.get("LISTENER_FUZZ_EXAMPLES", "20"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                suppress_health_check=list(HealthCheck))
# An ordinary row is acted on within this long of its due instant, whatever
# came beside it (a generous bound: the behaviour is a time bound).
LATE_S = 2.0
WAIT_S = 15.0


# --------------------------------------------------------------------------- the daemon, seen from the fuzz thread

def bugs_total() -> float:
    return sum(s.value for m in metrics.REGISTRY.collect() if m.name == "listener_bugs"
               for s in m.samples if s.name == "listener_bugs_total")


def bad_input(kind: str) -> float:
    return metrics.REGISTRY.get_sample_value("listener_bad_input_total", {"kind": kind}) or 0.0


@dataclass
class Watch:
    """The running daemon as the fuzz thread sees it: waits, sweeps, checks."""

    live: LiveDaemon
    loop: asyncio.AbstractEventLoop
    logs: list[dict[str, Any]]
    term: Any = None
    bugs: float = 0.0
    seen_logs: int = 0
    ordinary: list[tuple[str, str, str]] = field(default_factory=list)  # (rule, table, key)

    def start(self) -> None:
        self.term = self.live.daemon.term
        self.bugs = bugs_total()

    def call(self, work: Any, timeout: float = WAIT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result(timeout)

    def sweep(self) -> None:
        """A full sweep that started after this call: the loop's own, requested."""
        async def swept() -> None:
            term, events = self.live.daemon.term, self.live.daemon.events
            # A sweep already running may have read the tables before the
            # caller's commit: wait for the one after it too.
            for _ in range(2):
                count = events.sweeps
                term._sweep_requested.set()
                await asyncio.wait_for(events.swept(count + 1), WAIT_S)
        try:
            self.call(swept(), 2 * WAIT_S + 1)
        except TimeoutError:
            raise AssertionError("a requested sweep did not complete: "
                                 f"{self.new_events({'bug', 'reconcile_failed'})[:3]}") from None

    def new_events(self, names: set[str]) -> list[dict[str, Any]]:
        return [e for e in self.logs[self.seen_logs:] if e.get("event") in names]

    def bad_inputs(self, since: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.logs[since:] if e.get("event") == "bad_input"]

    def wait_fired(self, rule: str, key: str) -> Any:
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            for result in list(self.live.results):
                if result.key.rule == rule and result.key.row_key == key:
                    return result
            time.sleep(0.02)
        raise AssertionError(f"{rule} of {key} not acted on within {WAIT_S:g} s; "
                             f"bugs: {self.new_events({'bug', 'action_error'})[:3]}")

    def assert_on_time(self) -> None:
        for rule, _table, key in self.ordinary:
            result = self.wait_fired(rule, key)
            assert result.outcome == "fired", (rule, key, result.detail)
            assert result.lateness_ms <= LATE_S * 1000, (
                f"{rule} of {key} acted on {result.lateness_ms} ms late")
        self.ordinary.clear()

    def assert_alive(self) -> None:
        """No exception escaped a loop: nothing counted or logged as a bug, no part
        ended, the same term (a failed source ends the term), still active."""
        daemon = self.live.daemon
        task = self.live.task
        assert task is not None and not task.done(), task
        failures = self.new_events({"bug", "task_failed", "action_error",
                                    "realtime_put_failed"})
        assert not failures, failures[:3]
        assert bugs_total() == self.bugs, "a bug was counted"
        assert daemon.term is self.term, "the lease term ended and another began"
        assert daemon.events.active.is_set() and not daemon.events.stopped.is_set()
        assert daemon.readiness.role == "active" and daemon.readiness.source_subscribed
        assert daemon.readiness.database_reachable
        self.seen_logs = len(self.logs)

    def logged(self, table: str, key: str, since: int, kinds: set[str]) -> bool:
        return any(e.get("table") == table and e.get("row_id") == key and e.get("kind") in kinds
                   for e in self.bad_inputs(since))

    def instant_columns(self, table: str) -> set[str]:
        codec = self.live.daemon.engine.tables[table].codec
        return {c for c, kind in codec.kinds.items() if kind is ColumnKind.INSTANT}


async def run_in_thread(work: Callable[[], None]) -> None:
    """`work` in a thread, the daemon on this loop meanwhile."""
    await asyncio.to_thread(work)


# Bad input about one row names its table and key (a payload that is no
# change cannot, nor a tracked row without a usable key).
ROW_KINDS = {"row", "column", "change", "unknown_status", "unknown_value"}


def assert_names_its_row(event: dict[str, Any]) -> None:
    if event.get("kind") not in ROW_KINDS:
        return
    assert event.get("table"), event
    if not str(event.get("detail")).startswith("tracked row without a usable"):
        assert event.get("row_id"), event


# --------------------------------------------------------------------------- writing rows

def now_text(offset_s: float = 0.0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=offset_s)).isoformat()


def _json_param(value: Any) -> tuple[str, Any]:
    """(placeholder, parameter) for a jsonb column: JsonText as text cast to jsonb
    (too deep for Python to encode), anything else as JSON (None is JSON null)."""
    if isinstance(value, JsonText):
        return "%s::jsonb", value.text
    return "%s", Jsonb(value)


def insert(conn: psycopg.Connection, table: str, columns: dict[str, Any], *,
           hidden: bool = False) -> None:
    """One row; `hidden`: with triggers off (session_replication_role replica),
    so no NOTIFY and no incremental-read stamp: only a full sweep finds it."""
    names, marks, values = [], [], []
    for name, value in columns.items():
        mark, param = _json_param(value) if name == "metadata" else ("%s", value)
        names.append(name)
        marks.append(mark)
        values.append(param)
    sql = f"insert into public.{table} ({', '.join(names)}) values ({', '.join(marks)})"
    with conn.transaction():
        if hidden:
            conn.execute("set local session_replication_role = replica")
        conn.execute(sql, values)


def session_columns(row: dict[str, Any], key: str) -> dict[str, Any]:
    columns = {"id": key, "status": row["status"], "type": row["type"], "plan": row["plan"],
               "metadata": row["metadata"],
               "customer_user_id": CUSTOMER if row["customer"] else None,
               "mechanic_id": MECHANIC if row["mechanic"] else None}
    columns.update({c: row[c] for c in SESSION_TIMESTAMPS})
    return columns


def waitlist_columns(row: dict[str, Any], key: str) -> dict[str, Any]:
    return {"id": key, "customer_id": CUSTOMER, "status": row["status"],
            "expires_at": row["expires_at"], "metadata": row["metadata"]}


def write_ordinary(conn: psycopg.Connection, watch: Watch, *, hidden: bool) -> None:
    """A pending request due in 1.2 s (request_expiry is 1.5 s after its status
    under FAST's time scale) and a waitlist entry due in 1 s: acted on on time,
    whatever surrounds them."""
    sid, wid = str(uuid.uuid4()), str(uuid.uuid4())
    insert(conn, "sessions", {"id": sid, "status": "pending", "customer_user_id": CUSTOMER,
                              "status_changed_at": now_text(-0.3)}, hidden=hidden)
    insert(conn, "customer_waitlist", {"id": wid, "customer_id": CUSTOMER, "status": "pending",
                                       "expires_at": now_text(1.0)}, hidden=hidden)
    watch.ordinary += [("request_expiry", "sessions", sid),
                       ("waitlist_expiry", "customer_waitlist", wid)]


def tracked_keys(conn: psycopg.Connection, watch: Watch, table: str) -> set[str]:
    """The keys the sweep's function returns for `table` (what the sweep reads)."""
    query = query_json(watch.live.daemon.queries, table)
    rows = conn.execute("select public.listener_tracked_rows_v2(%s, null, 50000)",
                        (Jsonb(query),)).fetchone()[0]
    return {str(r["id"]) for r in rows}


# --------------------------------------------------------------------------- 1. rows

Hostile = tuple[str, dict[str, Any], bool]  # (table, row, hidden)


# Statuses some rule of the table applies to: a row the sweep alone reads is
# read only if it is tracked, so hidden rows take one of these more often.
TRACKED_STATUSES = {"sessions": ["pending", "scheduled", "waiting", "live"],
                    "customer_waitlist": ["pending"]}


@st.composite
def hostile(draw: st.DrawFn) -> Hostile:
    table = draw(st.sampled_from(["sessions", "customer_waitlist"]))
    row = draw(stored_sessions() if table == "sessions" else stored_waitlist())
    hidden = draw(st.booleans())
    if hidden and draw(st.booleans()):
        row = {**row, "status": draw(st.sampled_from(TRACKED_STATUSES[table]))}
        if table == "sessions" and draw(st.booleans()):
            # Tracked by a sound anchor, so the sweep reads its other columns.
            row["status_changed_at"] = now_text(draw(st.integers(-600, 600)))
    return table, row, hidden


def hostile_batches() -> st.SearchStrategy[list[Hostile]]:
    return st.lists(hostile(), min_size=1, max_size=5)


async def test_hostile_rows_in_the_app_tables_blind_nobody(database: str,
                                                            tmp_path: Path) -> None:
    seed_people(database)
    with capture_logs() as logs:
        # The full sweep only when asked for: each example asks for one.
        async with LiveDaemon(database, tmp_path, reconcile_s=600) as live:
            await live.active()
            watch = Watch(live, asyncio.get_running_loop(), logs)
            watch.start()
            before = {kind: bad_input(kind) for kind in ("column", "row")}
            expected: set[tuple[str, str]] = set()
            tally = {"rows": 0, "swept only": 0}

            def fuzz() -> None:
                with psycopg.connect(database, autocommit=True) as conn:
                    conn.execute("set timezone = 'UTC'")

                    @FUZZ
                    @given(hostile_batches())
                    def rows_written(batch: list[Hostile]) -> None:
                        since = len(logs)
                        written = []
                        for table, row, hidden in batch:
                            key = str(uuid.uuid4())
                            columns = (session_columns if table == "sessions"
                                       else waitlist_columns)(row, key)
                            insert(conn, table, columns, hidden=hidden)
                            written.append((table, key, columns, hidden))
                        write_ordinary(conn, watch, hidden=False)
                        write_ordinary(conn, watch, hidden=True)
                        watch.sweep()
                        watch.assert_on_time()
                        watch.assert_alive()
                        # Every bad timestamp a rule reads is logged with its row;
                        # a hidden row only the sweep reads, and only if tracked.
                        swept = {t: tracked_keys(conn, watch, t)
                                 for t in ("sessions", "customer_waitlist")}
                        for table, key, columns, hidden in written:
                            bad = [c for c in watch.instant_columns(table) & set(columns)
                                   if no_deadline(columns[c])]
                            if not bad or (hidden and key not in swept[table]):
                                continue
                            expected.add((table, key))
                            # A bad column, or the whole row when its status is
                            # unusable too (its columns are then never read).
                            assert watch.logged(table, key, since, {"column", "row"}), (
                                f"{table} {key}: bad {bad} not logged with its key")
                        for event in watch.bad_inputs(since):
                            assert_names_its_row(event)
                        tally["rows"] += len(written)
                        tally["swept only"] += sum(1 for t, k, _, h in written
                                                   if h and k in swept[t])

                    rows_written()

            await run_in_thread(fuzz)
            # Counted too, once per bad row at least.
            assert sum(bad_input(k) - before[k] for k in before) >= len(expected)
            # The fuzz reached what it is for.
            assert expected, "no hostile row with a bad timestamp was generated"
            print(f"\n{tally['rows']} hostile rows, {tally['swept only']} read by the sweep "
                  f"alone, {len(expected)} with a bad timestamp, each logged with its key")


# --------------------------------------------------------------------------- 2. NOTIFY payloads

def _pg_text(text: str) -> str:
    """What a NOTIFY can carry: no NUL, valid UTF-8."""
    return text.replace("\x00", "").encode("utf-8", "ignore").decode()


def forged_notifies() -> st.SearchStrategy[str]:
    """notify_payloads() and the oversized-row form naming rows that do not
    exist, keys of the wrong type, tables no rule reads."""
    truncated = st.builds(
        lambda kind, table, key: json.dumps({"type": kind, "table": table, "key": key,
                                             "truncated": True}),
        st.sampled_from(["UPDATE", "INSERT", "DELETE", "TRUNCATE", None]),
        st.sampled_from(["sessions", "customer_waitlist", "no_such_table", "", None]),
        st.one_of(st.uuids().map(str), st.just("not-a-uuid"), st.integers(), st.none(),
                  st.just("x" * 300)))
    return st.one_of(notify_payloads(SESSIONS), notify_payloads(SESSIONS), truncated).map(_pg_text)


# Always tried: a row due at once under a key no uuid column can hold (acting on
# it failed on the cast, a bug counted every 30 s for ever), the oversized-row
# form naming such a key and a row that does not exist, text that is no object.
FORGED = [
    json.dumps({"type": "INSERT", "table": "sessions", "record": {
        "id": "123", "status": "pending", "status_changed_at": "2020-01-01T00:00:00Z",
        "_version": "1"}}),
    json.dumps({"type": "UPDATE", "table": "sessions", "key": "not-a-uuid", "truncated": True}),
    json.dumps({"type": "UPDATE", "table": "sessions", "key": str(uuid.uuid4()),
                "truncated": True}),
    "not json", "[1, 2, 3]",
]


def is_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


async def test_forged_notify_payloads_are_counted_and_blind_nobody(database: str,
                                                                   tmp_path: Path) -> None:
    seed_people(database)
    channel = CHANNEL
    with capture_logs() as logs:
        async with LiveDaemon(database, tmp_path) as live:
            await live.active()
            watch = Watch(live, asyncio.get_running_loop(), logs)
            watch.start()
            refused_total = 0

            def fuzz() -> None:
                with psycopg.connect(database, autocommit=True) as conn:

                    @FUZZ
                    @given(st.lists(forged_notifies(), min_size=1, max_size=6))
                    @example(FORGED)
                    def notified(payloads: list[str]) -> None:
                        nonlocal refused_total
                        since, before = len(logs), bad_input("notify_payload")
                        for payload in payloads:
                            conn.execute("select pg_notify(%s, %s)", (channel, payload))
                        write_ordinary(conn, watch, hidden=False)
                        watch.assert_on_time()
                        watch.assert_alive()
                        refused = [p for p in payloads if not is_object(p)]
                        refused_total += len(refused)
                        counted = bad_input("notify_payload") - before
                        assert counted >= len(refused), (counted, [p[:80] for p in refused])
                        for event in watch.bad_inputs(since):
                            assert_names_its_row(event)

                    notified()

            await run_in_thread(fuzz)
            assert refused_total, "no payload that is not a JSON object was generated"
            print(f"\n{refused_total} NOTIFY payloads that are no JSON object, each counted")


# --------------------------------------------------------------------------- 3. Realtime payloads

@pytest.fixture
async def stack(database: str):
    from tests.live_supabase import supabase_stack

    async with supabase_stack(database) as s:
        yield s


@st.composite
def realtime_frames(draw: st.DrawFn) -> tuple[Any, bool]:
    """(payload, address it to the daemon's binding of sessions): realtime_payloads(),
    and well-formed frames whose record is a hostile row."""
    well_typed = st.builds(
        lambda kind, record: {"ids": [], "data": {
            "schema": "public", "table": "sessions", "type": kind,
            "commit_timestamp": now_text(), "errors": None, "columns": [], "record": record,
            "old_record": {}}},
        st.sampled_from(["INSERT", "UPDATE", "DELETE"]), rows(SESSIONS))
    payload = draw(st.one_of(realtime_payloads(SESSIONS), well_typed))
    return payload, draw(st.booleans())


def usable_key(record: Any) -> bool:
    """The rule every source keeps: a non-empty text key of at most 100
    characters, or an integer."""
    if not isinstance(record, dict):
        return False
    key = record.get("id")
    return (type(key) is int) or (type(key) is str and 0 < len(key) <= 100)


def refused_for_its_key(payload: Any) -> bool:
    """A frame the client hands on (its envelope well typed) whose change names
    no usable key: the daemon must count it as a bad Realtime payload."""
    data = payload.get("data") if isinstance(payload, dict) else None
    if not (isinstance(data, dict) and data.get("schema") == "public"
            and data.get("table") == "sessions" and data.get("type") in ("INSERT", "UPDATE")
            and data.get("errors") is None and data.get("columns") == []
            and isinstance(data.get("commit_timestamp"), str)
            and isinstance(data.get("old_record", {}), dict)):
        return False
    record = data.get("record")
    return isinstance(record, dict) and bool(record) and not usable_key(record)


def json_safe(value: Any) -> Any:
    """As a JSON frame carries it: NaN and infinities are not JSON."""
    return json.loads(json.dumps(value, default=str).replace("NaN", "null")
                      .replace("-Infinity", "null").replace("Infinity", "null"))


async def test_malformed_realtime_payloads_are_counted_and_blind_nobody(
        stack: Any, tmp_path: Path) -> None:
    from tests.live_supabase import LiveSupabaseDaemon

    with capture_logs() as logs:
        async with LiveSupabaseDaemon(stack, tmp_path) as live:
            await live.active()
            watch = Watch(live, asyncio.get_running_loop(), logs)
            watch.start()
            reached = 0

            async def send(payload: Any, addressed: bool) -> int:
                if addressed and isinstance(payload, dict) and "ids" in payload:
                    payload = {**payload, "ids": stack.realtime.binding_ids("public", "sessions")}
                return await stack.realtime.send_postgres_changes(payload)

            def fuzz() -> None:
                with psycopg.connect(stack.conninfo, autocommit=True) as conn:

                    @FUZZ
                    @given(st.lists(realtime_frames(), min_size=1, max_size=5))
                    def pushed(frames: list[tuple[Any, bool]]) -> None:
                        nonlocal reached
                        since, before = len(logs), bad_input("realtime_payload")
                        keyless = 0
                        for payload, addressed in frames:
                            payload = json_safe(payload)
                            assert watch.call(send(payload, addressed)) >= 1
                            keyless += addressed and refused_for_its_key(payload)
                        write_ordinary(conn, watch, hidden=False)
                        watch.assert_on_time()
                        watch.assert_alive()
                        counted = bad_input("realtime_payload") - before
                        assert counted >= keyless, (counted, keyless)
                        reached += len([e for e in watch.bad_inputs(since)
                                        if e["kind"] == "realtime_payload"])
                        for event in watch.bad_inputs(since):
                            assert event.get("table"), event
                            assert_names_its_row(event)

                    pushed()

            await run_in_thread(fuzz)
            assert reached, "no malformed payload reached the daemon's callback"
            print(f"\n{reached} malformed Realtime payloads reached the daemon, each counted")
