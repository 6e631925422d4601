"""The one retry policy: exponential backoff with jitter, on tenacity.

- `retrying(fn, attempts=..., give_up_after=...)` calls `fn` until it succeeds,
  an error is not worth retrying (`retry_on`, by default `is_transient`), or
  the budget is spent; then the last error propagates unchanged.
- `Backoff` is the same policy for loops that never give up (reconnecting a
  source): `await backoff.sleep()` after each failure, `reset()` after a
  success.

Waits use "equal jitter": the n-th wait is between half and all of
min(maximum, initial * 2**(n-1)), so instances that failed together do not
retry together, and no wait is ever near zero. An error with a `retry_after`
(seconds; a 429 or 503 said how long) waits at least that long; one asking
for more than `max_retry_after` is not waited for at all (a quota, not a
rate: give up and let the caller record it).
"""
from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import structlog
from tenacity import (AsyncRetrying, RetryCallState, retry_if_exception, stop_after_attempt,
                      stop_before_delay, stop_never)
from tenacity.stop import stop_base
from tenacity.wait import wait_base

from listener.errors import is_transient

log = structlog.get_logger("listener.retry")

T = TypeVar("T")
Sleep = Callable[[float], Awaitable[None]]

__all__ = ["Backoff", "is_transient", "retry_after_of", "retrying", "wait_equal_jitter"]


def retry_after_of(exc: BaseException | None) -> float | None:
    """The wait the other side asked for, in seconds, if any."""
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return float(value)
    return None


class wait_equal_jitter(wait_base):  # noqa: N801 - tenacity's naming
    """Between half and all of min(maximum, initial * 2**(attempt-1)); at
    least the failed attempt's `retry_after`."""

    def __init__(self, initial: float, maximum: float) -> None:
        if initial <= 0 or maximum < initial:
            raise ValueError("need 0 < initial <= maximum")
        self.initial = initial
        self.maximum = maximum

    def ceiling(self, attempt_number: int) -> float:
        # 2**60 seconds is beyond any maximum: stop doubling before overflow.
        return min(self.maximum, self.initial * 2.0 ** min(attempt_number - 1, 60))

    def delay(self, attempt_number: int, after: BaseException | None = None) -> float:
        ceiling = self.ceiling(attempt_number)
        delay = ceiling / 2 + random.uniform(0, ceiling / 2)
        asked = retry_after_of(after)
        return max(delay, asked) if asked is not None else delay

    def __call__(self, retry_state: RetryCallState) -> float:
        outcome = retry_state.outcome
        return self.delay(retry_state.attempt_number,
                          outcome.exception() if outcome is not None and outcome.failed else None)


class _stop_when_retry_after_exceeds(stop_base):  # noqa: N801
    def __init__(self, limit: float) -> None:
        self.limit = limit

    def __call__(self, retry_state: RetryCallState) -> bool:
        outcome = retry_state.outcome
        asked = retry_after_of(outcome.exception() if outcome is not None and outcome.failed
                               else None)
        return asked is not None and asked > self.limit


async def retrying(fn: Callable[[], Awaitable[T]], *, attempts: int | None = None,
                   give_up_after: float | None = None,
                   retry_on: Callable[[BaseException], bool] = is_transient,
                   initial: float = 0.2, maximum: float = 15.0,
                   max_retry_after: float | None = None,
                   event: str = "retry", context: Mapping[str, Any] | None = None,
                   sleep: Sleep = asyncio.sleep) -> T:
    """`await fn()` with retries; its result, or the last error raised as it is.

    attempts: calls in all (first one included). give_up_after: seconds since
    the first call beyond which no retry starts (a wait that would end past it
    is not begun). At least one of the two is required: loops that never give
    up use Backoff. Each retry is logged as `event` (warning) with the attempt,
    the wait, the error and `context`.
    """
    if attempts is None and give_up_after is None:
        raise ValueError("retrying needs attempts or give_up_after (or use Backoff)")
    if attempts is not None and attempts < 1:
        raise ValueError("attempts must be at least 1")
    stop: stop_base = stop_never
    if attempts is not None:
        stop = stop_after_attempt(attempts)
    if give_up_after is not None:
        stop = stop | stop_before_delay(give_up_after)
    if max_retry_after is not None:
        stop = stop | _stop_when_retry_after_exceeds(max_retry_after)
    fields = dict(context or {})

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        wait = state.next_action.sleep if state.next_action is not None else None
        log.warning(event, attempt=state.attempt_number, max_attempts=attempts,
                    wait_s=round(wait, 3) if wait is not None else None,
                    error=str(exc)[:300], error_type=type(exc).__name__,
                    retry_after=retry_after_of(exc), **fields)

    # Cancellation and exit are never retried, whatever the predicate says.
    controller = AsyncRetrying(
        sleep=sleep, stop=stop, wait=wait_equal_jitter(initial, maximum),
        retry=retry_if_exception(lambda e: isinstance(e, Exception) and retry_on(e)),
        before_sleep=log_retry, reraise=True)

    async def attempt() -> T:
        # Awaited here: tenacity calls a plain callable (a lambda returning a
        # coroutine) without awaiting what it returns.
        return await fn()

    return await controller(attempt)


class Backoff:
    """The retry waits for a loop that never gives up; restarted after a success."""

    def __init__(self, initial: float = 0.2, maximum: float = 15.0, *,
                 event: str | None = None, sleep: Sleep = asyncio.sleep) -> None:
        self._wait = wait_equal_jitter(initial, maximum)
        self._event = event
        self._sleep = sleep
        self._attempt = 0

    @property
    def attempt(self) -> int:
        """Failures since the last reset."""
        return self._attempt

    def reset(self) -> None:
        self._attempt = 0

    def next_delay(self, after: BaseException | None = None) -> float:
        """Count one more failure; how long to wait before trying again."""
        self._attempt += 1
        return self._wait.delay(self._attempt, after)

    async def sleep(self, after: BaseException | None = None) -> float:
        """Wait before the next try (at least `after.retry_after`); the wait."""
        delay = self.next_delay(after)
        if self._event is not None:
            log.info(self._event, attempt=self._attempt, wait_s=round(delay, 3),
                     error=str(after)[:300] if after is not None else None)
        await self._sleep(delay)
        return delay
