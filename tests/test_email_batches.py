"""Batched email delivery: the Mailer and ResendSender through the real `resend`
SDK against the local Resend stand-in, and the frozen-batch functions on a real
PostgreSQL (migration 0007)."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

import psycopg
import pytest
import resend
from psycopg.types.json import Jsonb

from listener.adapters.email_resend import ResendSender
from listener.effects import OutgoingEmail
from listener.email_batch import FreezeRefused, batch_key, frozen_batches
from listener.instants import format_instant, parse_instant
from listener.mailer import Mailer, Member
from listener.store import ActionKey

try:
    from tests.servers.resend_server import ResendServer
except ImportError:  # run as `pytest` without the project root on sys.path
    from servers.resend_server import ResendServer  # type: ignore[no-redef]

KEY = "re_test_batches_0123456789"
HOLDER, TOKEN = "test-holder", 7
DUE = parse_instant("2026-03-02T10:00:00Z")
ROLES = ("customer", "mechanic")


# -- helpers -------------------------------------------------------------------------------

def action(n: int, rule: str = "scheduled_reminder_1h") -> ActionKey:
    return ActionKey(rule, "sessions", str(uuid.UUID(int=n + 1)), DUE)


def emails_of(key: ActionKey, roles: tuple[str, ...] = ROLES) -> list[OutgoingEmail]:
    return [OutgoingEmail(
        to=f"{role}{key.row_key[-6:]}@example.com",
        sender="The Auto Doctor <noreply@example.com>",
        subject=f"Session {key.row_key[:8]} starts in 1 hour", html="<p>Soon &amp; here</p>",
        text="Soon & here", idempotency_key=f"{key.idempotency_key}/{role}",
        rule=key.rule, table=key.table, row_id=key.row_key, role=role) for role in roles]


def fast(sender, freeze=None, **kw) -> Mailer:
    opts = dict(rate_per_second=5.0, max_attempts=5, base_delay=0.05, max_delay=0.3,
                freeze=freeze)
    opts.update(kw)
    return Mailer(sender, **opts)


@pytest.fixture
def server():
    saved = resend.api_url, resend.api_key, resend.default_async_http_client
    srv = ResendServer(api_key=KEY, rate_limit=5).start()
    yield srv
    srv.stop()
    resend.api_url, resend.api_key, resend.default_async_http_client = saved


@pytest.fixture
async def sender(server):
    s = ResendSender(KEY, server.url, timeout=5.0)
    yield s
    await s.aclose()


class SqlBatches:
    """The lead's `freeze` and batch read, as the store will call them (psycopg)."""

    def __init__(self, conn: psycopg.AsyncConnection, holder: str = HOLDER,
                 token: int = TOKEN) -> None:
        self.conn = conn
        self.holder, self.token = holder, token
        self.calls: list[str] = []
        self._lock = asyncio.Lock()

    async def freeze(self, key, payload, members, supersedes):
        self.calls.append(key)
        async with self._lock:
            cur = await self.conn.execute(
                "select public.listener_batch_freeze_v1(p_batch_key => %s, p_payload => %s, "
                "p_members => %s, p_holder => %s, p_token => %s, p_supersedes => %s)",
                (key, Jsonb(payload), Jsonb(members), self.holder, self.token, supersedes))
            (answer,) = await cur.fetchone()
        return frozen_batches(answer)

    async def batch(self, key: str) -> dict | None:
        async with self._lock:
            cur = await self.conn.execute("select public.listener_batch_v1(%s)", (key,))
            (row,) = await cur.fetchone()
        return row

    async def ledger_batch_key(self, key: ActionKey) -> str | None:
        async with self._lock:
            cur = await self.conn.execute(
                "select batch_key from public.listener_ledger where rule = %s "
                "and session_id = %s::uuid and due_at = %s::timestamptz",
                (key.rule, key.row_key, format_instant(key.due_at)))
            row = await cur.fetchone()
        return row[0] if row else None


