"""Signed webhooks: telling the app that an action fired, so it does its part
(payouts, refunds, credits).

One `POST` of JSON per action to `WEBHOOK_URL`, with two headers:

- `Idempotency-Key: <id>`: the action's ledger key, the same on every attempt
  and after a restart, so the app can do its work at most once per action.
  It is the body's `id` itself for printable-ASCII keys (every uuid or
  integer key), percent-encoded otherwise; the body's `id` is the signed one.
- `Listener-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<body>">`
  keyed with `WEBHOOK_SECRET`, over the exact bytes of the body. `t` is taken
  at each attempt, so a retry after a long backoff is not refused as stale.

Delivery: 2xx is done. 408, 429, 5xx, timeouts and network errors are
retried with exponential backoff and jitter, waiting at least what a
`retry-after` header asks (seconds or an HTTP date); a `retry-after` beyond
`max_retry_after` ends the retries. Any other status (3xx, other 4xx) fails at
once: the request itself is wrong and sending it again cannot help. After the
last attempt the result is `failed` with the reason; `send` never raises for a
delivery failure.

A slow or failing endpoint never holds up anything else: each attempt has its
own timeout; at most `concurrency` requests are in flight (a semaphore held
during the request only, never during a backoff wait); everything is awaited
on one pooled aiohttp session, nothing blocks the loop.

Wiring it into the executor (once per claimed action whose rule has a
`webhook`, after the status change, and before the claim is completed)::

    sender = WebhookSender.from_settings(settings)   # None without WEBHOOK_URL
    ...
    event = WebhookEvent.of_action(key, rule.webhook, fired_at=fired_at,
                                   late=outcome is Outcome.LATE,
                                   status=status, reason=reason,
                                   keys=key_columns(table, row))
    result = await sender.send(event)
    detail["webhook"] = result.as_detail()
    outcome = outcome if result.ok else Outcome.FAILED
    ...
    await sender.aclose()                            # at shutdown

`send` takes as long as its retries do (seconds to minutes), so run it where
emails run, in the background, never on the path of other timers. A send
cancelled at shutdown leaves the claim unfinished: it is resumed at start-up
and sent again under the same key.

`fired_at` should be the claim's own (the ledger's `fired_at` when resuming a
claim after a crash) so a resent body is the same as the first. `send` on a
closed sender raises RuntimeError: the claim then stays unfinished and is
resumed, instead of being recorded as failed.

The app verifies requests as `verify_signature` does: HMAC-SHA256 over
"<t>.<raw body>", compared in constant time, `t` within five minutes.
"""
from __future__ import annotations

import asyncio
import email.utils
import enum
import hashlib
import hmac
import string
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import structlog
from prometheus_client import Counter
from pydantic import SecretStr

from listener import logs
from listener.instants import Instant, format_instant
from listener.metrics import REGISTRY
from listener.retry import retrying
from listener.rules.model import Table
from listener.store import ActionKey

log = structlog.get_logger("listener.webhook")

SIGNATURE_HEADER = "Listener-Signature"
IDEMPOTENCY_HEADER = "Idempotency-Key"
SIGNATURE_VERSION = "v1"
# How old (or how far ahead) a signature's t may be before the app refuses it.
DEFAULT_TOLERANCE_S = 300
# Header values must be printable ASCII: any other character of a key (a text
# primary key may hold anything) is percent-encoded, and so is "%" itself.
_HEADER_SAFE = "".join(c for c in string.printable[:95] if c != "%")
# Enough of an error response to say why, never a whole page in the ledger.
_REASON_BODY_CHARS = 200

WEBHOOK_ATTEMPTS = Counter("listener_webhook_attempts_total", "Webhook requests sent",
                           registry=REGISTRY)
WEBHOOK_FAILURES = Counter("listener_webhook_failures_total",
                           "Webhooks given up on after the last attempt, or refused",
                           registry=REGISTRY)

Sleep = Callable[[float], Awaitable[None]]


