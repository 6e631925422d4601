"""WebhookSender over real HTTP against a local receiver that checks signatures."""
from __future__ import annotations

import asyncio
import email.utils
import io
import json
import time

import pytest
import structlog
from pydantic import SecretStr, ValidationError

from listener import logs
from listener.instants import parse_instant
from listener.metrics import REGISTRY
from listener.rules.model import Recipient, RecipientKind, RecipientSource, Table
from listener.settings import Settings
from listener.store import ActionKey
from listener.webhooks import (
    WebhookEvent, WebhookOutcome, WebhookSender, key_columns, parse_retry_after, sign,
    verify_signature)

try:
    from tests.servers.webhook_receiver import WebhookReceiver
except ImportError:  # run as `pytest` without the project root on sys.path
    from servers.webhook_receiver import WebhookReceiver  # type: ignore[no-redef]

SECRET = "whsec_test_4f1c2b9a7d3e8f60"
DUE = parse_instant("2026-03-02T10:00:00Z")
SESSIONS = Table("sessions", recipients={
    "customer": Recipient("customer", (RecipientSource(RecipientKind.USER, "customer_id"),)),
    "mechanic": Recipient("mechanic", (RecipientSource(RecipientKind.MECHANIC, "mechanic_id"),
                                       RecipientSource(RecipientKind.USER, "mechanic_user_id")))})


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def make_event(n: int = 0, *, late: bool = False, event: str = "session.ended") -> WebhookEvent:
    key = ActionKey("plan_time_expiry", "sessions", f"5e55-{n:04d}", DUE)
    row = {"id": key.row_key, "status": "completed", "customer_id": "cust-1",
           "mechanic_id": "mech-7", "mechanic_user_id": None, "metadata": {"big": "x" * 50}}
    return WebhookEvent.of_action(key, event, fired_at=DUE + 1_250_000, late=late,
                                  status="completed", reason="plan_time_up",
                                  keys=key_columns(SESSIONS, row))


@pytest.fixture
def receiver():
    with WebhookReceiver(SECRET) as rx:
        yield rx


def fast_sender(url: str, **kw) -> WebhookSender:
    opts = dict(max_attempts=4, timeout=5.0, concurrency=8, base_delay=0.02, max_delay=0.1)
    opts.update(kw)
    return WebhookSender(url, SECRET, **opts)


@pytest.fixture
async def sender(receiver):
    s = fast_sender(receiver.url)
    yield s
    await s.aclose()


# -- contract ---------------------------------------------------------------------------


async def test_signed_post_with_the_idempotency_key_and_the_payload(receiver, sender):
    event = make_event(1)
    result = await sender.send(event)

    assert result.ok and result.outcome is WebhookOutcome.DELIVERED
    assert (result.attempts, result.status_code, result.reason) == (1, 200, None)
    [request] = receiver.requests
    assert request.verified
    assert request.headers["Idempotency-Key"] == event.id
    assert event.id == "listener/plan_time_expiry/5e55-0001/2026-03-02T10:00:00Z"
    assert request.headers["Content-Type"] == "application/json"
    assert request.payload == {
        "id": event.id, "event": "session.ended", "rule": "plan_time_expiry",
        "table": "sessions", "row_id": "5e55-0001", "due_at": "2026-03-02T10:00:00Z",
        "fired_at": "2026-03-02T10:00:01.250000Z", "late": False, "lateness_ms": 1250,
        "status_change": {"status": "completed", "reason": "plan_time_up"},
        "keys": {"id": "5e55-0001", "customer_id": "cust-1", "mechanic_id": "mech-7",
                 "mechanic_user_id": None}}
    # The helper the app's route mirrors accepts exactly what was sent.
    header = request.headers["Listener-Signature"]
    assert verify_signature(SECRET, header, request.body)
    assert result.as_detail() == {"outcome": "delivered", "attempts": 1, "status_code": 200}


async def test_a_receiver_with_another_secret_refuses_it_and_that_is_not_retried():
    with WebhookReceiver("some-other-secret-entirely") as rx:
        async with fast_sender(rx.url) as s:
            result = await s.send(make_event())
    assert not result.ok and result.status_code == 401
    assert [r.verified for r in rx.requests] == [False]


