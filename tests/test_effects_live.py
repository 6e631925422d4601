"""The daemon's effects end to end: real resend SDK to a Resend-faithful server,
real Mosquitto, real PostgreSQL."""
from __future__ import annotations

from listener.email_batch import REF_HEADER

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiomqtt
import psycopg

from listener import metrics
from listener.adapters.email_resend import ResendSender
from listener.adapters.mqtt import MqttPublisher
from tests.live import (
    MECHANIC, LiveDaemon, eventually, insert_session, ledger, query, seed_people)
from tests.servers.resend_server import ResendServer

KEY = "re_test_123456789"


async def test_actions_are_emailed_through_resend(database: str, tmp_path: Path) -> None:
    seed_people(database)
    with ResendServer(KEY, rate_limit=50) as resend:
        async with LiveDaemon(database, tmp_path, sender=ResendSender(KEY, resend.url)) as live:
            await live.active()
            sid = insert_session(database, status="pending")
            await eventually(lambda: len(live.fired()) == 2)
        delivered = resend.delivered
    by_key = {d.idempotency_key: d for d in delivered}
    assert set(by_key) == {
        f"listener/support_unassigned_alert/{sid}/{live.fired()[0].key.due_at and _iso(live.fired()[0])}/support",
        f"listener/request_expiry/{sid}/{_iso(live.fired()[1])}/customer"}
    customer = by_key[f"listener/request_expiry/{sid}/{_iso(live.fired()[1])}/customer"]
    assert customer.body["to"] in ("carla@example.com", ["carla@example.com"])
    assert sid[:8] in customer.body["subject"]
    assert f"https://app.example/sessions/{sid}" in customer.body["html"]
    assert not list(tmp_path.glob("*.json"))  # nothing went to the outbox


def _iso(result) -> str:  # type: ignore[no-untyped-def]
    from listener.instants import format_instant

    return format_instant(result.key.due_at)


async def test_a_burst_of_due_actions_is_sent_once_each_under_the_limit(
        database: str, tmp_path: Path) -> None:
    seed_people(database)
    with psycopg.connect(database, autocommit=True) as conn:
        # 100 requests already 14.5 minutes old: each expires (and mails) at once.
        conn.execute("insert into public.sessions (status, customer_user_id, scheduled_for, "
                     "status_changed_at) select 'pending', %s, now() + interval '1 day', "
                     "now() - interval '899 seconds' from generate_series(1, 100)",
                     ("22222222-2222-4222-8222-222222222222",))
    with ResendServer(KEY, rate_limit=20) as resend:
        sender = ResendSender(KEY, resend.url)
        async with LiveDaemon(database, tmp_path, sender=sender, email_rate=20) as live:
            await eventually(lambda: len([r for r in live.results if r.outcome == "fired"])
                             == 100, timeout=60)
        refused = resend.count(429)
        delivered = resend.delivered
    # Each email names itself in its ref header (batches share one request key).
    refs = [d.headers.get(REF_HEADER) for d in delivered]
    assert len(refs) == len(set(refs)) == 100
    assert refused <= 5
    assert {s for _, s, _ in ledger(database)} == {"fired"}
    print(f"\n100 emails under a 20/s limit: {refused} refused by the server")


async def test_transient_failures_are_retried_and_delivered_once(
        database: str, tmp_path: Path) -> None:
    seed_people(database)
    with ResendServer(KEY, rate_limit=50) as resend:
        resend.fail_next(2, status=500)
        resend.fail_next(1, status=429, retry_after=1)
        async with LiveDaemon(database, tmp_path, sender=ResendSender(KEY, resend.url)) as live:
            await live.active()
            insert_session(database, status="waiting", mechanic_id=MECHANIC)
            await eventually(lambda: len([r for r in live.results
                                          if r.key.rule == "support_stuck_alert"]) == 1)
        delivered = resend.delivered
    assert sorted(d.body["subject"].split(":")[0][:7] for d in delivered) == ["Session"] * 2
    assert len({d.idempotency_key for d in delivered}) == len(delivered) == 2
    assert [s for _, s, _ in ledger(database)] == ["fired", "fired"]


def email_failures() -> float:
    return metrics.REGISTRY.get_sample_value("listener_email_failures_total") or 0.0


async def test_a_permanent_failure_is_recorded_as_failed(database: str, tmp_path: Path) -> None:
    seed_people(database)
    before = email_failures()
    with ResendServer(KEY, rate_limit=50) as resend:
        resend.fail_next(1, status=422)
        async with LiveDaemon(database, tmp_path, sender=ResendSender(KEY, resend.url)) as live:
            await live.active()
            sid = insert_session(database, status="pending", scheduled_for="2099-01-01")
            await eventually(lambda: live.fired("request_expiry"))
    assert live.fired("request_expiry")[0].outcome == "failed"
    state, detail = query(database, "select state, detail from public.listener_ledger "
                                     "where session_id = %s", sid)[0]
    assert state == "failed" and "customer" in detail["email_errors"]
    assert query(database, "select status from public.sessions where id = %s", sid) == [
        ("expired",)]  # the status change stands; only the email failed
    assert email_failures() == before + 1


