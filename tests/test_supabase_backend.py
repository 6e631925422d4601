"""The Supabase backend end to end: the real daemon on RpcStore + RealtimeSource,
through the real supabase/realtime/postgrest clients, against the Realtime and
PostgREST test servers fed by real PostgreSQL. Every fault ends the same way:
every due action fires exactly once, none twice."""
from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from listener import daemon as daemon_module
from listener.adapters.supabase import (
    RealtimeSource, RpcConfigError, RpcStore, change_from_realtime, open_supabase_backend)
from listener.changes import BadChange, Change
from listener.instants import HOUR
from listener.rules import load_rules
from listener.rules.query import table_queries
from listener.runtime import ConfigError, recipients_of
from listener.settings import Settings
from listener.store import all_tracked
from tests.live import FAST, MECHANIC, eventually, insert_session, ledger, query
from tests.live_supabase import LiveSupabaseDaemon, supabase_stack
from tests.servers.postgrest_server import ANON_KEY, SERVICE_ROLE_KEY, SupabaseStack

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # realtime 2.34 / websockets
ROOT = Path(__file__).resolve().parents[1]
PENDING = [("support_unassigned_alert", "fired"), ("request_expiry", "fired")]
RULES = load_rules(FAST)
QUERIES = table_queries(RULES, HOUR)
SESSIONS = QUERIES["sessions"]


@pytest.fixture
async def stack(database: str):
    async with supabase_stack(database) as s:
        yield s


def emails(outbox: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in outbox.glob("*.json")]


def assert_each_fired_once(database: str, outbox: Path, live: LiveSupabaseDaemon,
                           sids: list[str]) -> None:
    """Pending requests: an alert to support, then expired with an email to the customer;
    one ledger row each, fired; one email per recipient; one result each in this daemon."""
    for sid in sids:
        assert [(rule, state) for rule, state, _ in ledger(database, sid)] == PENDING, sid
        assert query(database, "select status from public.sessions where id = %s", sid) == [
            ("expired",)]
    per_action = collections.Counter((r.key.rule, r.key.session_id) for r in live.results)
    assert all(n == 1 for n in per_action.values()), per_action
    assert {k for k in per_action if k[1] in sids} == {
        (rule, sid) for sid in sids for rule, _ in PENDING}
    sent = collections.Counter((e["rule"], e["session_id"], e["role"]) for e in emails(outbox)
                               if e["session_id"] in sids)
    assert sent == {**{("support_unassigned_alert", s, "support"): 1 for s in sids},
                    **{("request_expiry", s, "customer"): 1 for s in sids}}


async def all_fired(database: str, sids: list[str], timeout: float = 25.0) -> None:
    def done() -> bool:
        rows = query(database, "select count(*) from public.listener_ledger where session_id = "
                               "any(%s::uuid[]) and state <> 'claimed'", sids)
        return rows[0][0] == len(sids) * len(PENDING)
    await eventually(done, timeout)
    await asyncio.sleep(0.3)  # nothing more may come


class RpcFaults:
    """Per-call faults in the PostgREST test server: answer with a status without
    touching the database, or run and commit, then sit on the answer."""

    def __init__(self, rest: Any) -> None:
        self.rules: list[list[Any]] = []
        original = rest._rpc

        async def faulty(request: web.Request, fn: str, method: str, record: Any,
                         raw: bytes) -> web.Response:
            args = record.args if isinstance(record.args, dict) else {}
            for rule in self.rules:
                name, when, kind, value, left = rule
                if left <= 0 or name != fn or not when(args):
                    continue
                rule[4] -= 1
                if kind == "status":
                    record.injected = True
                    body = {"code": "XX000", "details": None, "hint": None,
                            "message": "injected fault (test)"}
                    return web.json_response(body, status=int(value))
                response = await original(request, fn, method, record, raw)
                await asyncio.sleep(value)  # committed; the answer comes too late
                return response
            return await original(request, fn, method, record, raw)

        rest._rpc = faulty

    def add(self, fn: str, kind: str, value: float, times: int = 1,
            when: Any = lambda args: True) -> None:
        self.rules.append([fn, when, kind, value, times])


