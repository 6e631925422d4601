"""The Realtime test server, proven against the real ``realtime`` 2.34 client and real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from typing import Any

import psycopg
import pytest

from listener.migrate import reference_migrations
from tests.conftest import scratch_database
import websockets
from psycopg import sql
from realtime import AsyncRealtimeClient, RealtimeSubscribeStates

try:
    from tests.servers.realtime_server import ANON_KEY, SERVICE_ROLE_KEY, RealtimeServer, binding_id
except ImportError:  # tests/ itself is on sys.path
    from servers.realtime_server import ANON_KEY, SERVICE_ROLE_KEY, RealtimeServer, binding_id

# The app's schema as the listener's development databases have it (every
# reference migration, in order: the sessions status CHECK among them).
REFERENCE_SCHEMA = "\n".join(m.sql for m in reference_migrations())
SUBSCRIBED = RealtimeSubscribeStates.SUBSCRIBED
TIMED_OUT = RealtimeSubscribeStates.TIMED_OUT
CHANNEL_ERROR = RealtimeSubscribeStates.CHANNEL_ERROR
CLOSED = RealtimeSubscribeStates.CLOSED
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # realtime 2.34 uses deprecated websockets attributes
TIMESTAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


# --------------------------------------------------------------------------- database


@pytest.fixture(scope="module")
def database(pg_admin: str) -> Any:
    """This module's own database (the server on 5432, or the embedded one)."""
    with scratch_database(pg_admin, "test_rt_") as conninfo:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(REFERENCE_SCHEMA)
        yield conninfo


@pytest.fixture
async def db(database: str) -> Any:
    conn = await psycopg.AsyncConnection.connect(database, autocommit=True)
    yield conn
    await conn.close()


@pytest.fixture
async def server(database: str) -> Any:
    async with RealtimeServer(database) as srv:
        yield srv


# --------------------------------------------------------------------------- helpers


class Recorder:
    def __init__(self) -> None:
        self.states: list[RealtimeSubscribeStates] = []
        self.errors: list[Exception | None] = []
        self.changes: list[dict[str, Any]] = []
        self.system: list[dict[str, Any]] = []

    def on_state(self, state: RealtimeSubscribeStates, error: Exception | None) -> None:
        self.states.append(state)
        self.errors.append(error)

    def on_change(self, payload: dict[str, Any]) -> None:
        self.changes.append(payload)

    def on_system(self, payload: Any) -> None:
        self.system.append(dict(payload))

    def subscribed_messages(self) -> int:
        return sum(1 for s in self.system if s.get("message") == "Subscribed to PostgreSQL")


