"""PostgreSQL restarted under load: nothing lost, nothing twice.

The real daemon, built by the composition root on the PostgreSQL backend of a
private cluster (the shared server on 5432 must not be restarted), mails
through the real `resend` SDK to the Resend test server. A writer commits
pending requests for ten seconds, each owing a support alert and then its
expiry (with an email to the customer) a few seconds after its commit; in the
middle the server is restarted, cleanly (`-m fast`) or as a crash
(`-m immediate`). Afterwards every action owed is in the ledger once as fired,
every email was delivered once, the daemon found its way back by itself, and
no task died unseen.
"""
from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import psycopg
import pytest
import resend
import structlog

from listener import migrate
from listener.adapters.email_resend import ResendSender
from listener.instants import HOUR
from listener.rules import load_rules
from listener.rules.query import table_queries
from tests.live import CUSTOMER, LiveDaemon, eventually, query, seed_people
from tests.pgcluster import PrivateCluster, Shutdown
from tests.servers.resend_server import ResendServer

KEY = "re_test_restart_0123456789"
# 5 min -> 1.5 s (the alert), 15 min -> 4.5 s (the expiry): actions come due
# during the restart and for seconds after it.
SCALE = {"RULES_TIME_SCALE": "200"}
RULES = ("support_unassigned_alert", "request_expiry")
WRITE_FOR_S = 10.0
WRITE_EVERY_S = 0.05
RESTART_AT_S = 5.0


@pytest.fixture
def app_database(private_pg: PrivateCluster) -> Iterator[str]:
    """A fresh database in the private cluster with the migrations, the app's
    schema and the packs' per-table objects, as `listener migrate` leaves it."""
    name = f"listener_restart_{uuid.uuid4().hex[:8]}"
    conninfo = private_pg.create_database(name)
    migrate.apply(conninfo, include_reference=True, queries=table_queries(load_rules({}), HOUR))
    seed_people(conninfo)
    yield conninfo
    with psycopg.connect(private_pg.conninfo("postgres"), autocommit=True) as conn:
        conn.execute(f'drop database if exists "{name}" with (force)')


@pytest.fixture
def resend_server() -> Iterator[ResendServer]:
    saved = resend.api_url, resend.api_key, resend.default_async_http_client
    with ResendServer(KEY, rate_limit=None) as server:
        yield server
    resend.api_url, resend.api_key, resend.default_async_http_client = saved


class Writer:
    """The app: commits pending requests one after another, through the restart.
    A commit whose answer is lost is tried again under the same id (`on conflict
    do nothing`), so the database, not this list, says what was written."""

    def __init__(self, conninfo: str) -> None:
        self.conninfo = conninfo
        self.failures = 0

    def run(self, seconds: float, every: float) -> None:
        conn: psycopg.Connection[Any] | None = None
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            sid = str(uuid.uuid4())
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = psycopg.connect(self.conninfo, autocommit=True)
                    conn.execute("insert into public.sessions (id, status, customer_user_id) "
                                 "values (%s, 'pending', %s) on conflict (id) do nothing",
                                 (sid, CUSTOMER))
                    break
                except psycopg.OperationalError:
                    self.failures += 1
                    conn = None
                    time.sleep(0.1)
            time.sleep(every)
        if conn is not None:
            conn.close()


