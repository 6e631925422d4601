"""Rate-limited, retrying, batching email delivery on top of any EmailSender.

Interface (what the daemon calls):

    mailer = Mailer(sender, rate_per_second=5.0, max_attempts=5, freeze=freeze,
                    batch_window=BATCH_WINDOW)
    errors = await mailer.send(key, emails)           # list[str | None], one per email
    errors = await mailer.resend_frozen(batch_key, payload, members)   # recovery
    delivery = await mailer.deliver(email)            # one email alone, no batching
    await mailer.aclose()                             # shutdown: stop the dispatcher

- `send(key, emails)`: the emails of ONE action (`key` is its `ActionKey`, or
  a `Member`, or None when there is no ledger entry). Returns, per email in
  order, None (sent) or the reason it was not. Never raises for a send
  failure; cancellation propagates. An action's emails always travel in the
  same batch, so the ledger row's one `batch_key` names all of them.
- `freeze(batch_key, payload, members, supersedes) -> list[FrozenBatch]`: the
  coroutine the daemon gives, implemented with the store
  (`listener_batch_freeze_v1`). Called before a batch's first attempt with its
  key, its exact payload and its members (`[{rule, table_name, row_key,
  due_at, emails: [email keys]}]`); `supersedes` is the batch it replaces after
  a 422 (nothing of that one was sent). It returns the batches already frozen
  with some of these members (empty: frozen as asked), and raises when it
  could not record (fenced, database down): the batch is then not sent.
- `resend_frozen(batch_key, payload, members=())`: sends a recorded batch
  again, exactly as recorded, under its key (`listener_batch_v1` gives them).
  `send` does this by itself when `freeze` says an action is already in a
  frozen batch, so re-running an unfinished claim after a crash needs nothing
  more.

Batching: emails asked for within `batch_window` seconds of the first one
waiting, and all those that queue while the rate limiter makes them wait, go
out together as one `POST /emails/batch` of at most 100 (whole actions only).
A batch of one email takes the single path (`POST /emails` under the email's
own idempotency key, as release 1 did). Without a `send_batch` on the sender
(the outbox folder), every email takes the single path.

A batch is frozen before its first attempt: its key (`batch/` + sha256 of the
sorted email keys) and its payload are recorded through `freeze`, and every
retry - after a timeout, a 5xx, a lost answer, or a crash and `resend_frozen`
- sends that payload under that key, so the provider sends it once. What each
answer means:

- 2xx: every email of the batch is sent.
- 429 rate limit: the batch waits `retry-after` (at least the backoff) and is
  sent again; the limiter slows to the `ratelimit-limit` the server announces
  when it is below `rate_per_second`. Other batches are not paused.
- 429 daily/monthly quota: the emails fail at once with that reason (retrying
  soon cannot help; the ledger records them failed and they are not re-sent).
- 422 (strict validation: nothing was sent): the email the answer names fails
  with the reason and the rest are re-frozen under a new key, superseding the
  old batch, and sent; when the answer names none, the batch is split in
  halves (whole actions) until the bad ones are found.
- 409 key used with another payload: every email of the batch fails, not
  retried (the key was already accepted with other content).
- 409 in flight, 5xx, timeouts, network: retried with backoff, same key, same
  payload; after `max_attempts` the emails fail with the last error.
- 401/403 and other refusals: the emails fail, not retried.

One rate limiter (`aiolimiter.AsyncLimiter`, capacity 1, refilled at
`rate_per_second`) spaces every request, attempts and retries alike, single
and batch: a batch is one request.
"""
from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from aiolimiter import AsyncLimiter

from listener.effects import Delivery, EmailError, EmailSender, OutgoingEmail
from listener.email_batch import (ErrorKind, Freeze, FreezeRefused, FrozenBatch, Member,
                                  Payload, ProviderError, batch_key, canonical_payload, ref_of)
from listener.instants import format_instant
from listener.metrics import EMAIL_ATTEMPTS, EMAIL_FAILURES
from listener.retry import retrying, wait_equal_jitter

__all__ = ["BATCH_WINDOW", "MAX_BATCH", "Freeze", "FreezeRefused", "FrozenBatch", "Mailer",
           "Member", "member_of"]

log = structlog.get_logger("listener.mailer")