async def eventually(predicate: Any, timeout: float = 10.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def make_client(srv: RealtimeServer, **kwargs: Any) -> AsyncRealtimeClient:
    options = {"max_retries": 5, "initial_backoff": 0.2, **kwargs}
    return AsyncRealtimeClient(f"{srv.url}/realtime/v1", SERVICE_ROLE_KEY, **options)


async def subscribe(client: AsyncRealtimeClient, topic: str = "sessions", event: str = "*", **binding: Any):
    rec = Recorder()
    channel = client.channel(topic)
    channel.on_postgres_changes(event, rec.on_change, table=binding.pop("table", "sessions"),
                                schema=binding.pop("schema", "public"), **binding)
    channel.on_system(rec.on_system)
    await channel.subscribe(rec.on_state)
    return channel, rec


async def new_session(db: psycopg.AsyncConnection, **columns: Any) -> str:
    user_id = str(uuid.uuid4())
    await db.execute("INSERT INTO auth.users (id, email) VALUES (%s, %s)", (user_id, f"{user_id}@example.com"))
    cols = {"customer_user_id": user_id, **columns}
    names = sql.SQL(", ").join(sql.Identifier(c) for c in cols)
    values = sql.SQL(", ").join(sql.Placeholder() for _ in cols)
    cur = await db.execute(
        sql.SQL("INSERT INTO public.sessions ({}) VALUES ({}) RETURNING id::text").format(names, values),
        list(cols.values()),
    )
    row = await cur.fetchone()
    assert row is not None
    return row[0]


def data_of(rec: Recorder, session_id: str, kind: str) -> list[dict[str, Any]]:
    out = []
    for change in rec.changes:
        data = change["data"]
        row = data.get("record") or data.get("old_record") or {}
        if data["type"] == kind and row.get("id") == session_id:
            out.append(data)
    return out


# --------------------------------------------------------------------------- tests


async def test_insert_update_delete_reach_the_real_client(server: RealtimeServer, db: Any) -> None:
    client = make_client(server)
    try:
        channel, rec = await subscribe(client)
        assert rec.states == [SUBSCRIBED]
        await eventually(lambda: rec.subscribed_messages() == 1, what="Subscribed to PostgreSQL")
        assert rec.system[0] == {"channel": "sessions", "extension": "postgres_changes",
                                 "message": "Subscribed to PostgreSQL", "status": "ok"}

        sid = await new_session(db, metadata=json.dumps({"a": 1}), scheduled_for="2026-03-02T10:00:00Z")
        await db.execute("UPDATE public.sessions SET status = 'waiting' WHERE id = %s", (sid,))
        await db.execute("DELETE FROM public.sessions WHERE id = %s", (sid,))
        await eventually(lambda: len(data_of(rec, sid, "DELETE")) == 1, what="three changes")

        [ins] = data_of(rec, sid, "INSERT")
        [upd] = data_of(rec, sid, "UPDATE")
        [dele] = data_of(rec, sid, "DELETE")
        assert [c["data"]["type"] for c in rec.changes] == ["INSERT", "UPDATE", "DELETE"]
        for data in (ins, upd, dele):
            assert data["schema"] == "public" and data["table"] == "sessions"
            assert data["errors"] is None
            assert TIMESTAMP.match(data["commit_timestamp"]), data["commit_timestamp"]
            types = {c["name"]: c["type"] for c in data["columns"]}
            assert types["id"] == "uuid" and types["status"] == "text" and types["metadata"] == "jsonb"
            assert types["created_at"] == "timestamptz" and types["scheduled_for"] == "timestamptz"
            assert [c["name"] for c in data["columns"]][:2] == ["id", "status"]
        assert "old_record" not in ins
        assert ins["record"]["status"] == "pending"
        assert ins["record"]["metadata"] == {"a": 1}
        assert ins["record"]["scheduled_for"] == "2026-03-02T10:00:00+00:00"
        assert ins["record"]["mechanic_id"] is None
        assert set(ins["record"]) == {c["name"] for c in ins["columns"]}
        assert upd["record"]["status"] == "waiting"
        assert upd["old_record"] == {"id": sid}
        assert "record" not in dele and dele["old_record"] == {"id": sid}

        # the raw frames: ref present and null, ids hold the binding's id
        frames = [f for _, f in server.frames_out if f["event"] == "postgres_changes"]
        assert all("ref" in f and f["ref"] is None for f in frames)
        expected_id = binding_id({"event": "*", "schema": "public", "table": "sessions"})
        assert all(f["payload"]["ids"] == [expected_id] for f in frames)
    finally:
        await client.close()


async def test_raw_protocol_frames(server: RealtimeServer) -> None:
    url = f"{server.websocket_url}?apikey={SERVICE_ROLE_KEY}&vsn=1.0.0"
    binding = {"event": "UPDATE", "schema": "public", "table": "sessions", "filter": "status=eq.live"}
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"topic": "phoenix", "event": "heartbeat", "payload": {}, "ref": None}))
        assert json.loads(await ws.recv()) == {"topic": "phoenix", "event": "phx_reply",
                                               "payload": {"status": "ok", "response": {}}, "ref": None}
        join = {"topic": "realtime:raw", "event": "phx_join", "ref": "7", "join_ref": "7",
                "payload": {"config": {"broadcast": {"ack": False, "self": False},
                                       "presence": {"key": "", "enabled": False}, "private": False,
                                       "postgres_changes": [binding]},
                            "access_token": SERVICE_ROLE_KEY}}
        await ws.send(json.dumps(join))
        reply = json.loads(await ws.recv())
        assert reply["event"] == "phx_reply" and reply["ref"] == "7" and reply["topic"] == "realtime:raw"
        assert reply["payload"]["status"] == "ok"
        [echo] = reply["payload"]["response"]["postgres_changes"]
        assert {k: v for k, v in echo.items() if k != "id"} == binding
        assert isinstance(echo["id"], int) and echo["id"] != 0 and echo["id"] == binding_id(binding)
        system = json.loads(await ws.recv())
        assert system == {"topic": "realtime:raw", "event": "system", "ref": None,
                          "payload": {"channel": "raw", "extension": "postgres_changes",
                                      "message": "Subscribed to PostgreSQL", "status": "ok"}}
        # a second join of the same topic: phx_close with the old join ref, then the new reply
        await ws.send(json.dumps({**join, "ref": "9", "join_ref": "9"}))
        close = json.loads(await ws.recv())
        assert close == {"topic": "realtime:raw", "event": "phx_close", "payload": {}, "ref": "7"}
        assert json.loads(await ws.recv())["ref"] == "9"
        assert json.loads(await ws.recv())["event"] == "system"
        # leave: reply with the leave's ref, then phx_close with the join ref
        await ws.send(json.dumps({"topic": "realtime:raw", "event": "phx_leave", "payload": {},
                                  "ref": "10", "join_ref": "9"}))
        assert json.loads(await ws.recv()) == {"topic": "realtime:raw", "event": "phx_reply",
                                               "payload": {"status": "ok", "response": {}}, "ref": "10"}
        assert json.loads(await ws.recv()) == {"topic": "realtime:raw", "event": "phx_close",
                                               "payload": {}, "ref": "9"}
        # not joined any more
        await ws.send(json.dumps({"topic": "realtime:raw", "event": "access_token",
                                  "payload": {"access_token": ANON_KEY}, "ref": "11"}))
        assert json.loads(await ws.recv())["payload"] == {"status": "error",
                                                          "response": {"reason": "unmatched topic"}}
    assert server.joins_total == 2 and server.leaves_total == 1 and server.heartbeats_total == 1