def _has_generic_ledger(conn: psycopg.Connection) -> bool:
    return conn.execute("select exists (select 1 from pg_attribute where attrelid = "
                        "'public.listener_ledger'::regclass and attname = 'row_key' "
                        "and not attisdropped)").fetchone()[0]


def claim(conninfo: str, keys: list[ActionKey]) -> None:
    """The lease and one ledger claim per action, as the daemon leaves them before emailing."""
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute("insert into public.listener_lease (name, holder, fencing_token, expires_at) "
                     "values ('listener', %s, %s, now() + interval '1 hour') on conflict (name) "
                     "do update set holder = excluded.holder, fencing_token = "
                     "excluded.fencing_token, expires_at = excluded.expires_at",
                     (HOLDER, TOKEN))
        generic = _has_generic_ledger(conn)
        with conn.cursor() as cur:
            for k in keys:
                if generic:
                    cur.execute("insert into public.listener_ledger (rule, table_name, row_key, "
                                "session_id, due_at, holder, fencing_token) values "
                                "(%s, %s, %s, %s::uuid, %s::timestamptz, %s, %s)",
                                (k.rule, k.table, k.row_key, k.row_key,
                                 format_instant(k.due_at), HOLDER, TOKEN))
                else:
                    cur.execute("insert into public.listener_ledger (rule, session_id, due_at, "
                                "holder, fencing_token) values (%s, %s::uuid, %s::timestamptz, "
                                "%s, %s)", (k.rule, k.row_key, format_instant(k.due_at),
                                            HOLDER, TOKEN))


@pytest.fixture
async def batches(database):
    conn = await psycopg.AsyncConnection.connect(database, autocommit=True)
    yield SqlBatches(conn)
    await conn.close()


def batch_rows(conninfo: str) -> dict[str, tuple[str, int]]:
    with psycopg.connect(conninfo) as conn:
        return {k: (state, n) for k, state, n in conn.execute(
            "select batch_key, state, jsonb_array_length(payload) "
            "from public.listener_email_batches")}


def assert_none_twice(server: ResendServer) -> None:
    assert server.duplicates() == {}
    refs = [d.ref for d in server.delivered]
    assert None not in refs and len(refs) == len(set(refs))


# -- the burst ------------------------------------------------------------------------------

async def test_a_burst_of_1000_due_together_is_delivered_once_in_batches(server, sender,
                                                                        batches, database):
    keys = [action(n) for n in range(500)]  # 500 appointments, customer + mechanic each
    claim(database, keys)
    mailer = fast(sender, batches.freeze)
    t0 = time.monotonic()
    results = await asyncio.gather(*(mailer.send(k, emails_of(k)) for k in keys))
    elapsed = time.monotonic() - t0
    await mailer.aclose()

    assert all(r == [None, None] for r in results), [r for r in results if r != [None, None]][:3]
    assert len(server.delivered) == 1000
    assert_none_twice(server)
    requests = server.requests
    assert all(r.path == "/emails/batch" and r.status == 200 for r in requests)
    assert len(requests) <= 12 and server.count(429) == 0
    # Every batch was frozen before it was sent, and every action names its batch.
    frozen = batch_rows(database)
    assert {r.idempotency_key for r in requests} == set(frozen)
    assert sum(n for _, n in frozen.values()) == 1000
    for k in keys[::50]:
        bk = await batches.ledger_batch_key(k)
        assert bk in frozen
        stored = await batches.batch(bk)
        assert {e["headers"]["X-Entity-Ref-ID"] for e in stored["payload"]} >= {
            e.idempotency_key for e in emails_of(k)}
    print(f"\n1000 emails in {elapsed:.2f}s, {len(requests)} requests")


async def test_an_email_alone_takes_the_single_path_under_its_own_key(server, sender,
                                                                      batches, database):
    k = action(1)
    claim(database, [k])
    [email] = emails_of(k, roles=("customer",))
    mailer = fast(sender, batches.freeze)
    assert await mailer.send(k, [email]) == [None]
    await mailer.aclose()
    [req] = server.requests
    assert req.path == "/emails" and req.idempotency_key == email.idempotency_key
    # Frozen all the same: a crash cannot turn it into part of a batch later.
    assert await batches.ledger_batch_key(k) == batch_key([email.idempotency_key])