Sleep = Callable[[float], Awaitable[None]]

MAX_BATCH = 100
# How long the first email waits for company when the mailer is idle. Measured
# (benchmarks/email_window.py): 20 ms costs a lone email 20 ms and saves a burst
# one request (200 ms at 5/s) over 0 ms; longer windows buy nothing more.
BATCH_WINDOW = 0.02
# Least wait before asking again about a request still in flight at the provider.
IN_FLIGHT_WAIT = 1.0


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, EmailError) and exc.transient


def member_of(key: Any) -> Member | None:
    """A ledger member from an ActionKey (rule, table, row_key, due_at), a Member, or None."""
    if key is None or isinstance(key, Member):
        return key
    due = key.due_at
    return Member(key.rule, key.table, key.row_key,
                  due if isinstance(due, str) else format_instant(due))


# A little more than the server's window: its clock and ours differ by a hair.
_WINDOW_MARGIN = 1.02


class _Slot:
    """The right to make one request; `release()` when its answer is in (or it failed)."""

    __slots__ = ("_gate", "_released")

    def __init__(self, gate: _RateGate) -> None:
        self._gate = gate
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate._ended()


class _RateGate:
    """Paces requests for a server that allows `limit` requests in any `window` seconds.

    Two rules, both needed: an `aiolimiter.AsyncLimiter` spaces request starts
    1/rate apart (smooth, no bursts); and a request starts only when fewer
    than `limit` others are in flight or answered within the last `window`.
    The server counts a request when it arrives, somewhere between our start
    and its answer, so the second rule keeps to its limit whatever the network
    delay (a slow first connection would otherwise let `limit + 1` arrive
    within one window). The rate can only be lowered, to what the server says.
    """

    def __init__(self, rate_per_second: float) -> None:
        self._configure(rate_per_second)
        self._in_flight = 0
        self._ends: collections.deque[float] = collections.deque()
        self._changed: asyncio.Event | None = None  # set when a request ends
        self._changed_loop: asyncio.AbstractEventLoop | None = None

    def _configure(self, rate: float) -> None:
        self.rate = rate
        self.limit = max(1, int(rate)) if rate >= 1 else 1
        self.window = self.limit / rate * _WINDOW_MARGIN
        self._limiter = AsyncLimiter(1, 1.0 / rate)

    async def acquire(self) -> _Slot:
        while True:
            limiter = self._limiter
            await limiter.acquire()
            if limiter is self._limiter:
                break
            # The rate changed while we waited: queue again at the new pace.
        loop = asyncio.get_running_loop()
        while True:
            now = loop.time()
            while self._ends and self._ends[0] <= now - self.window:
                self._ends.popleft()
            if self._in_flight + len(self._ends) < self.limit:
                break
            if self._changed is None or self._changed_loop is not loop:
                self._changed, self._changed_loop = asyncio.Event(), loop
            self._changed.clear()
            timeout = (self._ends[0] + self.window - now) if self._ends else None
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                pass
        self._in_flight += 1
        return _Slot(self)

    def _ended(self) -> None:
        self._in_flight -= 1
        self._ends.append(asyncio.get_running_loop().time())
        if self._changed is not None:
            self._changed.set()

    def slow_to(self, rate: float) -> bool:
        if not rate or rate <= 0 or rate >= self.rate:
            return False
        self._configure(rate)
        if self._changed is not None:
            self._changed.set()
        return True


@dataclass(eq=False)  # identity: groups are keys and are compared with `is`
class _Group:
    """One action's emails: they travel together, in one batch."""

    member: Member | None
    emails: list[OutgoingEmail]
    futures: list[asyncio.Future[str | None]]
    queued_at: float = field(default_factory=time.monotonic)

    def settle(self, email: OutgoingEmail, error: str | None) -> None:
        for e, fut in zip(self.emails, self.futures):
            if e is email and not fut.done():
                fut.set_result(error)

    def settle_all(self, error: str | None) -> None:
        for fut in self.futures:
            if not fut.done():
                fut.set_result(error)

    @property
    def abandoned(self) -> bool:
        return all(f.cancelled() for f in self.futures)