async def test_bad_or_missing_apikey_is_rejected_at_handshake(server: RealtimeServer) -> None:
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(f"{server.websocket_url}?apikey=nope&vsn=1.0.0"):
            pass
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body) == {"error": "The token provided is not a valid JWT"}
    with pytest.raises(websockets.InvalidStatus) as info:
        async with websockets.connect(f"{server.websocket_url}?vsn=1.0.0"):
            pass
    assert info.value.response.status_code == 401
    assert json.loads(info.value.response.body) == {"error": "API key is missing"}

    client = AsyncRealtimeClient(f"{server.url}/realtime/v1", SERVICE_ROLE_KEY[:-4] + "AAAA",
                                 max_retries=2, initial_backoff=0.05)
    with pytest.raises(websockets.InvalidStatus):
        await client.connect()
    assert server.connections_total == 0


async def test_event_and_filter_bindings(server: RealtimeServer, db: Any) -> None:
    client = make_client(server)
    try:
        sid = await new_session(db)
        # Its insert is behind us: the server has read it before anyone subscribes.
        await server.wait_for(lambda: server.changes_seen >= 1)
        channel = client.channel("filtered")
        inserts, only_this = Recorder(), Recorder()
        channel.on_postgres_changes("INSERT", inserts.on_change, table="sessions")
        channel.on_postgres_changes("UPDATE", only_this.on_change, table="sessions", filter=f"id=eq.{sid}")
        channel.on_system(inserts.on_system)
        await channel.subscribe(inserts.on_state)
        await eventually(lambda: inserts.subscribed_messages() == 1)

        other = await new_session(db)
        await db.execute("UPDATE public.sessions SET status = 'live' WHERE id = %s", (other,))
        await db.execute("UPDATE public.sessions SET status = 'live' WHERE id = %s", (sid,))
        await eventually(lambda: len(only_this.changes) == 1)
        await asyncio.sleep(0.2)
        assert [c["data"]["type"] for c in inserts.changes] == ["INSERT"]
        assert inserts.changes[0]["data"]["record"]["id"] == other
        assert only_this.changes[0]["data"]["record"]["id"] == sid
        # one frame per change, carrying only the ids of the bindings that match
        frames = [f["payload"]["ids"] for _, f in server.frames_out if f["event"] == "postgres_changes"]
        assert len(frames) == 2 and all(len(ids) == 1 for ids in frames)
    finally:
        await client.close()