def expiring(args: dict[str, Any]) -> bool:
    """The listener_fire_v2 call that changes the status (request_expiry)."""
    return args.get("p_status") == "expired"


# --------------------------------------------------------------------------- the happy path


async def test_rows_changed_in_postgres_fire_through_realtime_and_rpc(
        database: str, stack: SupabaseStack, tmp_path: Path) -> None:
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await live.active()
        sid = insert_session(database, status="pending", metadata={"source": "app", "n": 1})
        # Too large for a Realtime payload: "Error 413", the record cut down; the daemon reads it.
        big = insert_session(database, status="pending", metadata={"notes": "x" * 20000})
        await all_fired(database, [sid, big])
        assert_each_fired_once(database, tmp_path, live, [sid, big])
        metadata = query(database, "select metadata from public.sessions where id = %s", sid)[0][0]
        assert metadata["source"] == "app" and metadata["n"] == 1
        assert metadata["listener"]["reason"] == "no_mechanic_available"
        # an accepted session (waiting, with its mechanic): the mechanic is nudged
        # by name, through the contacts RPC
        accepted = insert_session(database, status="waiting", mechanic_id=MECHANIC)
        await eventually(lambda: live.fired("support_stuck_alert"))
        assert any(e["rule"] == "mechanic_nudge" and "max@example.com" in e["to"]
                   for e in emails(tmp_path) if e["session_id"] == accepted)
        assert live.source.reconnects == 0 and live.source.subscriptions == 1
        frames = [f for _, f in stack.realtime.frames_out if f["event"] == "postgres_changes"]
        assert any(f["payload"]["data"]["errors"] for f in frames)  # the 413 did happen
    calls = {c.function for c in stack.rest.calls}
    assert {"listener_lease_acquire", "listener_lease_renew", "listener_tracked_rows_v3",
            "listener_read_row_v2", "listener_fire_v2", "listener_complete_v2",
            "listener_contacts_v2", "listener_unfinished_claims_v2",
            "listener_lease_release"} <= calls
    assert all(c.role == "service_role" for c in stack.rest.calls if c.role)


async def test_only_the_service_role_may_call_the_functions(stack: SupabaseStack) -> None:
    from postgrest.exceptions import APIError
    from supabase import acreate_client

    anon = await acreate_client(stack.url, ANON_KEY)
    with pytest.raises(APIError) as info:
        await anon.rpc("listener_read_row_v2", {"p_query": None, "p_key": None}).execute()
    assert info.value.code == "42501"
    store = RpcStore(stack.url, ANON_KEY, QUERIES)
    await store.open()
    try:
        with pytest.raises(RpcConfigError, match="permission denied.*service_role"):
            await store.check()
    finally:
        await store.close()


# --------------------------------------------------------------------------- Realtime faults


@pytest.mark.parametrize("code", [1000, 1011])
async def test_server_closes_the_socket(database: str, stack: SupabaseStack, tmp_path: Path,
                                        code: int) -> None:
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await live.active()
        before = insert_session(database, status="pending")
        await stack.realtime.close_all(code)
        during = insert_session(database, status="pending")  # while the client is away
        await live.resubscribed(2)
        after = insert_session(database, status="pending")
        await all_fired(database, [before, during, after])
        assert_each_fired_once(database, tmp_path, live, [before, during, after])
        assert live.source.reconnects == 1, live.source.last_reason
        assert stack.realtime.connections_total == 2


async def test_join_never_answered_times_out_and_retries(database: str, stack: SupabaseStack,
                                                         tmp_path: Path) -> None:
    stack.realtime.ignore_joins = True
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await eventually(lambda: live.source.reconnects >= 1, 15)
        assert "TIMED_OUT" in (live.source.last_reason or "")
        sid = insert_session(database, status="pending")  # nobody is streaming it
        stack.realtime.ignore_joins = False
        await live.active()
        await all_fired(database, [sid])
        assert_each_fired_once(database, tmp_path, live, [sid])
        assert live.source.subscriptions == 1