class WebhookOutcome(str, enum.Enum):
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StatusChange:
    status: str
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class WebhookEvent:
    """What the app is told about one action; `as_payload()` is the JSON body."""

    id: str  # the action's idempotency key
    event: str  # the rule's webhook name, e.g. "session.ended"
    rule: str
    table: str
    row_id: str
    due_at: str  # RFC 3339 UTC
    fired_at: str
    late: bool  # fired past MAX_NOTIFY_LATENESS: status changed, no email sent
    lateness_ms: int = 0
    status_change: StatusChange | None = None  # the status this action set, if it set one
    keys: Mapping[str, Any] = field(default_factory=dict)  # the row's key columns

    @classmethod
    def of_action(cls, key: ActionKey, event: str, *, fired_at: Instant, late: bool,
                  status: str | None = None, reason: str | None = None,
                  keys: Mapping[str, Any] | None = None) -> WebhookEvent:
        return cls(id=key.idempotency_key, event=event, rule=key.rule, table=key.table,
                   row_id=key.row_key, due_at=format_instant(key.due_at),
                   fired_at=format_instant(fired_at), late=late,
                   lateness_ms=max(0, (fired_at - key.due_at) // 1000),
                   status_change=StatusChange(status, reason) if status else None,
                   keys=dict(keys or {}))

    def as_payload(self) -> dict[str, Any]:
        change = self.status_change
        return {"id": self.id, "event": self.event, "rule": self.rule, "table": self.table,
                "row_id": self.row_id, "due_at": self.due_at, "fired_at": self.fired_at,
                "late": self.late, "lateness_ms": self.lateness_ms,
                "status_change": (None if change is None
                                  else {"status": change.status, "reason": change.reason}),
                "keys": dict(self.keys)}

    def body(self) -> bytes:
        return orjson.dumps(self.as_payload(), default=str)


def key_columns(table: Table, row: Mapping[str, Any]) -> dict[str, Any]:
    """The columns that say which row and whose it is: the primary key and every
    recipient column (customer, mechanic), what a payout or refund needs."""
    out: dict[str, Any] = {table.key: row.get(table.key)}
    for recipient in table.recipients.values():
        for source in recipient.sources:
            if source.column is not None:
                out[source.column] = row.get(source.column)
    return out


@dataclass(frozen=True, slots=True)
class WebhookResult:
    outcome: WebhookOutcome
    attempts: int
    status_code: int | None = None  # of the last response, None when none came
    reason: str | None = None  # why it failed

    @property
    def ok(self) -> bool:
        return self.outcome is WebhookOutcome.DELIVERED

    def as_detail(self) -> dict[str, Any]:
        """For the ledger row's detail."""
        out: dict[str, Any] = {"outcome": self.outcome.value, "attempts": self.attempts,
                               "status_code": self.status_code}
        if self.reason is not None:
            out["reason"] = self.reason
        return out


# -- signatures -------------------------------------------------------------------------


def _secret_bytes(secret: str | bytes | SecretStr) -> bytes:
    if isinstance(secret, SecretStr):
        secret = secret.get_secret_value()
    return secret.encode() if isinstance(secret, str) else bytes(secret)


def sign(secret: str | bytes | SecretStr, body: bytes, t: int) -> str:
    """The `Listener-Signature` header value for `body` signed at unix second `t`."""
    mac = hmac.new(_secret_bytes(secret), f"{t}.".encode() + body, hashlib.sha256)
    return f"t={t},{SIGNATURE_VERSION}={mac.hexdigest()}"


def verify_signature(secret: str | bytes | SecretStr, header: str | None, body: bytes | str, *,
                     tolerance_s: float = DEFAULT_TOLERANCE_S, now: float | None = None) -> bool:
    """True when `header` is a valid signature of `body` made within `tolerance_s`
    of `now` (default: the wall clock). Never raises: malformed is False.

    Several `v1=` entries may be given (a secret being rotated): one match is
    enough. Digests are compared in constant time.
    """
    if not header:
        return False
    if isinstance(body, str):
        body = body.encode()
    t: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            continue
        if name == "t":
            try:
                t = int(value)
            except ValueError:
                return False
        elif name == SIGNATURE_VERSION:
            candidates.append(value)
    if t is None or not candidates:
        return False
    if abs((time.time() if now is None else now) - t) > tolerance_s:
        return False
    expected = sign(secret, body, t).rsplit("=", 1)[1].encode()
    matched = False
    for candidate in candidates:
        # Every candidate is compared, so timing says nothing about which matched.
        matched |= hmac.compare_digest(expected, candidate.encode("ascii", "replace"))
    return matched


def idempotency_header(key: str) -> str:
    """The `Idempotency-Key` value: the key itself when it is printable ASCII
    without "%" (uuid and integer keys always are), else percent-encoded."""
    return urllib.parse.quote(key, safe=_HEADER_SAFE)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a `retry-after` value: delta-seconds or an HTTP date."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


# -- sending ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One request's outcome, as the retry policy sees it."""

    delivered: bool
    transient: bool
    status_code: int | None
    reason: str | None
    retry_after: float | None = None


class _WorthRetrying(Exception):
    """A transient answer, raised so the shared retry policy retries it."""

    def __init__(self, attempt: _Attempt) -> None:
        super().__init__(attempt.reason or "transient")
        self.attempt = attempt
        self.retry_after = attempt.retry_after  # the policy waits at least this


def _is_transient_status(status: int) -> bool:
    return status in (408, 429) or status >= 500


class WebhookSender:
    """POSTs signed events to one URL. Use one per process; `aclose()` at the end."""

    def __init__(self, url: str, secret: str | SecretStr, *, max_attempts: int = 6,
                 timeout: float = 10.0, concurrency: int = 8, base_delay: float = 0.5,
                 max_delay: float = 60.0, max_retry_after: float = 300.0,
                 sleep: Sleep = asyncio.sleep, wall_clock: Callable[[], float] = time.time
                 ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ValueError("the webhook URL must start with http:// or https://")
        secret = secret if isinstance(secret, SecretStr) else SecretStr(secret)
        if not secret.get_secret_value():
            raise ValueError("the webhook secret must not be empty")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if timeout <= 0 or concurrency < 1:
            raise ValueError("timeout must be positive and concurrency at least 1")
        logs.register_secret(secret.get_secret_value())
        self.url = url
        self._secret = secret
        self.max_attempts = max_attempts
        self.timeout = timeout
        self.concurrency = concurrency
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.max_retry_after = max_retry_after
        self._sleep = sleep
        self._wall_clock = wall_clock
        self._slots = asyncio.Semaphore(concurrency)
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Any) -> WebhookSender | None:
        if not settings.webhook_url or settings.webhook_secret is None:
            return None
        return cls(settings.webhook_url, settings.webhook_secret)

    def __repr__(self) -> str:
        return (f"WebhookSender(url={self.url!r}, secret='***', max_attempts={self.max_attempts},"
                f" timeout={self.timeout}, concurrency={self.concurrency})")

    async def __aenter__(self) -> WebhookSender:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        self._closed = True
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- public -------------------------------------------------------------------------

    async def send(self, event: WebhookEvent) -> WebhookResult:
        """Deliver one event, retrying as the policy says. Never raises for a
        delivery failure; RuntimeError once closed; cancellation propagates."""
        if self._closed:
            raise RuntimeError("the webhook sender is closed")
        body = event.body()  # the same bytes on every attempt
        ctx = {"webhook": event.event, "rule": event.rule, "table": event.table,
               "row_id": event.row_id, "idempotency_key": event.id}
        attempts = 0

        async def attempt() -> _Attempt:
            nonlocal attempts
            attempts += 1
            WEBHOOK_ATTEMPTS.inc()
            answer = await self._post(event.id, body)
            if answer.transient:
                raise _WorthRetrying(answer)
            return answer

        try:
            last = await retrying(
                attempt, attempts=self.max_attempts,
                retry_on=lambda exc: isinstance(exc, _WorthRetrying),
                initial=self.base_delay, maximum=self.max_delay,
                max_retry_after=self.max_retry_after, event="webhook_retry", context=ctx,
                sleep=self._sleep)
        except _WorthRetrying as exc:
            last = exc.attempt  # the last attempt, once the policy gave up
        if last.delivered:
            if attempts > 1:
                log.info("webhook_sent_after_retry", **ctx, attempts=attempts,
                         status_code=last.status_code)
            return WebhookResult(WebhookOutcome.DELIVERED, attempts, last.status_code)
        reason = last.reason or "failed"
        if last.transient:
            if last.retry_after is not None and last.retry_after > self.max_retry_after:
                reason += (f" (retry-after {last.retry_after:.0f}s is beyond the"
                           f" {self.max_retry_after:.0f}s limit)")
            else:
                reason += f" (gave up after {attempts} attempts)"
        WEBHOOK_FAILURES.inc()
        log.warning("webhook_failed", **ctx, attempts=attempts, status_code=last.status_code,
                    reason=reason)
        return WebhookResult(WebhookOutcome.FAILED, attempts, last.status_code, reason)

    # -- internals ----------------------------------------------------------------------

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # Created on first use, inside the running loop that owns it.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self.concurrency),
                headers={"Content-Type": "application/json",
                         "User-Agent": "theautodoctor-listener"})
        return self._session

    async def _post(self, idempotency_key: str, body: bytes) -> _Attempt:
        async with self._slots:
            headers = {IDEMPOTENCY_HEADER: idempotency_header(idempotency_key),
                       SIGNATURE_HEADER: sign(self._secret, body, int(self._wall_clock()))}
            try:
                # One deadline for connecting, sending and reading the answer; a
                # wait for a free slot is not counted (the semaphore is outside).
                async with asyncio.timeout(self.timeout):
                    async with self._client().post(self.url, data=body, headers=headers,
                                                   allow_redirects=False) as response:
                        status = response.status
                        text = ""
                        if not 200 <= status < 300:
                            raw = await response.content.read(_REASON_BODY_CHARS * 4)
                            text = raw.decode("utf-8", "replace")[:_REASON_BODY_CHARS].strip()
                        retry_after = parse_retry_after(response.headers.get("retry-after"),
                                                        self._wall_clock())
            except TimeoutError:
                return _Attempt(False, True, None, f"timed out after {self.timeout:g}s")
            except aiohttp.InvalidURL as exc:
                return _Attempt(False, False, None, f"invalid URL: {exc}")
            except aiohttp.ClientSSLError as exc:
                # A certificate problem is configuration: retrying cannot fix it.
                return _Attempt(False, False, None, f"TLS error: {type(exc).__name__}")
            except aiohttp.ClientError as exc:
                return _Attempt(False, True, None, f"network error: {type(exc).__name__}: {exc}")
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a bug here must not crash the caller
                log.exception("webhook_error", idempotency_key=idempotency_key)
                return _Attempt(False, False, None, f"unexpected error: {type(exc).__name__}")
        if 200 <= status < 300:
            return _Attempt(True, False, status, None)
        reason = f"HTTP {status}" + (f": {text}" if text else "")
        if 300 <= status < 400:
            reason += " (redirects are not followed: set WEBHOOK_URL to the final URL)"
        return _Attempt(False, _is_transient_status(status), status, reason, retry_after)