async def test_replica_identity_full_and_toast(database: str, db: Any) -> None:
    # The app's sessions rows are wide (33 columns): for record + old_record of
    # an out-of-line value to fit one NOTIFY, this server counts values over
    # 1000 bytes as stored out of line (PostgreSQL's own threshold is ~2 KB).
    async with RealtimeServer(database, toast_threshold=1000) as server:
        await _replica_identity_full_and_toast(server, db)


async def _replica_identity_full_and_toast(server: RealtimeServer, db: Any) -> None:
    client = make_client(server)
    try:
        _, rec = await subscribe(client)
        await eventually(lambda: rec.subscribed_messages() == 1)
        # ~1.2 KB of poorly compressible text: "stored out of line", yet record + old_record fit a NOTIFY
        big = {"blob": secrets.token_hex(600)}
        sid = await new_session(db, metadata=json.dumps(big))
        await db.execute("UPDATE public.sessions SET status = 'waiting' WHERE id = %s", (sid,))
        await eventually(lambda: len(data_of(rec, sid, "UPDATE")) == 1)
        [upd] = data_of(rec, sid, "UPDATE")
        assert upd["record"]["status"] == "waiting"
        assert "metadata" not in upd["record"]  # unchanged TOASTed value is not in the WAL
        assert "metadata" in {c["name"] for c in upd["columns"]}

        await db.execute("ALTER TABLE public.sessions REPLICA IDENTITY FULL")
        try:
            await db.execute("UPDATE public.sessions SET status = 'live' WHERE id = %s", (sid,))
            await db.execute("DELETE FROM public.sessions WHERE id = %s", (sid,))
            await eventually(lambda: len(data_of(rec, sid, "DELETE")) == 1)
        finally:
            await db.execute("ALTER TABLE public.sessions REPLICA IDENTITY DEFAULT")
        full_update = data_of(rec, sid, "UPDATE")[1]
        assert full_update["errors"] is None  # whole, not cut down as too large
        assert full_update["old_record"]["status"] == "waiting"
        assert full_update["old_record"]["metadata"] == big
        assert full_update["record"]["metadata"] == big
        [dele] = data_of(rec, sid, "DELETE")
        assert dele["old_record"]["status"] == "live" and dele["old_record"]["id"] == sid
    finally:
        await client.close()


async def test_payload_too_large(server: RealtimeServer, db: Any) -> None:
    client = make_client(server)
    try:
        _, rec = await subscribe(client)
        await eventually(lambda: rec.subscribed_messages() == 1)
        huge = {"notes": "x" * 20000}
        sid = await new_session(db, metadata=json.dumps(huge))
        await eventually(lambda: len(data_of(rec, sid, "INSERT")) == 1)
        [ins] = data_of(rec, sid, "INSERT")
        assert ins["errors"] == ["Error 413: Payload Too Large"]
        assert ins["record"]["id"] == sid and ins["record"]["status"] == "pending"
        assert "metadata" not in ins["record"]
        assert "mechanic_id" not in ins["record"]  # nulls are dropped too
        assert "metadata" in {c["name"] for c in ins["columns"]}  # columns stay complete
    finally:
        await client.close()


