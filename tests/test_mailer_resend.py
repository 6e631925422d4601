"""Mailer + ResendSender, through the real `resend` SDK, against a local Resend stand-in."""
from __future__ import annotations

import asyncio
import dataclasses
import time

import pytest
import resend

from listener.adapters.email_resend import ResendSender, parse_retry_after
from listener.effects import OutgoingEmail
from listener.mailer import Mailer
from listener.metrics import REGISTRY

try:
    from tests.servers.resend_server import ResendServer
except ImportError:  # run as `pytest` without the project root on sys.path
    from servers.resend_server import ResendServer  # type: ignore[no-redef]

KEY = "re_test_0123456789abcdef"
RATE = 20.0  # the server's limit and the mailer's rate (Resend's default is 2/s)


def metric(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


def make_email(n: int = 0, **kw: str) -> OutgoingEmail:
    fields = dict(
        to=f"mechanic{n}@example.com", sender="The Auto Doctor <noreply@example.com>",
        subject=f"Session 1a2b3c{n:02d}: a customer is waiting", html=f"<p>Hello #{n} &amp; co</p>",
        text=f"Hello #{n} & co", idempotency_key=f"mechanic_nudge/sess-{n}/2026-03-02T10:03:00Z/mechanic",
        rule="mechanic_nudge", table="sessions", row_id=f"sess-{n}", role="mechanic")
    fields.update(kw)
    return OutgoingEmail(**fields)


@pytest.fixture
def server():
    srv = ResendServer(api_key=KEY, rate_limit=int(RATE)).start()
    saved = resend.api_url, resend.api_key
    yield srv
    srv.stop()
    resend.api_url, resend.api_key = saved


@pytest.fixture
async def sender(server):
    s = ResendSender(KEY, server.url, timeout=5.0)
    yield s
    await s.aclose()


def fast_mailer(sender, **kw) -> Mailer:
    opts = dict(rate_per_second=RATE, max_attempts=5, base_delay=0.02, max_delay=0.2)
    opts.update(kw)
    return Mailer(sender, **opts)


async def test_delivered_email_has_fields_and_idempotency_key(server, sender):
    email = make_email(1)
    result = await fast_mailer(sender).deliver(email)

    assert result.ok and result.attempts == 1 and result.error is None
    [sent] = server.delivered
    assert result.provider_id == sent.id
    assert sent.sender == email.sender
    assert sent.to == [email.to]
    assert sent.subject == email.subject
    assert sent.html == email.html and sent.text == email.text
    assert sent.idempotency_key == email.idempotency_key
    assert {t["name"]: t["value"] for t in sent.tags} == {
        "rule": "mechanic_nudge", "session_id": "sess-1", "role": "mechanic"}
    [req] = server.requests
    assert req.headers["Idempotency-Key"] == email.idempotency_key
    assert req.headers["Authorization"] == f"Bearer {KEY}"
    assert req.status == 200


async def test_resending_the_same_email_returns_the_first_id_without_sending(server, sender):
    mailer = fast_mailer(sender)
    first = await mailer.deliver(make_email(2))
    again = await mailer.deliver(make_email(2))
    assert first.ok and again.ok
    assert again.provider_id == first.provider_id
    assert len(server.delivered) == 1


async def test_burst_of_100_is_rate_limited_and_delivered_exactly_once(server, sender):
    mailer = fast_mailer(sender, max_attempts=8)
    emails = [make_email(i) for i in range(100)]
    t0 = time.monotonic()
    results = await asyncio.gather(*(mailer.deliver(e) for e in emails))
    elapsed = time.monotonic() - t0

    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    delivered = server.delivered
    assert len(delivered) == 100
    assert sorted(d.idempotency_key for d in delivered) == sorted(e.idempotency_key for e in emails)
    assert {r.provider_id for r in results} == {d.id for d in delivered}
    refused = server.count(429)
    assert refused <= 5, f"server refused {refused} requests"
    print(f"\nburst: 100 emails in {elapsed:.2f}s = {100 / elapsed:.1f}/s "
          f"(limit {RATE:g}/s), {refused} refused with 429")


async def test_429_with_retry_after_then_success_delivers_once(server, sender):
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(seconds)

    server.fail_next(1, status=429, retry_after=1)
    result = await fast_mailer(sender, sleep=sleep).deliver(make_email(3))

    assert result.ok and result.attempts == 2
    assert len(server.delivered) == 1
    assert [r.status for r in server.requests] == [429, 200]
    assert waits and max(waits) >= 1.0  # retry-after honoured as the minimum wait


async def test_500_twice_then_success_delivers_once(server, sender):
    server.fail_next(2, status=500)
    result = await fast_mailer(sender).deliver(make_email(4))

    assert result.ok and result.attempts == 3
    assert [r.status for r in server.requests] == [500, 500, 200]
    assert len(server.delivered) == 1
    assert server.delivered[0].id == result.provider_id


async def test_validation_error_is_permanent_and_not_retried(server, sender):
    failures = metric("listener_email_failures_total")
    result = await fast_mailer(sender).deliver(make_email(5, subject=""))

    assert not result.ok and result.attempts == 1
    assert "422" in result.error and "missing_required_field" in result.error
    assert [r.status for r in server.requests] == [422]
    assert server.delivered == []
    assert metric("listener_email_failures_total") == failures + 1


async def test_bad_api_key_is_permanent_and_never_logged(server, capsys):
    secret = "re_wrong_secret_key_value"
    bad = ResendSender(secret, server.url)
    try:
        result = await fast_mailer(bad).deliver(make_email(6))
    finally:
        await bad.aclose()
    assert not result.ok and result.attempts == 1
    assert "403" in result.error and "invalid_api_key" in result.error
    assert secret not in result.error
    out = capsys.readouterr()
    assert secret not in out.out and secret not in out.err


async def test_same_key_other_payload_is_a_permanent_409(server, sender):
    mailer = fast_mailer(sender)
    assert (await mailer.deliver(make_email(7))).ok
    other = dataclasses.replace(make_email(7), subject="A different subject")
    result = await mailer.deliver(other)
    assert not result.ok and result.attempts == 1
    assert "409" in result.error and "invalid_idempotent_request" in result.error
    assert len(server.delivered) == 1


async def test_exhausting_attempts_returns_failure_and_counts_it(server, sender):
    failures = metric("listener_email_failures_total")
    attempts = metric("listener_email_attempts_total")
    server.fail_next(10, status=500)
    result = await fast_mailer(sender, max_attempts=3).deliver(make_email(8))

    assert not result.ok and result.attempts == 3
    assert "500" in result.error
    assert server.delivered == []
    assert len(server.requests) == 3
    assert metric("listener_email_failures_total") == failures + 1
    assert metric("listener_email_attempts_total") == attempts + 3


async def test_retry_after_a_hang_does_not_deliver_twice(server):
    # The first request hangs longer than the client waits; Resend still sends it.
    # The retry carries the same Idempotency-Key: while the first is in flight it
    # gets 409 concurrent_idempotent_requests (transient), then the first id.
    server.hang_next(1, seconds=1.0)
    sender = ResendSender(KEY, server.url, timeout=0.3)
    try:
        result = await fast_mailer(sender, max_attempts=12, base_delay=0.1,
                                   max_delay=0.4).deliver(make_email(9))
    finally:
        await sender.aclose()

    assert result.ok and result.attempts >= 2
    assert len(server.delivered) == 1
    assert result.provider_id == server.delivered[0].id
    keys = {r.idempotency_key for r in server.requests}
    assert keys == {make_email(9).idempotency_key}


async def test_network_failure_is_transient_and_reported(server):
    server.stop()  # nothing listens on that port any more
    sender = ResendSender(KEY, server.url, timeout=2.0)
    try:
        result = await fast_mailer(sender, max_attempts=2).deliver(make_email(10))
    finally:
        await sender.aclose()
    assert not result.ok and result.attempts == 2


def test_parse_retry_after():
    assert parse_retry_after({"Retry-After": "2"}) == 2.0
    assert parse_retry_after({"retry-after": "0.5"}) == 0.5
    assert parse_retry_after({"ratelimit-reset": "1"}) == 1.0
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({}) is None and parse_retry_after(None) is None


# -- Mailer policy, with a scripted sender (no HTTP) -------------------------------------

class ScriptedSender:
    def __init__(self, *outcomes: Exception | str) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def send(self, email: OutgoingEmail) -> str:
        self.calls += 1
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


class RecordingSleep:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


async def test_backoff_grows_with_jitter_and_is_capped():
    from listener.effects import EmailError
    sleep = RecordingSleep()
    sender = ScriptedSender(EmailError("boom", transient=True, status=503))
    result = await Mailer(sender, rate_per_second=1000, max_attempts=6, base_delay=1.0,
                          max_delay=4.0, sleep=sleep).deliver(make_email(20))
    assert not result.ok and result.attempts == 6 and sender.calls == 6
    assert len(sleep.waits) == 5
    for wait, ceiling in zip(sleep.waits, [1, 2, 4, 4, 4]):
        assert ceiling / 2 <= wait <= ceiling


async def test_retry_after_beyond_the_cap_is_not_waited_for():
    from listener.effects import EmailError
    sleep = RecordingSleep()
    sender = ScriptedSender(EmailError("quota", transient=True, status=429, retry_after=3600))
    result = await Mailer(sender, rate_per_second=1000, max_retry_after=60,
                          sleep=sleep).deliver(make_email(21))
    assert not result.ok and result.attempts == 1
    assert all(w <= 60 for w in sleep.waits)


async def test_a_sender_bug_is_reported_not_retried_not_raised():
    sender = ScriptedSender(KeyError("oops"))
    result = await Mailer(sender, rate_per_second=1000).deliver(make_email(22))
    assert not result.ok and result.attempts == 1 and "KeyError" in result.error


async def test_cancellation_propagates():
    class Hanging:
        async def send(self, email: OutgoingEmail) -> str:
            await asyncio.sleep(3600)
            return "never"

    task = asyncio.create_task(Mailer(Hanging(), rate_per_second=1000).deliver(make_email(23)))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