class Watch:
    """When the daemon stopped being active and ready, and when it was again."""

    def __init__(self, live: LiveDaemon) -> None:
        self.live = live
        self.lost_at: float | None = None
        self.back_at: float | None = None
        self.task = asyncio.create_task(self._watch())

    def healthy(self) -> bool:
        return self.live.daemon.events.active.is_set() and self.live.daemon.readiness.ready()

    async def _watch(self) -> None:
        while True:
            healthy = self.healthy()
            now = time.monotonic()
            if not healthy and self.lost_at is None:
                self.lost_at = now
            elif healthy and self.lost_at is not None and self.back_at is None:
                self.back_at = now
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("mode", [Shutdown.FAST, Shutdown.IMMEDIATE], ids=lambda m: m.value)
async def test_a_restart_under_load_loses_nothing_and_doubles_nothing(
        private_pg: PrivateCluster, app_database: str, resend_server: ResendServer,
        tmp_path: Path, mode: Shutdown) -> None:
    loop = asyncio.get_running_loop()
    unhandled: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: unhandled.append(context))
    sender = ResendSender(KEY, resend_server.url, timeout=5.0)
    writer = Writer(app_database)
    try:
        with structlog.testing.capture_logs() as logs:
            # LEASE_TTL and RECONCILE_INTERVAL as deployed: recovery is the daemon's own.
            async with LiveDaemon(app_database, tmp_path, env=SCALE, sender=sender,
                                  lease_ttl_s=15.0, reconcile_s=60.0) as live:
                await live.active()
                writing = asyncio.create_task(
                    asyncio.to_thread(writer.run, WRITE_FOR_S, WRITE_EVERY_S))
                await asyncio.sleep(RESTART_AT_S)
                watch = Watch(live)
                restart_started = time.monotonic()
                await asyncio.to_thread(private_pg.restart, mode)
                restarted = time.monotonic()
                await writing
                sids = [sid for (sid,) in query(app_database,
                                                "select id::text from public.sessions")]
                owed = {(rule, sid) for rule in RULES for sid in sids}

                def all_fired() -> bool:
                    done = {(rule, sid) for rule, sid in query(
                        app_database, "select rule, session_id::text from public.listener_ledger"
                                      " where state = 'fired'")}
                    return owed <= done

                try:
                    await eventually(all_fired, timeout=60, interval=0.2)
                except AssertionError:
                    print(diagnose(app_database, owed, logs))
                    raise
                await eventually(lambda: watch.back_at is not None, timeout=30)
                await asyncio.sleep(1.0)  # anything doubled would show by now
                watch.task.cancel()
                results = list(live.results)
    finally:
        await sender.aclose()
        gc.collect()  # a task that died unseen is reported when it is collected
        await asyncio.sleep(0)
        loop.set_exception_handler(None)

    ledger = query(app_database, "select rule, session_id::text, state, attempts "
                                 "from public.listener_ledger")
    by_action = Counter((rule, sid) for rule, sid, _, _ in ledger)
    assert len(sids) > 100, f"the writer committed only {len(sids)} requests"
    assert set(by_action) == owed, "an action owed is missing from the ledger, or one not owed"
    assert max(by_action.values()) == 1
    assert {state for _, _, state, _ in ledger} == {"fired"}
    assert query(app_database, "select count(*) from public.sessions "
                               "where status <> 'expired'") == [(0,)]

    # Each action acted on once here, each email delivered once.
    acted = Counter((r.key.rule, r.key.row_key) for r in results)
    assert set(acted) == owed and max(acted.values()) == 1, acted.most_common(3)
    refs = Counter(d.ref for d in resend_server.delivered)
    assert resend_server.duplicates() == {}
    assert len(refs) == 2 * len(sids) and max(refs.values()) == 1

    # It noticed, and came back by itself: active and ready again.
    assert watch.lost_at is not None, "the daemon never noticed the restart: proves nothing"
    assert watch.back_at is not None
    recovery = watch.back_at - restarted
    attempts = Counter(a for _, _, _, a in ledger)
    events = Counter(e["event"] for e in logs)
    print(f"\n{mode.value} restart: {len(sids)} requests ({2 * len(sids)} actions, "
          f"{len(refs)} emails), pg_ctl restart took {restarted - restart_started:.2f} s, "
          f"the daemon active and ready {recovery:.2f} s after the server was back "
          f"(unready for {watch.back_at - watch.lost_at:.2f} s); writer retries "
          f"{writer.failures}; ledger attempts {dict(attempts)}; "
          f"{ {e: events[e] for e in sorted(events) if e in NOTABLE} }")
    bugs = [e for e in logs if e["event"] in ("bug", "action_error", "task_failed")]
    assert not bugs, bugs[:3]
    assert not unhandled, [c.get("message") for c in unhandled]


NOTABLE = {"source_lost", "reconcile_failed", "store_unavailable", "action_deferred",
           "store_retry", "lease_renew_failed", "lease_lost", "lease_error", "complete_fenced",
           "reconciled", "freeze_retry", "email_batch_not_frozen", "contacts_retry"}


def diagnose(conninfo: str, owed: set[tuple[str, str]], logs: list[dict[str, Any]]) -> str:
    """What was owed and not done, and what the daemon said: for a failure."""
    rows = {(rule, sid): (state, attempts) for rule, sid, state, attempts in query(
        conninfo, "select rule, session_id::text, state, attempts from public.listener_ledger")}
    missing = sorted(owed - {k for k, v in rows.items() if v[0] == "fired"})
    lines = [f"{len(missing)} of {len(owed)} actions not fired:"]
    for key in missing[:10]:
        status = query(conninfo, "select status, status_changed_at from public.sessions "
                                 "where id = %s", key[1])
        lines.append(f"  {key}: ledger {rows.get(key)}, row {status}")
    lines += [f"  {e}" for e in logs if e.get("log_level") in ("warning", "error")][:40]
    return "\n".join(lines)