async def test_a_key_that_is_not_plain_ascii_is_percent_encoded_in_the_header(receiver, sender):
    key = ActionKey("invite_expiry", "workshop_invites", "café\r\nX-Evil: 1", DUE)
    event = WebhookEvent.of_action(key, "workshop_invite.expired", fired_at=DUE, late=False)
    result = await sender.send(event)
    assert result.ok
    [request] = receiver.requests
    assert request.payload["id"] == event.id  # the signed body carries it as is
    assert request.headers["Idempotency-Key"] == (
        "listener/invite_expiry/workshop_invites/caf%C3%A9%0D%0AX-Evil: 1/2026-03-02T10:00:00Z")
    assert "X-Evil" not in request.headers
    assert request.payload["status_change"] is None and request.payload["keys"] == {}


def test_verify_signature_refuses_tampering_staleness_and_garbage():
    body = b'{"id":"k","event":"session.ended"}'
    now = 1_772_445_600
    header = sign(SECRET, body, now)
    assert header.startswith(f"t={now},v1=") and len(header.split("v1=")[1]) == 64
    assert verify_signature(SECRET, header, body, now=now + 299)
    assert verify_signature(SecretStr(SECRET), header, body.decode(), now=now)
    assert not verify_signature(SECRET, header, body + b" ", now=now)  # another body
    assert not verify_signature("wrong-secret-0000", header, body, now=now)
    assert not verify_signature(SECRET, header, body, now=now + 301)  # stale
    assert not verify_signature(SECRET, header, body, now=now - 301)  # from the future
    assert verify_signature(SECRET, header, body, now=now + 500, tolerance_s=600)
    # A re-signed t with the old digest does not pass: t is inside the MAC.
    digest = header.split("v1=")[1]
    assert not verify_signature(SECRET, f"t={now + 10},v1={digest}", body, now=now)
    # Several v1 entries (a secret being rotated): one match is enough.
    assert verify_signature(SECRET, f"t={now},v1={'0' * 64},v1={digest}", body, now=now)
    assert verify_signature(SECRET, f"t={now},v1={digest},v1={'0' * 64}", body, now=now)
    for garbage in (None, "", "v1=" + digest, f"t={now}", f"t=abc,v1={digest}",
                    f"t={now},v1=zz", "nonsense", f"t={now},v0={digest}"):
        assert not verify_signature(SECRET, garbage, body, now=now), garbage


def test_retry_after_is_read_as_seconds_or_an_http_date():
    now = 1_772_445_600.0
    assert parse_retry_after("2", now) == 2.0
    assert parse_retry_after(" 0.5 ", now) == 0.5
    assert parse_retry_after(email.utils.formatdate(now + 30, usegmt=True), now) == 30.0
    assert parse_retry_after(email.utils.formatdate(now - 30, usegmt=True), now) == 0.0
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after(None, now) is None


# -- retries ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 408, 429])
async def test_transient_statuses_are_retried_until_it_goes_through(receiver, sender, status):
    receiver.respond_next(2, status)
    event = make_event(2)
    result = await sender.send(event)

    assert result.ok and result.attempts == 3 and result.status_code == 200
    assert [r.status for r in receiver.requests] == [status, status, 200]
    # Every attempt carries the same key and body, each freshly signed.
    assert {r.idempotency_key for r in receiver.requests} == {event.id}
    assert len({r.body for r in receiver.requests}) == 1
    assert all(r.verified for r in receiver.requests)


async def test_retry_after_is_waited_for_in_seconds(receiver, sender):
    receiver.respond_next(1, 429, retry_after=1)
    started = time.monotonic()
    result = await sender.send(make_event(3))
    assert result.ok and result.attempts == 2
    first, second = receiver.requests
    # Backoff alone is at most 0.1 s here: the gap is the server's retry-after.
    assert second.at - first.answered_at >= 0.9
    assert time.monotonic() - started < 10