def _members_json(groups: Sequence[_Group]) -> list[dict[str, Any]]:
    members: dict[Member, list[str]] = {}
    for group in groups:
        if group.member is not None:
            members.setdefault(group.member, []).extend(e.idempotency_key for e in group.emails)
    return [{**m.as_json(), "emails": keys} for m, keys in members.items()]


class Mailer:
    def __init__(self, sender: EmailSender, rate_per_second: float = 5.0, max_attempts: int = 5,
                 base_delay: float = 0.5, max_delay: float = 30.0, *,
                 max_retry_after: float = 120.0, sleep: Sleep = asyncio.sleep,
                 freeze: Freeze | None = None, batch_window: float = BATCH_WINDOW,
                 max_batch: int = MAX_BATCH) -> None:
        if rate_per_second <= 0:
            raise ValueError("rate_per_second must be positive")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if not 1 <= max_batch <= MAX_BATCH:
            raise ValueError(f"max_batch must be 1 to {MAX_BATCH}")
        self.sender = sender
        self.rate_per_second = rate_per_second
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._waits = wait_equal_jitter(base_delay, max_delay)
        # A retry-after longer than this (a quota, not a rate) is not waited for.
        self.max_retry_after = max_retry_after
        self.freeze = freeze
        self.batch_window = max(0.0, batch_window)
        self.max_batch = max_batch
        self.batching = all(callable(getattr(sender, name, None))
                            for name in ("send_batch", "send_item", "payload_item"))
        self._sleep = sleep
        self._gate = _RateGate(rate_per_second)
        self._queue: list[_Group] = []
        self._queued_emails = 0
        self._wake: asyncio.Event | None = None
        self._full: asyncio.Event | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        # Frozen batches being re-sent, so several actions found in one share one request.
        self._resending: dict[str, asyncio.Task[list[str | None]]] = {}

    @property
    def rate(self) -> float:
        """Requests per second now (lowered when the server announces less)."""
        return self._gate.rate

    # -- public -------------------------------------------------------------------------

    async def send(self, key: Any, emails: Sequence[OutgoingEmail]) -> list[str | None]:
        """Send one action's emails; per email None (sent) or the reason it was not."""
        emails = list(emails)
        if not emails:
            return []
        if not self.batching:
            deliveries = await asyncio.gather(*(self.deliver(e) for e in emails))
            return [None if d.ok else (d.error or f"not sent after {d.attempts} attempts")
                    for d in deliveries]
        loop = asyncio.get_running_loop()
        group = _Group(member_of(key), emails, [loop.create_future() for _ in emails])
        self._enqueue(group)
        return list(await asyncio.gather(*group.futures))

    async def resend_frozen(self, batch_key_: str, payload: Payload,
                            members: Sequence[dict[str, Any]] = ()) -> list[str | None]:
        """Send a recorded batch again, as recorded, under its key; per item None or an error."""
        if not self.batching:
            raise TypeError(f"{type(self.sender).__name__} cannot send batches")
        task = self._resending.get(batch_key_)
        if task is None or task.get_loop() is not asyncio.get_running_loop():
            task = asyncio.ensure_future(self._send_frozen(
                batch_key_, canonical_payload(payload), list(members), slot=None))
            self._resending[batch_key_] = task
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            task.add_done_callback(lambda t: self._resending.pop(batch_key_, None)
                                   if self._resending.get(batch_key_) is t else None)
        # Shielded: one caller giving up does not cancel the others' request.
        return list(await asyncio.shield(task))

    async def deliver(self, email: OutgoingEmail) -> Delivery:
        """One email through `POST /emails` under its own key, no batching."""
        attempts = 0
        ctx = {"rule": email.rule, "table": email.table, "row_id": email.row_id, "role": email.role,
               "idempotency_key": email.idempotency_key}

        async def attempt() -> str:
            nonlocal attempts
            slot = await self._gate.acquire()
            attempts += 1
            EMAIL_ATTEMPTS.inc()
            try:
                return await self.sender.send(email)
            except EmailError as exc:
                self._follow(exc)
                raise
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a sender bug: do not retry, do not crash the caller
                raise EmailError(f"{type(exc).__name__}: {exc}", transient=False) from exc
            finally:
                slot.release()

        try:
            provider_id = await retrying(
                attempt, attempts=self.max_attempts, retry_on=_is_transient,
                initial=self.base_delay, maximum=self.max_delay,
                max_retry_after=self.max_retry_after, event="email_retry", context=ctx,
                sleep=self._sleep)
        except EmailError as exc:
            EMAIL_FAILURES.inc()
            log.warning("email_failed", **ctx, attempts=attempts, error=str(exc),
                        status=exc.status, transient=exc.transient)
            return Delivery(ok=False, attempts=attempts, error=str(exc))
        self._follow(None)
        if attempts > 1:
            log.info("email_sent_after_retry", **ctx, attempts=attempts, provider_id=provider_id)
        return Delivery(ok=True, attempts=attempts, provider_id=provider_id)

    async def aclose(self) -> None:
        """Stop the dispatcher and cancel batches in flight (shutdown)."""
        tasks = [t for t in (self._dispatcher, *self._tasks) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._dispatcher = None
        for group in self._queue:
            for fut in group.futures:
                fut.cancel()
        self._queue.clear()
        self._queued_emails = 0

    # -- queue and dispatcher -----------------------------------------------------------

    def _enqueue(self, group: _Group) -> None:
        loop = asyncio.get_running_loop()
        if self._dispatcher is None or self._dispatcher.done() \
                or self._dispatcher.get_loop() is not loop:
            self._wake, self._full = asyncio.Event(), asyncio.Event()
            self._dispatcher = loop.create_task(self._dispatch(), name="mailer-dispatch")
        self._queue.append(group)
        self._queued_emails += len(group.emails)
        assert self._wake is not None and self._full is not None
        self._wake.set()
        if self._queued_emails >= self.max_batch:
            self._full.set()

    async def _dispatch(self) -> None:
        assert self._wake is not None and self._full is not None
        while True:
            await self._wake.wait()
            if not self._queue:
                self._wake.clear()
                continue
            # Wait for company: until `batch_window` after the first email queued,
            # or until a full batch is waiting.
            delay = self._queue[0].queued_at + self.batch_window - time.monotonic()
            if delay > 0 and not self._full.is_set():
                try:
                    await asyncio.wait_for(self._full.wait(), delay)
                except TimeoutError:
                    pass
            # The slot first: emails keep queueing while the limiter holds us.
            slot = await self._gate.acquire()
            groups = self._take()
            if not groups:  # all abandoned
                slot.release()
                continue
            self._spawn(self._send_groups(groups, supersedes=None, slot=slot))

    def _take(self) -> list[_Group]:
        """Whole actions, oldest first, up to `max_batch` emails."""
        taken: list[_Group] = []
        size = 0
        while self._queue:
            group = self._queue[0]
            if group.abandoned:
                self._queue.pop(0)
                self._queued_emails -= len(group.emails)
                continue
            if taken and size + len(group.emails) > self.max_batch:
                break
            self._queue.pop(0)
            self._queued_emails -= len(group.emails)
            taken.append(group)
            size += len(group.emails)
        assert self._wake is not None and self._full is not None
        if not self._queue:
            self._wake.clear()
        if self._queued_emails < self.max_batch:
            self._full.clear()
        return taken

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one batch ----------------------------------------------------------------------

    async def _send_groups(self, groups: list[_Group], *, supersedes: str | None,
                           slot: _Slot | None) -> None:
        """Freeze, send, settle every email of these groups (never raises but cancellation)."""
        try:
            await self._send_groups_inner(groups, supersedes=supersedes, slot=slot)
        except asyncio.CancelledError:
            for group in groups:
                for fut in group.futures:
                    fut.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here fails these emails, not the mailer
            log.error("email_batch_error", error=repr(exc), exc_info=True)
            for group in groups:
                group.settle_all(f"email batch error: {type(exc).__name__}: {exc}")
        finally:
            if slot is not None:
                slot.release()  # unused (not frozen, or re-sent elsewhere); else a no-op

    async def _send_groups_inner(self, groups: list[_Group], *, supersedes: str | None,
                                 slot: _Slot | None) -> None:
        emails = [e for g in groups for e in g.emails]
        owner = [g for g in groups for _ in g.emails]
        try:
            payload = [self.sender.payload_item(e) for e in emails]  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a sender bug: these emails fail
            for g in groups:
                g.settle_all(f"email not prepared: {type(exc).__name__}: {exc}")
            return
        key = batch_key(e.idempotency_key for e in emails)
        members = _members_json(groups)

        if self.freeze is not None:
            try:
                already = list(await self.freeze(key, payload, members, supersedes) or ())
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - not recorded: not sent
                reason = f"batch not recorded, not sent: {type(exc).__name__}: {exc}"
                log.warning("email_batch_not_frozen", batch_key=key, emails=len(emails),
                            error=str(exc))
                self._fail(groups, reason)
                return
            if already:
                if slot is not None:
                    slot.release()
                await self._send_already_frozen(groups, already)
                return

        results = await self._send_frozen(key, payload, members, slot=slot,
                                          groups=groups, owner=owner)
        for email, group, error in zip(emails, owner, results):
            group.settle(email, error)
            if error is not None:
                EMAIL_FAILURES.inc()
                log.warning("email_failed", rule=email.rule, table=email.table, row_id=email.row_id,
                            role=email.role, idempotency_key=email.idempotency_key,
                            batch_key=key, error=error)

    async def _send_already_frozen(self, groups: list[_Group],
                                   already: list[FrozenBatch]) -> None:
        """Some actions are in batches frozen earlier (before a crash): re-send those as
        recorded, settle their emails from that, and batch the rest anew."""
        by_ref: dict[str, str | None] = {}
        for frozen in already:
            results = await self.resend_frozen(frozen.batch_key, frozen.payload, frozen.members)
            for item, error in zip(frozen.payload, results):
                ref = ref_of(item)
                if ref is not None:
                    by_ref[ref] = error
        frozen_members = {Member(m["rule"], m["table_name"], m["row_key"], str(m["due_at"]))
                          for f in already for m in f.members if "rule" in m}
        rest: list[_Group] = []
        for group in groups:
            found = [e.idempotency_key in by_ref for e in group.emails]
            if any(found) or (group.member is not None and group.member in frozen_members):
                for email in group.emails:
                    group.settle(email, by_ref.get(email.idempotency_key,
                                 f"not sent: its action is in batch "
                                 f"{already[0].batch_key}, which has no such email"))
            else:
                rest.append(group)
        if rest:
            await self._send_groups_inner(rest, supersedes=None, slot=None)

    async def _send_frozen(self, key: str, payload: Payload, members: list[dict[str, Any]], *,
                           slot: _Slot | None, groups: list[_Group] | None = None,
                           owner: list[_Group] | None = None) -> list[str | None]:
        """Attempts of one frozen batch; per item None or an error. Splits on a 422."""
        attempts = 0
        last: ProviderError | None = None
        while attempts < self.max_attempts:
            if slot is None:
                slot = await self._gate.acquire()
            attempts += 1
            EMAIL_ATTEMPTS.inc()
            try:
                if len(payload) == 1:
                    await self.sender.send_item(  # type: ignore[attr-defined]
                        payload[0], ref_of(payload[0]) or key)
                else:
                    await self.sender.send_batch(payload, key)  # type: ignore[attr-defined]
            except asyncio.CancelledError:
                raise
            except ProviderError as exc:
                self._follow(exc)
                last = exc
            except EmailError as exc:  # a sender without kinds: by its transient flag
                last = ProviderError(str(exc), ErrorKind.UNKNOWN if exc.transient
                                     else ErrorKind.REFUSED, status=exc.status,
                                     retry_after=exc.retry_after)
            except Exception as exc:  # noqa: BLE001 - a sender bug: do not retry
                return [f"{type(exc).__name__}: {exc}"] * len(payload)
            else:
                self._follow(None)
                log.info("email_batch_sent", batch_key=key, emails=len(payload),
                         attempts=attempts)
                return [None] * len(payload)
            finally:
                slot.release()
                slot = None

            kind = last.kind
            if kind is ErrorKind.INVALID:
                return await self._split_invalid(key, payload, members, last, groups, owner)
            if kind is ErrorKind.QUOTA:
                log.warning("email_quota_exceeded", batch_key=key, emails=len(payload),
                            error=str(last))
                return [f"{last} (the provider's sending quota is spent: not retried)"
                        ] * len(payload)
            if not last.transient:
                return [str(last)] * len(payload)
            if last.retry_after and last.retry_after > self.max_retry_after:
                return [f"{last} (retry-after {last.retry_after:g}s is too long)"] * len(payload)
            if attempts >= self.max_attempts:
                break
            wait = self._waits.delay(attempts, last)
            if kind is ErrorKind.IN_FLIGHT:
                # The first request with this key is still being processed (a
                # request of a previous instance, or one we gave up waiting for):
                # asking again within the second only spends the rate budget.
                wait = max(wait, IN_FLIGHT_WAIT)
            log.info("email_batch_retry", batch_key=key, emails=len(payload), attempt=attempts,
                     max_attempts=self.max_attempts, wait_s=round(wait, 3), error=str(last),
                     kind=kind.value)
            await self._sleep(wait)
        return [f"not sent after {attempts} attempts: {last}"] * len(payload)

    async def _split_invalid(self, key: str, payload: Payload, members: list[dict[str, Any]],
                             error: ProviderError, groups: list[_Group] | None,
                             owner: list[_Group] | None) -> list[str | None]:
        """Strict 422: nothing was sent. Fail the email at fault, send the rest anew."""
        n = len(payload)
        index = error.invalid_index
        if n == 1:
            return [str(error)]
        if index is not None and 0 <= index < n:
            parts = [[i for i in range(n) if i != index]]
            failed = {index}
        else:
            parts = self._halves(n, owner)
            failed = set()
            if parts is None:  # one action's emails, no index: cannot tell which
                return [str(error)] * n
        log.warning("email_batch_invalid", batch_key=key, emails=n, index=index,
                    error=str(error), parts=len(parts))
        results: list[str | None] = [str(error) if i in failed else None for i in range(n)]
        outcome = await asyncio.gather(*(self._send_part(key, payload, members, part, groups,
                                                          owner) for part in parts))
        for part, part_results in zip(parts, outcome):
            for i, r in zip(part, part_results):
                results[i] = r
        return results

    @staticmethod
    def _halves(n: int, owner: list[_Group] | None) -> list[list[int]] | None:
        """Two halves of the item indexes, never splitting an action's emails."""
        if owner is None:
            cut = n // 2
            return [list(range(cut)), list(range(cut, n))]
        starts = [i for i in range(n) if i == 0 or owner[i] is not owner[i - 1]]
        if len(starts) < 2:
            return None
        cut = starts[len(starts) // 2]
        return [list(range(cut)), list(range(cut, n))]

    async def _send_part(self, old_key: str, payload: Payload, members: list[dict[str, Any]],
                         part: list[int], groups: list[_Group] | None,
                         owner: list[_Group] | None) -> list[str | None]:
        items = [payload[i] for i in part]
        refs = [ref_of(item) or f"{old_key}#{i}" for i, item in zip(part, items)]
        new_key = batch_key(refs)
        ref_set = set(refs)
        if owner is not None:
            part_groups = list(dict.fromkeys(owner[i] for i in part))
            part_members = [{**m, "emails": [k for k in m.get("emails", ()) if k in ref_set]}
                            for m in _members_json(part_groups)]
        else:
            part_members = [{**m, "emails": [k for k in m.get("emails", ()) if k in ref_set]}
                            for m in members if set(m.get("emails", ())) & ref_set]
        if self.freeze is not None:
            try:
                await self.freeze(new_key, items, part_members, old_key)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - not recorded: not sent
                return [f"batch not recorded, not sent: {type(exc).__name__}: {exc}"] * len(items)
        return await self._send_frozen(new_key, items, part_members, slot=None,
                                       owner=[owner[i] for i in part] if owner else None)

    def _fail(self, groups: list[_Group], reason: str) -> None:
        for group in groups:
            for email in group.emails:
                EMAIL_FAILURES.inc()
                group.settle(email, reason)

    # -- rate ---------------------------------------------------------------------------

    def _follow(self, exc: EmailError | None) -> None:
        """Slow down to what the server announces, when it announces less than we use."""
        limit = getattr(exc, "rate_limit", None) if exc is not None else None
        limit = limit or getattr(self.sender, "server_rate_limit", None)
        if limit and self._gate.slow_to(float(limit)):
            log.warning("email_rate_lowered", rate_per_second=self._gate.rate,
                        configured=self.rate_per_second,
                        why="the provider's ratelimit-limit is lower than RESEND_RATE_LIMIT")