# -- failures -------------------------------------------------------------------------------

async def test_an_invalid_email_fails_and_the_rest_go_under_a_new_key(server, sender,
                                                                      batches, database):
    keys = [action(n) for n in range(10)]
    claim(database, keys)
    bad = keys[4]
    mailer = fast(sender, batches.freeze)
    bad_emails = emails_of(bad)
    bad_emails[1] = dataclasses.replace(bad_emails[1], to="not-an-address")
    results = await asyncio.gather(*(mailer.send(k, bad_emails if k == bad else emails_of(k))
                                     for k in keys))
    await mailer.aclose()

    by_key = dict(zip(keys, results))
    assert by_key[bad][0] is None
    assert "422" in by_key[bad][1] and "to" in by_key[bad][1]
    assert all(r == [None, None] for k, r in by_key.items() if k != bad)
    assert len(server.delivered) == 19
    assert_none_twice(server)
    first, second = server.requests
    assert first.status == 422 and second.status == 200
    assert first.idempotency_key != second.idempotency_key
    rows = batch_rows(database)
    assert rows[first.idempotency_key] == ("superseded", 20)
    assert rows[second.idempotency_key] == ("frozen", 19)
    # The bad action's good email moved with the rest.
    assert await batches.ledger_batch_key(bad) == second.idempotency_key


async def test_without_an_index_in_the_422_the_batch_is_halved_until_the_bad_one_is_found(
        server, sender):
    server.strict_names_index = False
    keys = [action(n) for n in range(16)]
    bad = keys[11]
    mailer = fast(sender, rate_per_second=50.0)
    server.rate_limit = 50
    one = {k: emails_of(k, roles=("customer",)) for k in keys}
    one[bad] = [dataclasses.replace(one[bad][0], subject="")]
    results = await asyncio.gather(*(mailer.send(k, one[k]) for k in keys))
    await mailer.aclose()
    by_key = dict(zip(keys, results))
    assert "422" in by_key[bad][0]
    assert all(r == [None] for k, r in by_key.items() if k != bad)
    assert len(server.delivered) == 15
    assert_none_twice(server)


@pytest.mark.parametrize("how", ["500", "drop"])
async def test_a_batch_accepted_then_answer_lost_is_retried_under_its_key_once(server, sender,
                                                                               how):
    keys = [action(n) for n in range(30)]
    server.lose_next(1, how=how)
    mailer = fast(sender)
    results = await asyncio.gather(*(mailer.send(k, emails_of(k)) for k in keys))
    await mailer.aclose()

    assert all(r == [None, None] for r in results)
    assert len(server.delivered) == 60
    assert_none_twice(server)
    first, second = server.requests
    assert first.outcome == "lost" and second.outcome == "replayed"
    assert first.idempotency_key == second.idempotency_key
    assert json.dumps(first.body) == json.dumps(second.body)  # the same bytes, re-sent
    assert server.delivered_per_key() == {first.idempotency_key: 60}