async def test_retry_after_as_an_http_date_is_waited_for(receiver, sender):
    # An HTTP date has whole seconds: 2 s ahead is at least 1 s of waiting.
    receiver.respond_next(1, 503, retry_after=email.utils.formatdate(time.time() + 2,
                                                                     usegmt=True))
    result = await sender.send(make_event(4))
    assert result.ok and result.attempts == 2
    first, second = receiver.requests
    assert second.at - first.answered_at >= 0.9


async def test_a_retry_after_beyond_the_limit_is_not_waited_for(receiver):
    receiver.respond_next(1, 429, retry_after=3600)
    async with fast_sender(receiver.url, max_retry_after=5) as s:
        started = time.monotonic()
        result = await asyncio.wait_for(s.send(make_event(5)), timeout=10)
    assert not result.ok and result.attempts == 1 and result.status_code == 429
    assert "retry-after 3600s" in result.reason
    assert time.monotonic() - started < 3


async def test_a_dropped_connection_is_retried(receiver, sender):
    receiver.drop_next(1)
    result = await sender.send(make_event(6))
    assert result.ok and result.attempts == 2
    assert [r.fault for r in receiver.requests] == ["drop", ""]
    assert receiver.requests[0].status is None


@pytest.mark.parametrize("status", [400, 404, 422, 302])
async def test_a_client_error_fails_at_once_with_one_request(receiver, sender, status):
    failures = metric("listener_webhook_failures_total")
    receiver.respond_next(1, status)
    result = await sender.send(make_event(7))
    assert not result.ok and result.outcome is WebhookOutcome.FAILED
    assert (result.attempts, result.status_code) == (1, status)
    assert result.reason.startswith(f"HTTP {status}")
    assert f"injected {status}" in result.reason  # what the app said, for the ledger
    assert len(receiver.requests) == 1
    assert metric("listener_webhook_failures_total") == failures + 1
    assert result.as_detail()["outcome"] == "failed"


async def test_exhausted_retries_fail_with_the_reason(receiver, sender):
    receiver.respond_next(10, 502)
    result = await sender.send(make_event(8))
    assert not result.ok and result.attempts == 4 and result.status_code == 502
    assert "HTTP 502" in result.reason and "after 4 attempts" in result.reason
    assert len(receiver.requests) == 4


async def test_an_endpoint_that_never_answers_in_time_fails_as_a_timeout(receiver):
    receiver.delay_next(2, 3.0)
    async with fast_sender(receiver.url, max_attempts=2, timeout=0.3) as s:
        started = time.monotonic()
        result = await s.send(make_event(9))
    assert not result.ok and result.attempts == 2 and result.status_code is None
    assert "timed out after 0.3s" in result.reason
    assert time.monotonic() - started < 2.5  # not the 6 s the endpoint would take


async def test_nothing_listening_is_a_network_error_retried_then_failed():
    async with fast_sender("http://127.0.0.1:9/api/listener/webhook", max_attempts=3) as s:
        result = await s.send(make_event(10))
    assert not result.ok and result.attempts == 3 and result.status_code is None
    assert result.reason.startswith("network error")


# -- isolation --------------------------------------------------------------------------


async def test_a_slow_request_does_not_delay_a_concurrent_one(receiver, sender):
    slow, fast = make_event(11), make_event(12)
    receiver.delay_next(1, 2.0, key=slow.id)
    done: list[str] = []

    async def send(event: WebhookEvent) -> float:
        started = time.monotonic()
        result = await sender.send(event)
        assert result.ok
        done.append(event.id)
        return time.monotonic() - started

    slow_task = asyncio.create_task(send(slow))
    await asyncio.sleep(0.05)  # the slow one is in flight first
    fast_elapsed = await send(fast)
    assert done == [fast.id]
    assert fast_elapsed < 1.0
    assert await slow_task >= 1.9
    assert done == [fast.id, slow.id]


async def test_a_failing_endpoint_backing_off_does_not_hold_a_slot(receiver):
    # One slot: while the first event waits out its retry-after, the second goes.
    first, second = make_event(13), make_event(14)
    receiver.respond_next(1, 503, retry_after=1.5, key=first.id)
    async with fast_sender(receiver.url, concurrency=1) as s:
        first_task = asyncio.create_task(s.send(first))
        await asyncio.sleep(0.2)
        started = time.monotonic()
        assert (await s.send(second)).ok
        assert time.monotonic() - started < 1.0
        assert not first_task.done()
        assert (await first_task).ok


