"""The one retry policy: what it retries, how long it waits, when it gives up."""
from __future__ import annotations

import asyncio
import time

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

import listener.source
from listener.errors import EffectFailed, StoreRefused, StoreUnavailable
from listener.retry import Backoff, retrying, wait_equal_jitter


class Flaky:
    """Fails with the given errors in turn, then answers "ok"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class VirtualSleep:
    """Records each wait instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


async def test_transient_errors_are_retried_until_success() -> None:
    fn, sleep = Flaky(StoreUnavailable("down"), StoreUnavailable("down")), VirtualSleep()
    assert await retrying(fn, attempts=5, initial=1.0, maximum=8.0, sleep=sleep) == "ok"
    assert fn.calls == 3
    assert 0.5 <= sleep.waits[0] <= 1.0 and 1.0 <= sleep.waits[1] <= 2.0


async def test_final_errors_are_not_retried() -> None:
    fn, sleep = Flaky(StoreRefused("permission denied")), VirtualSleep()
    with pytest.raises(StoreRefused, match="permission denied"):
        await retrying(fn, attempts=5, sleep=sleep)
    assert fn.calls == 1 and sleep.waits == []


async def test_the_last_error_propagates_after_the_last_attempt() -> None:
    errors = [StoreUnavailable(f"down {i}") for i in range(4)]
    fn, sleep = Flaky(*errors), VirtualSleep()
    with pytest.raises(StoreUnavailable) as info:
        await retrying(fn, attempts=3, sleep=sleep)
    assert info.value is errors[2] and fn.calls == 3 and len(sleep.waits) == 2


async def test_waits_grow_exponentially_and_are_capped() -> None:
    fn, sleep = Flaky(*[StoreUnavailable("down")] * 9), VirtualSleep()
    await retrying(fn, attempts=10, initial=0.1, maximum=2.0, sleep=sleep)
    for n, wait in enumerate(sleep.waits, start=1):
        ceiling = min(2.0, 0.1 * 2 ** (n - 1))
        assert ceiling / 2 <= wait <= ceiling, (n, wait)
    assert max(sleep.waits) <= 2.0


async def test_retry_after_is_honoured() -> None:
    fn, sleep = Flaky(EffectFailed("429", transient=True, retry_after=7.0, status=429)), VirtualSleep()
    assert await retrying(fn, attempts=3, initial=0.1, maximum=1.0, sleep=sleep) == "ok"
    assert sleep.waits == [7.0]  # longer than the cap: the server said so


async def test_a_retry_after_beyond_the_limit_is_not_waited_for() -> None:
    quota = EffectFailed("daily quota", transient=True, retry_after=86_400.0, status=429)
    fn, sleep = Flaky(quota), VirtualSleep()
    with pytest.raises(EffectFailed):
        await retrying(fn, attempts=5, max_retry_after=120.0, sleep=sleep)
    assert fn.calls == 1 and sleep.waits == []


async def test_give_up_after_never_starts_a_wait_past_the_budget() -> None:
    fn = Flaky(*[StoreUnavailable("down")] * 1000)
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        await retrying(fn, give_up_after=0.3, initial=0.02, maximum=0.05)
    elapsed = time.monotonic() - started
    assert 3 <= fn.calls < 40 and elapsed < 0.3 + 0.1, (fn.calls, elapsed)


async def test_a_predicate_decides_what_is_retried() -> None:
    fn, sleep = Flaky(ConnectionResetError(), ConnectionResetError()), VirtualSleep()
    result = await retrying(fn, attempts=3, retry_on=lambda e: isinstance(e, OSError), sleep=sleep)
    assert result == "ok" and fn.calls == 3


async def test_cancellation_is_never_retried() -> None:
    fn, sleep = Flaky(asyncio.CancelledError()), VirtualSleep()
    with pytest.raises(asyncio.CancelledError):
        await retrying(fn, attempts=5, retry_on=lambda e: True, sleep=sleep)
    assert fn.calls == 1


async def test_each_retry_is_logged_with_the_event_name() -> None:
    fn, sleep = Flaky(StoreUnavailable("connection lost"), StoreUnavailable("connection lost")), \
        VirtualSleep()
    with structlog.testing.capture_logs() as logs:
        await retrying(fn, attempts=5, event="sweep_retry", context={"table": "sessions"},
                       sleep=sleep)
    retries = [entry for entry in logs if entry["event"] == "sweep_retry"]
    assert [entry["attempt"] for entry in retries] == [1, 2]
    assert retries[0]["table"] == "sessions" and retries[0]["error"] == "connection lost"
    assert retries[0]["error_type"] == "StoreUnavailable" and retries[0]["log_level"] == "warning"
    assert retries[0]["wait_s"] == round(sleep.waits[0], 3)


async def test_a_budget_is_required() -> None:
    with pytest.raises(ValueError, match="attempts or give_up_after"):
        await retrying(Flaky())


async def test_backoff_grows_resets_and_honours_retry_after() -> None:
    sleep = VirtualSleep()
    backoff = Backoff(initial=0.2, maximum=1.0, sleep=sleep)
    delays = [await backoff.sleep() for _ in range(6)]
    assert delays == sleep.waits and backoff.attempt == 6
    for n, delay in enumerate(delays, start=1):
        ceiling = min(1.0, 0.2 * 2 ** (n - 1))
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.attempt == 0 and await backoff.sleep() <= 0.2
    assert await backoff.sleep(StoreUnavailable("503", retry_after=5.0)) == 5.0


async def test_backoff_sleeps_for_real_by_default() -> None:
    backoff = Backoff(initial=0.05, maximum=0.05)
    started = time.monotonic()
    delay = await backoff.sleep()
    assert time.monotonic() - started >= delay >= 0.025


def test_sources_still_import_backoff_from_listener_source() -> None:
    assert listener.source.Backoff is Backoff


@given(attempt=st.integers(1, 10_000), initial=st.floats(0.001, 10.0),
       extra=st.floats(0.0, 1000.0))
def test_every_wait_is_within_half_and_all_of_its_ceiling(attempt: int, initial: float,
                                                          extra: float) -> None:
    wait = wait_equal_jitter(initial, initial + extra)
    ceiling = min(initial + extra, initial * 2.0 ** min(attempt - 1, 60))
    assert ceiling / 2 <= wait.delay(attempt) <= ceiling


async def test_a_callable_returning_a_coroutine_is_awaited() -> None:
    # The common call site: `retrying(lambda: store.read_row(table, key), ...)`.
    calls = []

    async def read(key: str) -> str:
        calls.append(key)
        if len(calls) == 1:
            raise StoreUnavailable("connection dropped")
        return f"row {key}"

    async def sleep(_: float) -> None:
        return None

    assert await retrying(lambda: read("k"), attempts=3, sleep=sleep) == "row k"
    assert calls == ["k", "k"]