async def test_phx_error_recreates_the_channel(database: str, stack: SupabaseStack,
                                               tmp_path: Path) -> None:
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await live.active()
        first = insert_session(database, status="pending")
        assert await stack.realtime.send_phx_error() == 1
        await live.resubscribed(2)
        second = insert_session(database, status="pending")
        await all_fired(database, [first, second])
        assert_each_fired_once(database, tmp_path, live, [first, second])
        assert live.source.reconnects == 1 and "CHANNEL_ERROR" in live.source.last_reason
        assert len(stack.realtime.joins_by_topic) == 2  # a new topic, not a rejoin


async def test_system_error_recreates_the_client(database: str, stack: SupabaseStack,
                                                 tmp_path: Path) -> None:
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await live.active()
        assert await stack.realtime.send_system_error() == 1
        lost = insert_session(database, status="pending")  # the old channel streams no more
        await live.resubscribed(2)
        await all_fired(database, [lost])
        assert_each_fired_once(database, tmp_path, live, [lost])
        assert live.source.reconnects == 1
        assert "Unable to subscribe" in live.source.last_reason


async def test_a_dead_listen_task_is_noticed(database: str, stack: SupabaseStack,
                                            tmp_path: Path) -> None:
    # What an exception in a callback does: the client's listen task ends, while
    # the socket stays open and the channel says joined.
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await live.active()
        client = live.source.client
        client._listen_task.cancel()
        assert client.is_connected and live.source.channel.is_joined
        lost = insert_session(database, status="pending")  # read by nobody
        await live.resubscribed(2)
        await all_fired(database, [lost])
        assert_each_fired_once(database, tmp_path, live, [lost])
        assert live.source.reconnects == 1 and "listen task" in live.source.last_reason


async def test_no_subscribed_message_is_a_failure(database: str, stack: SupabaseStack,
                                                  tmp_path: Path) -> None:
    stack.realtime.subscribed_delay = 30
    async with LiveSupabaseDaemon(stack, tmp_path,
                                  source_options={"subscribed_timeout": 1.0}) as live:
        await eventually(lambda: live.source.reconnects >= 1, 15)
        assert "Subscribed to PostgreSQL" in live.source.last_reason
        assert not live.daemon.readiness.source_subscribed
        assert live.daemon.events.sweeps == 0 and not live.daemon.events.active.is_set()
        stack.realtime.subscribed_delay = 0
        sid = insert_session(database, status="pending")
        await live.active()
        await all_fired(database, [sid])
        assert_each_fired_once(database, tmp_path, live, [sid])


