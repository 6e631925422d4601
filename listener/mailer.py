"""Rate-limited, retrying email delivery on top of any EmailSender.

- One shared rate limit for every send (attempts and retries alike): an
  `aiolimiter.AsyncLimiter` of capacity 1 refilled at `rate_per_second`, so
  sends are spaced at least 1/rate apart and a burst of due actions never
  exceeds the provider's limit (Resend: 2 requests per second per team).
- A 429 with `retry-after` pauses *all* sends until then (the team's budget is
  exhausted, not just this email's), and is the minimum wait of its own retry.
- Transient errors (429, 5xx, timeouts, network) are retried with exponential
  backoff and jitter (tenacity), at most `max_attempts` attempts in all.
  Permanent errors are not retried.
- `deliver` never raises for a send failure: it returns `Delivery(ok=False)`.
  Cancellation (shutdown) propagates.
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable

import structlog
from aiolimiter import AsyncLimiter
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt)

from listener.effects import Delivery, EmailError, EmailSender, OutgoingEmail
from listener.metrics import EMAIL_ATTEMPTS, EMAIL_FAILURES

log = structlog.get_logger("listener.mailer")

Sleep = Callable[[float], Awaitable[None]]


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, EmailError) and exc.transient


class Mailer:
    def __init__(self, sender: EmailSender, rate_per_second: float = 2.0, max_attempts: int = 5,
                 base_delay: float = 0.5, max_delay: float = 30.0, *,
                 max_retry_after: float = 120.0, sleep: Sleep = asyncio.sleep) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.sender = sender
        self.rate_per_second = rate_per_second
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        # A retry-after longer than this (a quota, not a rate) is not waited for.
        self.max_retry_after = max_retry_after
        self._sleep = sleep
        # Capacity 1: no burst, one send every 1/rate seconds at most.
        self._limiter = AsyncLimiter(1, 1.0 / rate_per_second)
        self._paused_until = 0.0  # loop time; set by a 429's retry-after
        self._pause_gen = 0

    # -- public -------------------------------------------------------------------------

    async def deliver(self, email: OutgoingEmail) -> Delivery:
        attempts = 0
        ctx = {"rule": email.rule, "session_id": email.session_id, "role": email.role,
               "idempotency_key": email.idempotency_key}

        async def attempt() -> str:
            nonlocal attempts
            # Wait out a shared pause (a 429 told us to), then take a slot; if a
            # new pause began while we queued for the slot, wait and queue again.
            seen = -1
            while True:
                if self._pause_gen != seen and self._paused():
                    seen = self._pause_gen
                    await self._sleep(self._paused_until - asyncio.get_running_loop().time())
                await self._limiter.acquire()
                if self._pause_gen == seen or not self._paused():
                    break
            attempts += 1
            EMAIL_ATTEMPTS.inc()
            try:
                return await self.sender.send(email)
            except EmailError as exc:
                if exc.status == 429 and exc.retry_after:
                    self._pause(exc.retry_after)
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a sender bug: do not retry, do not crash the caller
                raise EmailError(f"{type(exc).__name__}: {exc}", transient=False) from exc

        retrying = AsyncRetrying(
            sleep=self._sleep,
            stop=stop_after_attempt(self.max_attempts) | self._retry_after_too_long,
            wait=self._wait,
            retry=retry_if_exception(_is_transient),
            before_sleep=lambda rs: self._log_retry(rs, ctx),
            reraise=True,
        )
        try:
            provider_id = await retrying(attempt)
        except EmailError as exc:
            EMAIL_FAILURES.inc()
            log.warning("email_failed", **ctx, attempts=attempts, error=str(exc),
                        status=exc.status, transient=exc.transient)
            return Delivery(ok=False, attempts=attempts, error=str(exc))
        if attempts > 1:
            log.info("email_sent_after_retry", **ctx, attempts=attempts, provider_id=provider_id)
        return Delivery(ok=True, attempts=attempts, provider_id=provider_id)

    # -- internals ----------------------------------------------------------------------

    def _backoff(self, attempt_number: int) -> float:
        """Exponential backoff with "equal jitter": half fixed, half random."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempt_number - 1)))
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _wait(self, rs: RetryCallState) -> float:
        exc = rs.outcome.exception() if rs.outcome else None
        delay = self._backoff(rs.attempt_number)
        if isinstance(exc, EmailError) and exc.retry_after:
            delay = max(delay, exc.retry_after)
        return delay

    def _retry_after_too_long(self, rs: RetryCallState) -> bool:
        exc = rs.outcome.exception() if rs.outcome else None
        return bool(isinstance(exc, EmailError) and exc.retry_after
                     and exc.retry_after > self.max_retry_after)

    def _pause(self, seconds: float) -> None:
        seconds = min(seconds, self.max_retry_after)
        loop = asyncio.get_running_loop()
        until = loop.time() + seconds
        if until > self._paused_until:
            self._paused_until = until
            self._pause_gen += 1
            log.info("email_rate_limited", pause_s=round(seconds, 3))

    def _paused(self) -> bool:
        return self._paused_until > asyncio.get_running_loop().time()

    def _log_retry(self, rs: RetryCallState, ctx: dict[str, str]) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        wait = rs.next_action.sleep if rs.next_action else None
        log.info("email_retry", **ctx, attempt=rs.attempt_number, max_attempts=self.max_attempts,
                 wait_s=round(wait, 3) if wait is not None else None,
                 error=str(exc), status=getattr(exc, "status", None),
                 retry_after=getattr(exc, "retry_after", None))