async def test_a_frozen_batch_resent_after_a_crash_delivers_nothing_twice(server, batches,
                                                                          database):
    keys = [action(n) for n in range(40)]
    claim(database, keys)
    # The first instance sends a batch; the server takes its time; the instance dies.
    server.hang_next(1, seconds=1.0)
    first = ResendSender(KEY, server.url, timeout=5.0)
    dying = fast(first, batches.freeze)
    tasks = [asyncio.create_task(dying.send(k, emails_of(k))) for k in keys[:25]]
    while not server.requests:
        await asyncio.sleep(0.01)
    for t in tasks:
        t.cancel()
    await dying.aclose()  # killed: nothing settled, nothing recorded as sent
    await first.aclose()

    # The new instance finds the claims unfinished, their batch frozen.
    bk = await batches.ledger_batch_key(keys[0])
    stored = await batches.batch(bk)
    assert stored["state"] == "frozen" and len(stored["payload"]) == 50
    second = ResendSender(KEY, server.url, timeout=5.0)
    recovered = fast(second, batches.freeze)
    # Straight from the record (what an operator tool does) ...
    direct = await recovered.resend_frozen(bk, stored["payload"], stored["members"])
    assert direct == [None] * 50
    # ... and by re-running every unfinished action, regrouped with new ones.
    results = await asyncio.gather(*(recovered.send(k, emails_of(k)) for k in keys))
    await recovered.aclose()
    await second.aclose()

    assert all(r == [None, None] for r in results)
    assert len(server.delivered) == 80
    assert_none_twice(server)
    assert server.delivered_per_key()[bk] == 50
    keys_sent = [r.idempotency_key for r in server.requests if r.status == 200]
    assert keys_sent.count(bk) >= 2  # re-sent under its key, answered from the first send


async def test_a_changed_batch_under_a_used_key_is_a_409_and_not_retried(server, sender):
    emails = emails_of(action(1)) + emails_of(action(2))
    payload = [sender.payload_item(e) for e in emails]
    key = batch_key(e.idempotency_key for e in emails)
    await sender.send_batch(payload, key)
    changed = [dict(item) for item in payload]
    changed[2] = {**changed[2], "subject": "Another subject"}

    mailer = fast(sender)
    results = await mailer.resend_frozen(key, changed)
    await mailer.aclose()
    assert all("409" in r and "invalid_idempotent_request" in r for r in results)
    assert [r.status for r in server.requests] == [200, 409]
    assert len(server.delivered) == 4


async def test_a_spent_daily_quota_fails_the_emails_without_retrying(server, sender):
    server.daily_quota = 150
    keys = [action(n) for n in range(100)]
    mailer = fast(sender, max_batch=50)
    results = await asyncio.gather(*(mailer.send(k, emails_of(k)) for k in keys))
    await mailer.aclose()

    flat = [r for rs in results for r in rs]
    sent = [r for r in flat if r is None]
    failed = [r for r in flat if r is not None]
    assert len(sent) == 150 == len(server.delivered)
    assert len(failed) == 50 and all("daily_quota_exceeded" in r for r in failed)
    refused = [r for r in server.requests if r.outcome == "daily_quota_exceeded"]
    assert len(refused) == 1  # asked once, not retried
    assert len(server.requests) == 4


async def test_the_mailer_follows_a_lower_ratelimit_limit(server, sender):
    server.rate_limit = 2
    server.reset()
    mailer = fast(sender, rate_per_second=10.0)
    for n in range(6):  # one action at a time: six requests
        assert await mailer.send(action(n), emails_of(action(n))) == [None, None]
    await mailer.aclose()
    assert mailer.rate == 2.0
    assert server.count(429) == 0
    arrivals = [r.at for r in server.requests]
    assert len(arrivals) == 6
    for a, b in zip(arrivals, arrivals[2:]):
        assert b - a >= 1.0  # never 3 in one second


async def test_a_429_slows_the_batch_not_everything(server, sender):
    server.fail_next(1, status=429, retry_after=1)
    mailer = fast(sender, rate_per_second=5.0)
    results = await asyncio.gather(*(mailer.send(action(n), emails_of(action(n)))
                                     for n in range(150)))
    await mailer.aclose()
    assert all(r == [None, None] for r in results)
    assert len(server.delivered) == 300
    assert_none_twice(server)
    requests = server.requests
    statuses = [r.status for r in requests]
    assert statuses.count(429) == 1
    # Other batches went on while the refused one waited for its retry.
    refused = statuses.index(429)
    retry = next(i for i in range(refused + 1, len(requests))
                 if requests[i].idempotency_key == requests[refused].idempotency_key)
    assert any(r.status == 200 and r.idempotency_key != requests[refused].idempotency_key
               for r in requests[refused + 1:retry])


# -- the SQL functions ----------------------------------------------------------------------

