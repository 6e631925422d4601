"""The sessions pack on the app's real schema, with the app's own writes
(listener/app_writes.py): the plan end wins over the app's too-early
`expires_at`, the app is told through one signed webhook, and its timeline
shows what the listener did."""
from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import psycopg

from listener import app_writes as app
from listener.webhooks import verify_signature
from tests.live import FAST, LiveDaemon, eventually, query
from tests.servers.webhook_receiver import WebhookReceiver

SECRET = "test-webhook-secret-0123456789abcdef"
SCALE = int(FAST["RULES_TIME_SCALE"])


def minutes(n: float) -> timedelta:
    return timedelta(seconds=n * 60 / SCALE)


async def test_a_video15_session_with_a_10_minute_extension_ends_55_minutes_after_it_started(
        database: str, tmp_path: Path) -> None:
    with WebhookReceiver(SECRET) as receiver:
        async with LiveDaemon(database, tmp_path, settings={
                "webhook_url": receiver.url, "webhook_secret": SECRET}) as live:
            await live.active()
            async with await psycopg.AsyncConnection.connect(database, autocommit=True) as conn:
                customer = await app.create_user(conn, "carla@example.com", "Carla Diaz")
                mechanic, _ = await app.create_mechanic(conn, "mo@example.com", "Mo Khan")
                sid = await app.insert_paid_session(conn, customer, type="video", plan="video15")
                await app.accept_session(conn, sid, mechanic)
                await app.start_session(conn, sid)
                await app.extend_session(conn, sid, 10, "pi_test_55")
                # The extension webhook's expires_at (started_at + 10 minutes), in
                # the test's scaled time: the too-early end the app computes.
                await conn.execute("update public.sessions set expires_at = started_at + %s "
                                   "where id = %s", (minutes(10), sid))
            await eventually(lambda: live.fired("plan_time_expiry"), timeout=30)
            result = live.fired("plan_time_expiry")[0]
            await eventually(lambda: any(r.payload.get("event") == "session.ended"
                                         for r in receiver.requests), timeout=10)
    assert result.outcome == "fired" and result.status == "completed", result.detail
    status, started, ended, metadata = query(
        database, "select status, started_at, ended_at, metadata from public.sessions "
                  "where id = %s", sid)[0]
    assert status == "completed" and metadata["listener"]["reason"] == "plan_time_elapsed"
    # 45 minutes of plan + 10 of extension: 55 (scaled), not the app's 10.
    ran = ended - started
    assert minutes(55) <= ran < minutes(55) + timedelta(seconds=1), ran
    assert not live.fired("auto_end_max_duration")

    ended_events = [r for r in receiver.requests if r.payload.get("event") == "session.ended"]
    assert len(ended_events) == 1, [r.payload for r in receiver.requests]
    event = ended_events[0]
    assert event.verified and verify_signature(
        SECRET, event.headers.get("Listener-Signature"), event.body,
        )
    assert event.idempotency_key == event.payload["id"] == result.key.idempotency_key
    assert event.payload["row_id"] == sid and event.payload["status_change"] == {
        "status": "completed", "reason": "plan_time_elapsed"}
    assert json.loads(event.body)["rule"] == "plan_time_expiry"

    timeline = query(database, "select event, level, message, metadata from public.session_logs "
                               "where session_id = %s order by created_at", sid)
    assert [(e, lvl) for e, lvl, _, _ in timeline] == [("session.auto_ended", "info")], timeline
    assert timeline[0][3]["rule"] == "plan_time_expiry"
    ledger = query(database, "select rule, state, detail from public.listener_ledger "
                             "where table_name = 'sessions' and row_key = %s", sid)
    assert [(rule, state) for rule, state, _ in ledger] == [("plan_time_expiry", "fired")]
    assert ledger[0][2]["webhook"]["event"] == "session.ended"