@pytest.mark.parametrize("code", [1011, 1000])
async def test_server_close_makes_the_client_reconnect_and_rejoin(server: RealtimeServer, db: Any,
                                                                  code: int) -> None:
    client = make_client(server)
    try:
        _, rec = await subscribe(client)
        await eventually(lambda: rec.subscribed_messages() == 1)
        await server.close_all(code)
        await eventually(lambda: server.joins_total == 2 and rec.subscribed_messages() == 2,
                         what="rejoin on a new connection")
        assert server.connections_total == 2
        assert rec.states == [SUBSCRIBED, CHANNEL_ERROR, SUBSCRIBED]
        sid = await new_session(db)
        await eventually(lambda: len(data_of(rec, sid, "INSERT")) == 1)
    finally:
        await client.close()


async def test_ignored_join_times_out_then_rejoins(server: RealtimeServer) -> None:
    server.ignore_joins = True
    client = make_client(server, timeout=1)
    try:
        _, rec = await subscribe(client)
        assert rec.states == [TIMED_OUT]
        server.ignore_joins = False
        # the client's rejoin timer retries on the same socket
        await eventually(lambda: SUBSCRIBED in rec.states and rec.subscribed_messages() == 1)
        assert server.joins_total >= 2 and server.connections_total == 1
    finally:
        await client.close()


async def test_phx_error_makes_the_client_rejoin(server: RealtimeServer, db: Any) -> None:
    client = make_client(server)
    try:
        _, rec = await subscribe(client)
        await eventually(lambda: rec.subscribed_messages() == 1)
        assert await server.send_phx_error() == 1
        await eventually(lambda: rec.states == [SUBSCRIBED, CHANNEL_ERROR, SUBSCRIBED]
                         and rec.subscribed_messages() == 2)
        assert server.connections_total == 1 and server.joins_total == 2
        sid = await new_session(db)
        await eventually(lambda: len(data_of(rec, sid, "INSERT")) == 1)
    finally:
        await client.close()


async def test_system_error_then_rejoin_ends_in_phx_close(server: RealtimeServer, db: Any) -> None:
    server.fail_subscriptions = True
    client = make_client(server)
    try:
        channel, rec = await subscribe(client)
        await eventually(lambda: rec.states[-1:] == [CHANNEL_ERROR])
        assert "Unable to subscribe to changes with given parameters" in str(rec.errors[-1])
        # the client rejoins the same topic after ~1 s; Phoenix answers the duplicate join with phx_close
        await eventually(lambda: rec.states[-1:] == [CLOSED], what="phx_close")
        assert rec.states == [SUBSCRIBED, CHANNEL_ERROR, CLOSED]
        assert "realtime:sessions" not in client.channels
        server.fail_subscriptions = False

        # the server still holds the rejoined channel: a new channel with the same topic on the same
        # socket is itself closed by the stale phx_close (the client does not check its ref)
        _, again = await subscribe(client)
        await eventually(lambda: again.states[-1:] == [CLOSED])
        # a fresh topic works
        _, fresh = await subscribe(client, topic="sessions-2")
        await eventually(lambda: fresh.subscribed_messages() == 1)
        sid = await new_session(db)
        await eventually(lambda: len(data_of(fresh, sid, "INSERT")) == 1)
        assert server.connections_total == 1
    finally:
        await client.close()


async def test_system_error_on_a_joined_channel(server: RealtimeServer, db: Any) -> None:
    client = make_client(server)
    try:
        _, rec = await subscribe(client)
        await eventually(lambda: rec.subscribed_messages() == 1)
        assert await server.send_system_error() == 1
        await eventually(lambda: CHANNEL_ERROR in rec.states)
        sid = await new_session(db)  # not streamed any more
        await eventually(lambda: rec.states[-1:] == [CLOSED])
        assert data_of(rec, sid, "INSERT") == []
    finally:
        await client.close()