async def test_changes_dropped_while_away_are_found_by_the_sweep(
        database: str, stack: SupabaseStack, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # No incremental read in this test: only the sweep after the new subscription.
    monkeypatch.setattr(daemon_module, "CATCH_UP_S", 3600.0)
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await live.active()
        stack.realtime.drop_changes = True
        lost = [insert_session(database, status="pending") for _ in range(3)]
        await eventually(lambda: stack.realtime.changes_dropped >= 3)
        await asyncio.sleep(2.0)  # every deadline of theirs passes, unseen
        assert not any(live.daemon.engine.row("sessions", sid) for sid in lost)
        assert not live.results
        await stack.realtime.close_all(1011)
        await live.resubscribed(2)
        stack.realtime.drop_changes = False
        await all_fired(database, lost)
        assert_each_fired_once(database, tmp_path, live, lost)
        assert live.source.reconnects == 1


async def test_changes_dropped_while_subscribed_are_found_by_the_incremental_read(
        database: str, stack: SupabaseStack, tmp_path: Path) -> None:
    # The stream looks healthy and loses changes: no reconnect, so no sweep; the
    # incremental read (listener_changed_rows_v3) finds the rows within seconds.
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await live.active()
        sweeps = live.daemon.events.sweeps
        stack.realtime.drop_changes = True
        lost = [insert_session(database, status="pending") for _ in range(3)]
        await eventually(lambda: stack.realtime.changes_dropped >= 3)
        await all_fired(database, lost)
        assert_each_fired_once(database, tmp_path, live, lost)
        assert live.source.reconnects == 0 and live.daemon.events.sweeps == sweeps
    assert any(c.function == "listener_changed_rows_v3" for c in stack.rest.calls)


async def test_every_change_delivered_twice(database: str, stack: SupabaseStack,
                                            tmp_path: Path) -> None:
    stack.realtime.duplicate_changes = True
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await live.active()
        sids = [insert_session(database, status="pending") for _ in range(3)]
        await all_fired(database, sids)
        assert_each_fired_once(database, tmp_path, live, sids)
        assert stack.realtime.changes_sent >= 2 * stack.realtime.changes_seen - 1
        assert live.source.reconnects == 0


# --------------------------------------------------------------------------- RPC faults


async def test_rpc_server_errors_are_retried(database: str, stack: SupabaseStack,
                                             tmp_path: Path) -> None:
    faults = RpcFaults(stack.rest)
    async with LiveSupabaseDaemon(stack, tmp_path) as live:
        await live.active()
        # the status change is refused before reaching the database: the ledger
        # says it did not happen, so it is sent again
        faults.add("listener_fire_v2", "status", 500, when=expiring)
        faults.add("listener_fire_v2", "status", 503, times=2, when=lambda a: not expiring(a))
        faults.add("listener_complete_v2", "status", 502)
        faults.add("listener_contacts_v2", "status", 500)
        faults.add("listener_read_row_v2", "status", 504)
        first = insert_session(database, status="pending")
        await all_fired(database, [first])
        stack.rest.fail_status = 500  # a full outage, shorter than the retry budget
        second = insert_session(database, status="pending")
        await asyncio.sleep(1.0)
        stack.rest.fail_status = None
        await all_fired(database, [second])
        assert_each_fired_once(database, tmp_path, live, [first, second])
    assert all(rule[4] == 0 for rule in faults.rules)  # every fault was met
    injected = [c for c in stack.rest.calls if c.injected]
    assert len(injected) >= 6 and all(c.status >= 500 for c in injected)
    for sid in (first, second):
        changes = [c for c in stack.rest.calls if c.function == "listener_fire_v2"
                   and not c.injected and expiring(c.args) and c.args["p_key"] == sid]
        assert len(changes) == 1, sid


async def test_rpc_server_hangs(database: str, stack: SupabaseStack, tmp_path: Path) -> None:
    faults = RpcFaults(stack.rest)
    async with LiveSupabaseDaemon(stack, tmp_path, rpc_timeout_s=1.0) as live:
        await live.active()
        # the status change commits, then its answer never comes: it is not sent
        # again; the ledger (status_applied) says it happened
        faults.add("listener_fire_v2", "hang_after_commit", 2.5, when=expiring)
        first = insert_session(database, status="pending")
        await all_fired(database, [first])
        # everything hangs before the database for a while
        stack.rest.hang_seconds = 1.5
        second = insert_session(database, status="pending")
        await asyncio.sleep(2.0)
        stack.rest.hang_seconds = 0
        await all_fired(database, [second])
        assert_each_fired_once(database, tmp_path, live, [first, second])
    changes = [c for c in stack.rest.calls if c.function == "listener_fire_v2"
               and expiring(c.args) and c.args["p_key"] == first]
    assert len(changes) == 1  # never blindly retried
    attempts = query(database, "select attempts from public.listener_ledger where session_id = %s "
                               "and rule = 'request_expiry'", first)
    assert attempts[0][0] >= 2  # the bare claim that read the ledger


# --------------------------------------------------------------------------- configuration


async def test_open_backend_checks_the_project(database: str, stack: SupabaseStack) -> None:
    settings = Settings(supabase_url=stack.url, supabase_service_role_key=SERVICE_ROLE_KEY)
    recipients = recipients_of(RULES)
    backend = await open_supabase_backend(settings, QUERIES, recipients)
    try:
        assert backend.name == "supabase" and isinstance(backend.source, RealtimeSource)
        assert await all_tracked(backend.store, "sessions") == []
        assert SERVICE_ROLE_KEY not in repr(backend.store) + repr(backend.source)
    finally:
        await backend.close()

    fire = query(database, "select oid::regprocedure::text from pg_proc "
                           "where proname = 'listener_fire_v2'")[0][0]
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"revoke execute on function {fire} from service_role")
    with pytest.raises(ConfigError, match="permission denied.*EXECUTE"):
        await open_supabase_backend(settings, QUERIES, recipients)
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(f"drop function {fire}")
    with pytest.raises(ConfigError, match="^functions missing: run listener migrate --print"):
        await open_supabase_backend(settings, QUERIES, recipients)

    closed = Settings(supabase_url="http://127.0.0.1:9", supabase_service_role_key=SERVICE_ROLE_KEY)
    with pytest.raises(ConfigError, match="^Supabase unreachable: ") as info:
        await open_supabase_backend(closed, QUERIES, recipients)
    assert SERVICE_ROLE_KEY not in str(info.value) and "\n" not in str(info.value)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SUPABASE_", "NEXT_PUBLIC_SUPABASE", "DATABASE_URL", "RESEND_",
                                "EMAIL_OUTBOX", "RULE", "MQTT_URL", "OPS_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