async def test_the_loop_keeps_running_while_a_send_waits(receiver, sender):
    receiver.delay_next(1, 1.0)
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    ticker = asyncio.create_task(tick())
    try:
        assert (await sender.send(make_event(15))).ok
    finally:
        ticker.cancel()
    assert ticks >= 30  # about 100 in a second; blocked, it would be 0 or 1


async def test_a_closed_sender_refuses_to_send(receiver):
    s = fast_sender(receiver.url)
    assert (await s.send(make_event(16))).ok
    await s.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await s.send(make_event(17))
    assert len(receiver.requests) == 1


# -- the secret -------------------------------------------------------------------------


async def test_the_secret_is_never_in_reprs_or_logs(receiver, capsys):
    stream = io.StringIO()
    logs.configure_logging("DEBUG", stream=stream, console=False)
    try:
        receiver.respond_next(1, 500)
        receiver.respond_next(1, 400)
        async with fast_sender(receiver.url) as s:
            assert SECRET not in repr(s) and SECRET not in str(s)
            await s.send(make_event(18))
        settings = Settings(webhook_url=receiver.url, webhook_secret=SECRET)
        assert SECRET not in repr(settings)
        # Anything that does print it by mistake is masked.
        structlog.get_logger("test").info("oops", value=f"secret={SECRET}")
    finally:
        logs.configure_logging("WARNING", stream=io.StringIO(), console=False)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert {"webhook_retry", "webhook_failed"} <= {line["event"] for line in lines}
    assert SECRET not in stream.getvalue()
    assert SECRET not in capsys.readouterr().err


def test_a_sender_refuses_an_empty_secret_or_a_bad_url():
    with pytest.raises(ValueError, match="secret"):
        WebhookSender("https://app.example.com/api/listener/webhook", "")
    with pytest.raises(ValueError, match="http"):
        WebhookSender("app.example.com/api/listener/webhook", SECRET)


# -- settings ---------------------------------------------------------------------------


def _settings_error(monkeypatch, **env: str) -> str:
    for name in ("WEBHOOK_URL", "WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as caught:
        Settings()
    [error] = caught.value.errors()
    return error["msg"]


def test_settings_want_the_url_and_the_secret_together(monkeypatch):
    message = _settings_error(monkeypatch, WEBHOOK_URL="https://app.example.com/hook")
    assert message == "WEBHOOK_URL and WEBHOOK_SECRET go together: WEBHOOK_SECRET is not set"
    message = _settings_error(monkeypatch, WEBHOOK_SECRET=SECRET)
    assert message == "WEBHOOK_URL and WEBHOOK_SECRET go together: WEBHOOK_URL is not set"
    assert "\n" not in message


def test_settings_refuse_a_short_secret_without_echoing_it(monkeypatch):
    for name in ("WEBHOOK_URL", "WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WEBHOOK_URL", "https://app.example.com/hook")
    monkeypatch.setenv("WEBHOOK_SECRET", "tiny-s3cret")
    with pytest.raises(ValidationError) as caught:
        Settings()
    assert "at least 16 characters" in str(caught.value)
    assert "tiny-s3cret" not in str(caught.value)


def test_settings_refuse_a_url_that_is_not_http(monkeypatch):
    message = _settings_error(monkeypatch, WEBHOOK_URL="app.example.com/hook",
                              WEBHOOK_SECRET=SECRET)
    assert "WEBHOOK_URL must start with http" in message


def test_settings_with_both_build_a_sender_and_without_none(monkeypatch):
    for name in ("WEBHOOK_URL", "WEBHOOK_SECRET"):
        monkeypatch.delenv(name, raising=False)
    assert WebhookSender.from_settings(Settings()) is None
    monkeypatch.setenv("WEBHOOK_URL", "https://app.example.com/api/listener/webhook")
    monkeypatch.setenv("WEBHOOK_SECRET", SECRET)
    settings = Settings()
    assert settings.webhook_secret.get_secret_value() == SECRET
    sender = WebhookSender.from_settings(settings)
    assert sender is not None and sender.url == settings.webhook_url