async def test_publication_is_checked(database: str, db: Any) -> None:
    await db.execute("DROP PUBLICATION IF EXISTS supabase_realtime")
    await db.execute("CREATE PUBLICATION supabase_realtime")
    try:
        async with RealtimeServer(database, publication="supabase_realtime") as srv:
            client = make_client(srv)
            try:
                _, rec = await subscribe(client, topic="pub-1")
                await eventually(lambda: CHANNEL_ERROR in rec.states)
                assert str(rec.errors[rec.states.index(CHANNEL_ERROR)]).count(
                    "Please check Realtime is enabled for the given connect parameters: "
                    "[event: *, schema: public, table: sessions, filters: [], select: nil]") == 1
                await db.execute("ALTER PUBLICATION supabase_realtime ADD TABLE public.sessions")
                _, ok = await subscribe(client, topic="pub-2")
                await eventually(lambda: ok.subscribed_messages() == 1)
            finally:
                await client.close()
    finally:
        await db.execute("DROP PUBLICATION IF EXISTS supabase_realtime")


async def test_drop_and_duplicate_changes(server: RealtimeServer, db: Any) -> None:
    client = make_client(server)
    try:
        _, rec = await subscribe(client)
        await eventually(lambda: rec.subscribed_messages() == 1)
        server.drop_changes = True
        lost = await new_session(db)
        await server.wait_for(lambda: server.changes_dropped == 1)
        server.drop_changes = False
        server.duplicate_changes = True
        twice = await new_session(db)
        await eventually(lambda: len(data_of(rec, twice, "INSERT")) == 2)
        assert data_of(rec, lost, "INSERT") == []
    finally:
        await client.close()


async def test_subscribed_message_can_be_delayed(server: RealtimeServer, db: Any) -> None:
    server.subscribed_delay = 1.0
    client = make_client(server)
    try:
        _, rec = await subscribe(client)
        assert rec.states == [SUBSCRIBED] and rec.subscribed_messages() == 0
        early = await new_session(db)  # committed between SUBSCRIBED and "Subscribed to PostgreSQL"
        await server.wait_for(lambda: server.changes_seen >= 1)
        await eventually(lambda: rec.subscribed_messages() == 1)
        late = await new_session(db)
        await eventually(lambda: len(data_of(rec, late, "INSERT")) == 1)
        assert data_of(rec, early, "INSERT") == []
    finally:
        await client.close()


async def test_unsubscribe_and_access_token(server: RealtimeServer) -> None:
    client = make_client(server)
    try:
        channel, rec = await subscribe(client)
        await eventually(lambda: rec.subscribed_messages() == 1)
        await client.set_auth(ANON_KEY)  # a new valid token re-runs the postgres subscription
        await eventually(lambda: rec.subscribed_messages() == 2)
        assert server.access_tokens_total == 1
        await channel.unsubscribe()
        await eventually(lambda: rec.states[-1:] == [CLOSED])
        assert server.leaves_total == 1 and server.joined_topics() == []
    finally:
        await client.close()


async def test_outage_and_restart_on_the_same_port(server: RealtimeServer, db: Any) -> None:
    client = make_client(server, max_retries=8)
    try:
        _, rec = await subscribe(client)
        await eventually(lambda: rec.subscribed_messages() == 1)
        port = server.port
        await server.stop()  # sockets closed with 1001; the client starts its reconnect backoff
        await eventually(lambda: CHANNEL_ERROR in rec.states)
        lost = await new_session(db)  # no Realtime: this change is never delivered
        await asyncio.sleep(0.3)
        assert await server.start() == port
        await eventually(lambda: rec.subscribed_messages() == 2, what="reconnect after the outage")
        assert rec.states == [SUBSCRIBED, CHANNEL_ERROR, SUBSCRIBED] and server.connections_total == 2
        seen = await new_session(db)
        await eventually(lambda: len(data_of(rec, seen, "INSERT")) == 1)
        assert data_of(rec, lost, "INSERT") == []
    finally:
        await client.close()