async def test_listener_run_on_supabase(database: str, stack: SupabaseStack,
                                        tmp_path: Path) -> None:
    early = insert_session(database, status="pending")  # found by the first sweep
    log_path = tmp_path / "stderr.log"
    env = _env(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=SERVICE_ROLE_KEY,
               EMAIL_OUTBOX=str(tmp_path / "outbox"), RULES_TIME_SCALE="600",
               LISTENER_DATA_DIR=str(tmp_path / "data"), LOG_LEVEL="INFO",
               SUPPORT_EMAIL="support@example.com")
    with log_path.open("wb") as log_file:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "listener", "run", cwd=str(ROOT), env=env,
            stdout=asyncio.subprocess.DEVNULL, stderr=log_file)
        try:
            await eventually(lambda: b"source_subscribed" in log_path.read_bytes(), 30)
            late = insert_session(database, status="pending")  # through Realtime
            await all_fired(database, [early, late])
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    for sid in (early, late):
        assert [(r, s) for r, s, _ in ledger(database, sid)] == PENDING
    text = log_path.read_text()
    assert SERVICE_ROLE_KEY not in text
    assert '"backend": "supabase"' in text or "backend=supabase" in text
    assert len(list((tmp_path / "outbox").glob("*.json"))) == 4

    # no Resend key and no outbox: a one-line reason, non-zero
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "listener", "run", cwd=str(ROOT),
        env=_env(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=SERVICE_ROLE_KEY,
                 LISTENER_DATA_DIR=str(tmp_path / "data")),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode not in (0, None)
    last = err.decode().strip().splitlines()[-1]
    assert last.startswith("listener: RESEND_API_KEY is not set"), err.decode()[-2000:]


# --------------------------------------------------------------------------- payloads


class Sink:
    def __init__(self, fail: bool = False) -> None:
        self.changes: list[Change] = []
        self.bad: list[tuple[str, str, str | None]] = []
        self.fail = fail

    def put(self, change: Change) -> None:
        if self.fail:
            raise RuntimeError("full")
        self.changes.append(change)

    def bad_input(self, kind: str, detail: str, table: str | None = None,
                  key: str | None = None) -> None:
        self.bad.append((kind, detail, table))

    def subscribed(self, source: str) -> None: ...

    def unsubscribed(self, source: str, reason: str) -> None: ...


def _data(kind: str, **fields: Any) -> dict[str, Any]:
    return {"ids": [1], "data": {"schema": "public", "table": "sessions", "type": kind,
                                 "commit_timestamp": "2026-03-02T10:00:00.000Z", "errors": None,
                                 "columns": [], **fields}}