def _freeze_sql(conn, key, payload, members, holder=HOLDER, token=TOKEN, supersedes=None):
    return conn.execute(
        "select public.listener_batch_freeze_v1(p_batch_key => %s, p_payload => %s, "
        "p_members => %s, p_holder => %s, p_token => %s, p_supersedes => %s)",
        (key, Jsonb(payload), Jsonb(members), holder, token, supersedes)).fetchone()[0]


def _member(k: ActionKey) -> dict:
    return {**Member(k.rule, k.table, k.row_key, format_instant(k.due_at)).as_json(),
            "emails": [f"{k.idempotency_key}/customer"]}


def test_freeze_is_fenced_idempotent_and_points_the_ledger_at_its_batch(database):
    a, b = action(1), action(2)
    claim(database, [a, b])
    payload = [{"to": "x@example.com", "subject": "s", "text": "t"}]
    with psycopg.connect(database, autocommit=True) as conn:
        assert _freeze_sql(conn, "batch/one", payload, [_member(a)], token=TOKEN + 1) == {
            "outcome": "fenced"}
        with pytest.raises(FreezeRefused):
            frozen_batches({"outcome": "fenced"})
        assert conn.execute("select count(*) from public.listener_email_batches").fetchone() == (0,)

        assert _freeze_sql(conn, "batch/one", payload, [_member(a)]) == {"outcome": "frozen"}
        assert _freeze_sql(conn, "batch/one", payload, [_member(a)]) == {"outcome": "frozen"}
        assert conn.execute("select count(*) from public.listener_email_batches").fetchone() == (1,)
        assert conn.execute("select batch_key from public.listener_ledger where session_id = "
                            "%s::uuid", (a.row_key,)).fetchone() == ("batch/one",)

        # Another batch with a member of the first: the first comes back, nothing changes.
        answer = _freeze_sql(conn, "batch/two", payload * 2, [_member(a), _member(b)])
        assert answer["outcome"] == "taken"
        [taken] = frozen_batches(answer)
        assert taken.batch_key == "batch/one" and taken.payload == payload
        assert conn.execute("select count(*) from public.listener_email_batches").fetchone() == (1,)
        # The same key with another payload: the recorded one wins.
        answer = _freeze_sql(conn, "batch/one", payload * 2, [_member(a)])
        assert [t.payload for t in frozen_batches(answer)] == [payload]

        # Superseding (after a strict 422) moves the members.
        assert _freeze_sql(conn, "batch/three", payload * 2, [_member(a), _member(b)],
                           supersedes="batch/one") == {"outcome": "frozen"}
        read = conn.execute("select public.listener_batch_v1('batch/one')").fetchone()[0]
        assert read["state"] == "superseded" and read["payload"] == payload
        read = conn.execute("select public.listener_batch_v1('batch/three')").fetchone()[0]
        assert read["state"] == "frozen" and read["supersedes"] == "batch/one"
        assert conn.execute("select public.listener_batch_v1('batch/none')").fetchone() == (None,)
        assert {r[0] for r in conn.execute("select batch_key from public.listener_ledger")} == {
            "batch/three"}


def test_batch_functions_are_for_the_service_role_only(database):
    with psycopg.connect(database, autocommit=True) as conn:
        roles = {r[0] for r in conn.execute(
            "select rolname from pg_roles where rolname in ('anon', 'authenticated', "
            "'service_role')")}
        for fn in ("public.listener_batch_freeze_v1(text, jsonb, jsonb, text, bigint, text)",
                   "public.listener_batch_v1(text)"):
            assert conn.execute("select prosecdef from pg_proc where oid = %s::regprocedure",
                                (fn,)).fetchone() == (True,)
            for role in roles:
                allowed = conn.execute("select has_function_privilege(%s, %s, 'execute')",
                                       (role, fn)).fetchone()[0]
                assert allowed == (role == "service_role"), (role, fn)
        assert conn.execute("select relrowsecurity from pg_class where oid = "
                            "'public.listener_email_batches'::regclass").fetchone() == (True,)