async def test_other_timers_stay_on_time_while_resend_hangs(database: str, tmp_path: Path) -> None:
    seed_people(database)
    with ResendServer(KEY, rate_limit=50) as resend:
        resend.hang_next(50, seconds=20)
        sender = ResendSender(KEY, resend.url, timeout=10)
        async with LiveDaemon(database, tmp_path, sender=sender) as live:
            await live.active()
            for _ in range(10):
                insert_session(database, status="pending")
            ends = insert_session(database, status="live", started_at="now()",
                                  expires_at=datetime.now(timezone.utc) + timedelta(seconds=3))
            await eventually(lambda: live.fired("plan_time_expiry"), timeout=30)
            result = live.fired("plan_time_expiry")[0]
            assert result.key.session_id == ends and result.outcome == "fired"
            # Requests hang 20 s: every one that began before the firing was still hanging.
            fired_mono = time.monotonic() - (time.time() - result.fired_at / 1e6)
            hanging = [r for r in resend.requests if r.outcome == "hang" and r.at < fired_mono]
            assert hanging, "no email was hanging when it fired: this proves nothing"
            [(recorded_ms,)] = query(database, "select lateness_ms from public.listener_ledger "
                                     "where rule = 'plan_time_expiry' and session_id = %s", ends)
            assert result.lateness_ms < 1000 and recorded_ms < 1000, (result.lateness_ms,
                                                                        recorded_ms)
            print(f"\nplan_time_expiry fired {result.lateness_ms} ms late while "
                  f"{len(hanging)} email requests hung")
            live.stop.set()


async def test_every_action_is_published_on_mqtt(database: str, tmp_path: Path) -> None:
    seed_people(database)
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    publisher = MqttPublisher(f"mqtt://127.0.0.1:1883/{prefix}", f"listener-{prefix}")
    messages: list[tuple[str, dict]] = []
    async with aiomqtt.Client("127.0.0.1", 1883) as sub:
        await sub.subscribe(f"{prefix}/#", qos=1)

        async def collect() -> None:
            async for message in sub.messages:
                messages.append((str(message.topic), json.loads(message.payload)
                                 if message.payload.startswith(b"{") else message.payload))

        collector = asyncio.create_task(collect())
        await publisher.start()
        try:
            async with LiveDaemon(database, tmp_path, publisher=publisher) as live:
                await live.active()
                sid = insert_session(database, status="pending")
                await eventually(lambda: len([m for m in messages if "/sessions/" in m[0]]) == 2)
        finally:
            await publisher.close()
            await asyncio.sleep(0.3)
            collector.cancel()
        await sub.publish(f"{prefix}/listener/status", b"", qos=1, retain=True)
    actions = [(t, m) for t, m in messages if "/sessions/" in t]
    assert [t for t, _ in actions] == [f"{prefix}/sessions/{sid}/support_unassigned_alert",
                                       f"{prefix}/sessions/{sid}/request_expiry"]
    assert actions[1][1]["status"] == "expired" and actions[1][1]["outcome"] == "fired"
    statuses = [m for t, m in messages if t.endswith("/listener/status")]
    assert statuses[0] == b"online" and statuses[-1] == b"offline"


async def test_killed_daemon_flips_the_retained_status_to_offline(
        database: str, tmp_path: Path) -> None:
    prefix = f"test-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "DATABASE_URL": database, "MQTT_URL": f"mqtt://127.0.0.1:1883/{prefix}",
           "EMAIL_OUTBOX": str(tmp_path), "LOG_LEVEL": "info"}
    proc = subprocess.Popen([sys.executable, "-m", "listener", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        async with aiomqtt.Client("127.0.0.1", 1883) as sub:
            await sub.subscribe(f"{prefix}/listener/status", qos=1)
            seen: list[bytes] = []

            async def collect() -> None:
                async for message in sub.messages:
                    seen.append(bytes(message.payload))

            collector = asyncio.create_task(collect())
            await eventually(lambda: b"online" in seen, timeout=30)
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
            # Mosquitto sends the will after the keepalive runs out (1.5 x keepalive).
            await eventually(lambda: seen[-1:] == [b"offline"], timeout=90)
            collector.cancel()
            await sub.publish(f"{prefix}/listener/status", b"", qos=1, retain=True)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