def test_postgres_changes_payloads() -> None:
    full = {**{c: None for c in SESSIONS.columns}, "id": "s1", "status": "pending"}
    assert "mechanic_id" in full and "status_changed_at" in full
    inserted = change_from_realtime(_data("INSERT", record=full), SESSIONS)
    assert inserted.record == full and inserted.table == "sessions" and inserted.key == "s1"
    assert change_from_realtime(_data("UPDATE", record=full, old_record={"id": "s1"}),
                                SESSIONS).record
    cut = {"id": "s1", "status": "pending"}  # 413: values over 64 bytes and nulls dropped
    too_large = change_from_realtime(
        _data("UPDATE", record=cut, errors=["Error 413: Payload Too Large"]), SESSIONS)
    assert too_large == Change("UPDATE", "sessions", "s1", None, too_large.at)
    assert change_from_realtime(_data("UPDATE", record=cut), SESSIONS).record is None  # columns missing
    assert change_from_realtime(_data("DELETE", old_record={"id": "s1"}),
                                SESSIONS).session_id == "s1"
    # an integer key (tables keyed by bigint) is the key as text
    assert change_from_realtime(_data("DELETE", old_record={"id": 5}), SESSIONS).key == "5"
    for bad in (None, [], {"data": None}, _data("TRUNCATE"), _data("INSERT", record={}),
                _data("DELETE", old_record={}), _data("INSERT", record={"id": 5.5}),
                _data("INSERT", record={"id": True}), _data("INSERT", record={"id": ""}),
                {**_data("INSERT", record=full), "data": {**_data("INSERT", record=full)["data"],
                                                          "table": "other"}}):
        with pytest.raises(BadChange):
            change_from_realtime(bad, SESSIONS)


def test_callbacks_never_raise() -> None:
    from listener.adapters.supabase import _Attempt

    source = RealtimeSource("http://127.0.0.1:9", SERVICE_ROLE_KEY, QUERIES)
    attempt = _Attempt(1, "t", 0.0)
    sink = Sink()
    source._on_change(attempt, sink, SESSIONS, {"nonsense": True})
    source._on_change(attempt, sink, SESSIONS, object())
    # logged with the table of the binding that received it
    assert [(k, t) for k, _, t in sink.bad] == [("realtime_payload", "sessions")] * 2
    source._on_change(attempt, Sink(fail=True), SESSIONS, _data("DELETE", old_record={"id": "s1"}))
    source._on_system(attempt, sink, object())
    source._on_state(attempt, object(), None)
    assert attempt.failure is not None  # a state it cannot read is a failure, not a crash


async def test_failover_between_two_processes_on_supabase(database: str, stack: SupabaseStack,
                                                          tmp_path: Path) -> None:
    """kill -9 the active instance: the standby takes over within the lease time and
    every action due in between fires once (the Supabase backend)."""
    outbox = tmp_path / "outbox"
    procs: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}

    async def start(name: str) -> None:
        log_path = tmp_path / f"{name}.log"
        env = _env(SUPABASE_URL=stack.url, SUPABASE_SERVICE_ROLE_KEY=SERVICE_ROLE_KEY,
                   EMAIL_OUTBOX=str(outbox), RULES_TIME_SCALE="600", LEASE_TTL="2s",
                   INSTANCE_NAME=name, LISTENER_DATA_DIR=str(tmp_path / name),
                   LOG_LEVEL="INFO", SUPPORT_EMAIL="support@example.com")
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "listener", "run", cwd=str(ROOT), env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=log_file)
        procs[name] = (proc, log_path)

    def logged(name: str, event: str) -> bool:
        return f'"event": "{event}"'.encode() in procs[name][1].read_bytes()

    try:
        await start("a")
        await eventually(lambda: logged("a", "reconciled"), 30)
        await start("b")
        await eventually(lambda: logged("b", "standing_by"), 30)
        sids = [insert_session(database, status="pending") for _ in range(3)]
        sids += [insert_session(database, status="waiting", mechanic_id=MECHANIC)
                 for _ in range(2)]
        procs["a"][0].kill()  # SIGKILL: no lease release, claims may be left behind
        killed = time.monotonic()
        await procs["a"][0].wait()
        await eventually(lambda: logged("b", "lease_acquired"), 30)
        print(f"\nSupabase backend: standby active {time.monotonic() - killed:.2f} s after kill -9")
        expected = 3 * 2 + 2 * 3  # unassigned alert + expiry; nudge + stuck + timeout
        await eventually(lambda: len([r for r in query(
            database, "select state from public.listener_ledger") if r[0] == "fired"])
            == expected, 60)
    finally:
        for proc, _ in procs.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    rows = query(database, "select rule, session_id, due_at, state from public.listener_ledger")
    assert len(rows) == len({r[:3] for r in rows}) == expected
    assert {r[3] for r in rows} == {"fired"}
    emails = [json.loads(p.read_text()) for p in outbox.glob("*.json")]
    assert len(emails) == len({e["idempotency_key"] for e in emails}) == expected
