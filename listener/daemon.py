"""The live daemon: lease, change intake, real-time timers, workers, reconcile.

One engine and one executor, as in replay; here the clock is the wall clock,
the store a database and the effects real. The timer loop only pops due timers
and hands them to workers: claims and effects never run on the timer path.

Its jobs have one lifetime each: the `Daemon` runs lease terms until stopped;
a `Lease` acquires, renews and releases the lease; a `Term` is one period of
holding it (its own engine, executor, intake, timers, workers, sweeps), under
the error boundary of `supervise`. Facts go into the `Readiness` the ops
endpoint reads, and the awaitable `DaemonEvents` tests and the demo wait on.
"""
from __future__ import annotations

import asyncio
import collections
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import structlog

from listener import collector, metrics
from listener.changes import Change, ChangeType
from listener.clock import Clock
from listener.effects import EventPublisher
from listener.engine import Engine, Timer
from listener.executor import ActionResult, Deliverer, Executor
from listener.instants import HOUR, SECOND, Instant
from listener.ops import Readiness
from listener.errors import is_transient
from listener.retry import Backoff
from listener.rows import BadRow, RowState, key_text
from listener.supervision import cancel_and_wait, supervise, unavailable
from listener.rules.model import RuleSet
from listener.rules.query import TableQuery
from listener.source import BadInputKind, ChangeSource
from listener.store import Fence, Fenced, Store

log = structlog.get_logger("listener.daemon")

# A daemon whose next deadline is minutes away still wakes this often: long
# single waits overshoot (timer slack), and a change may need it sooner.
MAX_WAIT_S = 0.5
# Workers acting on due timers, from one queue: a timer waits only for a free
# worker, or for an earlier action on its own row (never for an unrelated
# row's slow claim, as it did with a queue per worker). The store's pool
# bounds how many claims run in the database at once.
WORKERS = 32
QUEUE_LIMIT = 100_000
# The incremental read: every CATCH_UP_S, rows changed since the last one (less
# CATCH_UP_OVERLAP, for transactions that commit after they stamped the row),
# in pages of CATCH_UP_PAGE. It finds what a source dropped while it looked
# healthy within a few seconds; the full sweep still covers deletes.
CATCH_UP_S = 2.0
CATCH_UP_OVERLAP = 3 * SECOND
CATCH_UP_PAGE = 500
# Sweeps after the first read pages of this many rows. A page is decoded in
# one go on the event loop (a 5,000-row page took 5-20 ms, every timer due
# meanwhile that late); the first sweep keeps the store's larger pages, where
# start-up time is what counts.
STEADY_SWEEP_PAGE = 1000
# Long work on the event loop (sweep and catch-up pages, a backlog of
# changes) hands the loop back after this long, so a timer due meanwhile is
# popped at most about this late. A pass costs about 10 us: 2 ms slices had
# made firing lateness p99 a third worse than 0.5 ms ones, for no throughput.
SLICE_S = 0.0005
# A timer whose action raised is handed back after this long.
GIVE_BACK_TRANSIENT_S = 1.0
GIVE_BACK_BUG_S = 30.0


@dataclass
class DaemonConfig:
    lease_ttl: Instant = 15 * SECOND
    reconcile_interval: Instant = 60 * SECOND
    max_notify_lateness: Instant = HOUR
    shutdown_grace_s: float = 8.0
    holder: str = ""

    def __post_init__(self) -> None:
        if not self.holder:
            self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class LeaseLost(Exception):
    pass


class Slices:
    """Time slices of one long loop on the event loop: `over()` is cheap enough
    to ask after every row; `yield_now()` lets other tasks run and starts a
    new slice."""

    def __init__(self, length_s: float = SLICE_S) -> None:
        self.length_s = length_s
        self.ends = time.perf_counter() + length_s

    def restart(self) -> None:
        self.ends = time.perf_counter() + self.length_s

    def over(self) -> bool:
        return time.perf_counter() >= self.ends

    async def yield_now(self) -> None:
        await asyncio.sleep(0)
        self.restart()


class DaemonEvents:
    """What tests and the demo can await instead of polling private flags."""

    def __init__(self) -> None:
        self.active = asyncio.Event()  # holding the lease, subscribed, first sweep done
        self.standing_by = asyncio.Event()
        self.stopped = asyncio.Event()
        self.sweeps = 0  # full sweeps completed in this process
        self._swept = asyncio.Condition()

    async def swept(self, count: int) -> None:
        """Until `count` full sweeps have completed."""
        async with self._swept:
            await self._swept.wait_for(lambda: self.sweeps >= count)

    async def note_sweep(self) -> None:
        async with self._swept:
            self.sweeps += 1
            self._swept.notify_all()


class Lease:
    """Acquiring, renewing and releasing the one lease; stops waiting on `stop`."""

    def __init__(self, store: Store, config: DaemonConfig, readiness: Readiness,
                 events: DaemonEvents) -> None:
        self.store = store
        self.config = config
        self.readiness = readiness
        self.events = events
        self.ttl = config.lease_ttl / SECOND

    async def acquire(self, stop: asyncio.Event) -> int | None:
        """The fencing token once this instance holds the lease; None on stop."""
        announced = False
        backoff = Backoff(0.2, self.ttl / 3)
        while not stop.is_set():
            token = None
            try:
                # Bounded, and given up on SIGTERM: with the database unreachable the
                # pool waits 30 s for a connection, which broke "exit within 10 s".
                token = await self._attempt(
                    self.store.acquire_lease(self.config.holder, self.ttl), stop, self.ttl)
                if token is None and stop.is_set():
                    break
                self.readiness.store_ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the boundary of the standby loop
                if unavailable(exc):
                    self.readiness.store_down(exc)
                    log.warning("lease_error", error=str(exc)[:300])
                else:
                    metrics.BUGS.labels("lease").inc()
                    log.exception("bug", part="lease", error=repr(exc)[:300])
                await backoff.sleep(exc)
                continue
            if token is not None:
                log.info("lease_acquired", holder=self.config.holder, token=token)
                metrics.LEASE_HELD.set(1)
                self.events.standing_by.clear()
                return token
            if not announced:
                log.info("standing_by", holder=self.config.holder)
                announced = True
            self.readiness.role = "standby"
            # A standby follows no changes, so it has no subscription to lose:
            # ready while standing by (a Render deploy starts the new instance as a
            # standby next to the old one). A term resets it before subscribing.
            self.readiness.source_subscribed = True
            self.events.standing_by.set()
            try:
                await asyncio.wait_for(stop.wait(), self.ttl / 3)
            except TimeoutError:
                pass
        return None

    @staticmethod
    async def _attempt(work: Awaitable[Any], stop: asyncio.Event, timeout: float) -> Any:
        """`work`'s result; None (work cancelled) once `stop` is set; TimeoutError
        after `timeout` s. A lease taken by a cancelled attempt simply expires."""
        task = asyncio.ensure_future(work)
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([task, stopping], timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
        finally:
            stopping.cancel()
            task.cancel()  # no-op once done
        await asyncio.gather(task, return_exceptions=True)
        if stop.is_set():
            return None
        raise TimeoutError(f"no answer within {timeout:g} s")

    async def keep(self, fence: Fence) -> LeaseLost:
        """Renew until the lease is lost; the reason."""
        loop = asyncio.get_running_loop()
        last_ok = loop.time()
        while True:
            await asyncio.sleep(self.ttl / 3)
            try:
                if not await asyncio.wait_for(self.store.renew_lease(fence, self.ttl),
                                              self.ttl / 3):
                    return LeaseLost("renewal refused: another instance holds the lease")
                last_ok = loop.time()
                self.readiness.store_ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - keep trying until the lease runs out
                if unavailable(exc):
                    self.readiness.store_down(exc)
                    log.warning("lease_renew_failed", error=str(exc)[:300])
                else:
                    metrics.BUGS.labels("lease").inc()
                    log.exception("bug", part="lease", error=repr(exc)[:300])
                if loop.time() - last_ok > self.ttl * 0.8:
                    return LeaseLost("could not renew before expiry")

    async def release(self, fence: Fence) -> None:
        try:
            await asyncio.wait_for(self.store.release_lease(fence), 2)
            log.info("lease_released", holder=fence.holder)
        except Exception as exc:  # noqa: BLE001 - expiry releases it anyway
            log.warning("lease_release_failed", error=repr(exc)[:300])


class Daemon:
    """Stands by for the lease, and serves one term after another while it holds it."""

    def __init__(self, ruleset: RuleSet, queries: dict[str, TableQuery], store: Store,
                 source: ChangeSource, clock: Clock,
                 config: DaemonConfig | None = None, *, deliverer: Deliverer | None = None,
                 publisher: EventPublisher | None = None, webhooks: Any = None,
                 readiness: Readiness | None = None,
                 on_result: Callable[[ActionResult], None] | None = None) -> None:
        self.ruleset = ruleset
        self.queries = queries
        self.store = store
        self.source = source
        self.clock = clock
        self.config = config or DaemonConfig()
        self.deliverer = deliverer
        self.publisher = publisher
        self.webhooks = webhooks
        self.readiness = readiness or Readiness()
        self.on_result = on_result
        self.events = DaemonEvents()
        self.lease = Lease(store, self.config, self.readiness, self.events)
        self.term: Term | None = None

    @property
    def engine(self) -> Engine | None:
        return None if self.term is None else self.term.engine

    @property
    def executor(self) -> Executor | None:
        return None if self.term is None else self.term.executor

    async def run(self, stop: asyncio.Event) -> None:
        """Stand by for the lease, act while holding it, until `stop` is set."""
        try:
            while not stop.is_set():
                token = await self.lease.acquire(stop)
                if token is None:
                    break
                fence = Fence(self.config.holder, token)
                self.term = Term(self, fence)
                try:
                    await self.term.serve(stop)
                except LeaseLost as exc:
                    log.error("lease_lost", holder=fence.holder, reason=str(exc))
                    metrics.LEASE_HELD.set(0)
                    # Not stopping (that means SIGTERM): trying to take the lease back.
                    self.readiness.role = "standby"
                    self.events.active.clear()
        finally:
            self.readiness.role = "stopping"
            self.events.active.clear()
            self.events.stopped.set()

    async def reconcile(self) -> int:
        assert self.term is not None
        return await self.term.reconcile()

    async def catch_up(self) -> int:
        assert self.term is not None
        return await self.term.catch_up()


class Term:
    """One term of holding the lease: an engine and everything that feeds and
    drains it, from the first sweep to the release. Also the ChangeSink the
    source feeds."""

    def __init__(self, daemon: Daemon, fence: Fence) -> None:
        self.daemon = daemon
        self.fence = fence
        self.store = daemon.store
        self.clock = daemon.clock
        self.config = daemon.config
        self.readiness = daemon.readiness
        self.events = daemon.events
        self.queries = daemon.queries
        # The store may know which keys each table can hold (its key column's type).
        self._key_fits = getattr(daemon.store, "key_fits", None)
        # Children first: a parent's deadline counts its children's sums, and a
        # parent armed before them would fire too early while the sweep runs.
        self.sweep_order = sorted(self.queries, key=lambda t: self.queries[t].parent is None)
        self.engine = Engine(daemon.ruleset, self.config.max_notify_lateness)
        self.executor = Executor(self.engine, self.store, self.clock, fence,
                                 deliverer=daemon.deliverer, publisher=daemon.publisher,
                                 webhooks=daemon.webhooks, on_result=daemon.on_result,
                                 background=self._spawn, give_back=self._give_back)
        self._changes: asyncio.Queue[Change] = asyncio.Queue(QUEUE_LIMIT)
        self._wake: asyncio.Future[None] | None = None
        self._sweep_requested = asyncio.Event()
        self._swept_once = False
        self._watermarks: dict[str, Instant] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # Rows a worker is acting on, with their timers that came due meanwhile.
        self._acting: dict[tuple[str, str], collections.deque[tuple[Timer, Instant]]] = {}
        self._lost: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    # -- the ChangeSink the source feeds ---------------------------------------------

    def put(self, change: Change) -> None:
        try:
            self._changes.put_nowait(change)
        except asyncio.QueueFull:
            # Memory is bounded; the sweep that follows finds what was dropped.
            self.bad_input(BadInputKind.QUEUE_FULL, "change queue full: sweeping", change.table, change.key)
            self._sweep_requested.set()

    def bad_input(self, kind: BadInputKind, detail: str, table: str | None = None,
                  key: str | None = None) -> None:
        metrics.BAD_INPUT.labels(kind).inc()
        log.warning("bad_input", kind=kind, table=table, row_id=key, detail=detail[:500])

    def subscribed(self, source: str) -> None:
        self.readiness.source_subscribed = True
        self._sweep_requested.set()

    def unsubscribed(self, source: str, reason: str) -> None:
        self.readiness.source_subscribed = False
        self.events.active.clear()
        log.warning("source_lost", source=source, reason=reason[:300])

    # -- the term -------------------------------------------------------------------------

    def _part(self, name: str, run: Callable[[], Awaitable[Any]]) -> asyncio.Task[None]:
        return asyncio.create_task(
            supervise(name, run, self.readiness, on_fenced=self._lose), name=name)

    async def serve(self, stop: asyncio.Event) -> None:
        self.readiness.source_subscribed = False  # set by the source once subscribed
        self.readiness.role = "active"
        due: asyncio.Queue[tuple[Timer, Instant] | None] = asyncio.Queue()
        intake = [
            asyncio.create_task(self.daemon.source.run(self), name="source"),
            self._part("changes", self._consume_changes),
            self._part("timers", lambda: self._timer_loop(due)),
            self._part("reconcile", self._reconcile_loop),
            self._part("catch-up", self._catch_up_loop),
        ]
        renewer = asyncio.create_task(self._renew(), name="lease")
        workers = [asyncio.create_task(self._worker(due), name=f"worker-{i}")
                   for i in range(WORKERS)]
        stopping = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopping, self._lost, *intake],
                                         return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopping and task is not self._lost and task.exception():
                    log.error("task_failed", task=task.get_name(), error=repr(task.exception()))
        finally:
            self.readiness.role = "stopping"
            self.readiness.source_subscribed = False
            self.events.active.clear()
            await cancel_and_wait(intake, part="intake")
            # Let workers finish what they hold, then let effects in flight finish;
            # anything cut short stays `claimed` and the next holder resumes it.
            for _ in workers:
                due.put_nowait(None)
            grace = self.config.shutdown_grace_s
            await asyncio.wait([*workers, *self._background], timeout=grace)
            await cancel_and_wait([*workers, *self._background, renewer, stopping],
                                  part="actions")
            if not self._lost.done():
                await self.daemon.lease.release(self.fence)
            metrics.LEASE_HELD.set(0)
            metrics.TIMERS_ARMED.set(0)
            # This term's engine goes: what its first sweep set aside may be collected.
            collector.release_loaded()
        if self._lost.done() and not stop.is_set():
            raise LeaseLost(str(self._lost.result()))

    async def _renew(self) -> None:
        self._lose(await self.daemon.lease.keep(self.fence))

    def _spawn(self, work: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._effect_done)

    def _effect_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if isinstance(exc, Fenced):
                self._lose(exc)
            else:
                # The claim stays unfinished: the next sweep resumes it.
                metrics.BUGS.labels("effects").inc()
                log.error("bug", part="effects", error=repr(exc)[:300], exc_info=exc)

    def _give_back(self, timer: Timer, exc: BaseException) -> None:
        """An action raised: hand its timer back to the engine after a delay (at
        once it would be popped and fail again in a hot loop), and sweep, which
        resumes its claim. An unavailable database is retried within a second; a
        bug after GIVE_BACK_BUG_S."""
        transient = is_transient(exc)
        if transient:
            self.readiness.store_down(exc)
        delay = GIVE_BACK_TRANSIENT_S if transient else GIVE_BACK_BUG_S

        def give_back() -> None:
            self.engine.release(timer)
            self._sweep_requested.set()
            self._poke()

        asyncio.get_running_loop().call_later(delay, give_back)

    def _lose(self, why: BaseException) -> None:
        if not self._lost.done():
            self._lost.set_result(why)

    # -- the loops -----------------------------------------------------------------------------

    def _poke(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def _timer_loop(self, due_timers: asyncio.Queue[tuple[Timer, Instant] | None]) -> None:
        engine, clock, loop = self.engine, self.clock, asyncio.get_running_loop()

        def dispatch() -> None:
            now = clock.now()
            while (timer := engine.pop_due(now)) is not None:
                due_timers.put_nowait((timer, now))

        def on_time() -> None:
            # The due timers go to the workers from the timer's own callback: a
            # wake-up of this task first would cost them one more pass of the
            # event loop (and whatever else that pass runs).
            try:
                dispatch()
            except Exception:  # noqa: BLE001 - raised again below, in the supervised task
                pass
            self._poke()

        while True:
            dispatch()
            metrics.TIMERS_ARMED.set(engine.armed)
            metrics.SESSIONS_TRACKED.set(engine.tracked)
            due = engine.next_due()
            now = clock.now()
            wait = MAX_WAIT_S if due is None else min(MAX_WAIT_S, max(0.0, (due - now) / SECOND))
            self._wake = loop.create_future()
            handle = loop.call_later(wait, on_time)
            try:
                await self._wake
            finally:
                handle.cancel()

    async def _worker(self, queue: asyncio.Queue[tuple[Timer, Instant] | None]) -> None:
        """Act on due timers; the actions of one row one after another, in order."""
        acting = self._acting
        while (item := await queue.get()) is not None:
            row = (item[0].table, item[0].key)
            later = acting.get(row)
            if later is not None:
                later.append(item)  # the worker acting on this row takes it next
                continue
            acting[row] = later = collections.deque()
            try:
                while True:
                    await self.executor.run(*item)
                    if not later:
                        break
                    item = later.popleft()
            except Fenced as exc:
                self._lose(exc)
                return
            finally:
                del acting[row]

    async def _consume_changes(self) -> None:
        changes = self._changes
        slices = Slices()
        while True:
            if changes.empty():
                change = await changes.get()
                slices.restart()
            else:
                # A backlog is taken without a wait per change, in time slices.
                change = changes.get_nowait()
            try:
                if not self._apply_now(change):
                    await self._apply_read(change)
            except Exception as exc:  # noqa: BLE001 - one bad change must not stop intake
                self.bad_input(BadInputKind.CHANGE, repr(exc), change.table, change.key)
            if slices.over():
                await slices.yield_now()

    def _apply_now(self, change: Change) -> bool:
        """Apply a change that carries what it needs; False when the row must be
        read first (the NOTIFY had no room for it)."""
        engine = self.engine
        if not engine.watches(change.table):
            self.bad_input(BadInputKind.UNKNOWN_TABLE, "a change of a table no rule reads: ignored",
                           change.table, change.key)
            return True
        if self._key_fits is not None and not self._key_fits(change.table, change.key):
            # A real change always names a key its table can hold; acting on this
            # one would fail on the cast in every call, again and again.
            self.bad_input(BadInputKind.ROW, f"the key column of {change.table} cannot hold this key: "
                           "no row has it", change.table, change.key)
            return True
        if change.type == ChangeType.DELETE:
            engine.delete(change.table, change.key)
            self._poke()
            return True
        if change.record is None:
            return False
        self._upsert(change.table, change.key, change.record)
        self._poke()
        return True

    async def _apply_read(self, change: Change) -> None:
        row = await self.store.read_row(change.table, change.key)
        if row is None:
            self.engine.delete(change.table, change.key)
            return
        self._upsert(change.table, change.key, row)
        self._poke()

    def _upsert(self, table: str, key: str, row: dict[str, Any]) -> int:
        """Apply one row, reporting what is wrong with it; the episodes it newly owes."""
        engine = self.engine
        try:
            applied = engine.upsert(table, row, self.clock.now())
        except BadRow as exc:
            self.bad_input(BadInputKind.ROW, str(exc), table, key)
            return 0
        for problem in applied.problems:
            self.bad_input(BadInputKind.COLUMN, problem, table, applied.key)
        if applied.new_status is not None:
            self.bad_input(BadInputKind.UNKNOWN_STATUS,
                           f"status {applied.new_status!r} treated as terminal", table, applied.key)
        for unknown in engine.new_unknown_values:
            self.bad_input(BadInputKind.UNKNOWN_VALUE, f"{unknown.column} = {unknown.value!r} is not in the "
                           "rules' map: no deadline computed from it", table, applied.key)
        engine.new_unknown_values.clear()
        return applied.armed

    async def _reconcile_loop(self) -> None:
        """A full sweep after every (re)subscription and every RECONCILE_INTERVAL;
        a sweep that fails is retried at once with backoff, not an interval later."""
        interval = self.config.reconcile_interval / SECOND
        backoff = Backoff(0.2, 10.0, event="reconcile_retry")
        while True:
            try:
                await asyncio.wait_for(self._sweep_requested.wait(), interval)
            except TimeoutError:
                pass
            self._sweep_requested.clear()
            try:
                await self.reconcile()
            except (asyncio.CancelledError, Fenced):
                raise
            except Exception as exc:  # noqa: BLE001 - classified, then retried soon
                if not unavailable(exc):
                    raise  # a bug: the supervisor logs it and restarts this loop
                self.readiness.store_down(exc)
                log.error("reconcile_failed", error=str(exc)[:300])
                await backoff.sleep(exc)
                self._sweep_requested.set()
                continue
            backoff.reset()
            self.readiness.store_ok()

    async def _catch_up_loop(self) -> None:
        while True:
            await asyncio.sleep(CATCH_UP_S)
            if self._swept_once:
                await self.catch_up()

    async def catch_up(self) -> int:
        """Apply rows changed since the watermark that memory does not hold; the
        number of them (changes the source never delivered, or not yet)."""
        from listener.instants import BadInstant, parse_instant

        engine = self.engine
        found = 0
        slices = Slices()
        for table in self.sweep_order:
            since = self._watermarks.get(table)
            if since is None:
                continue
            newest = since
            start = since - CATCH_UP_OVERLAP
            while True:
                rows = await self.store.changed_since(table, start, CATCH_UP_PAGE)
                # Rows come in order of their stamps: the newest is the last one
                # that reads (parsing every row's unique stamp was most of the work).
                stamp = None
                for row in reversed(rows):
                    try:
                        stamp = parse_instant(row.get("_changed_at")) \
                            if isinstance(row, dict) else None
                    except BadInstant:
                        stamp = None
                    if stamp is not None:
                        newest = max(newest, stamp)
                        break
                slices.restart()
                for row in rows:
                    if slices.over():
                        await slices.yield_now()
                    key = self._key_of(table, row)
                    if key is None:
                        continue
                    # Most rows read are ones memory has seen at this version,
                    # those that owe nothing (forgotten) among them.
                    version = row.get("_version")
                    if version is not None and engine.seen_version(table, key) == version:
                        continue
                    if self._upsert(table, key, row) > 0:
                        found += 1
                if len(rows) < CATCH_UP_PAGE:
                    break
                if stamp is None or stamp <= start:
                    # A full page within one instant: the next would begin with the
                    # same rows. The full sweep reads what this read cannot.
                    self._sweep_requested.set()
                    break
                # A full page (a burst): the next one starts at its last row's stamp.
                # Paged from the watermark less the overlap instead, a burst of more
                # rows than a page within the overlap read that same page for ever.
                start = stamp
            self._watermarks[table] = newest
        if found:
            metrics.CATCH_UPS.inc(found)
            log.info("caught_up", rows=found)
            self._poke()
        return found

    async def reconcile(self) -> int:
        """Reload every row the rules care about, re-arm, resume unfinished claims.
        Returns the drift: rows memory had wrong (after the first sweep)."""
        if self._swept_once:
            return await self._reconcile()
        # The first sweep loads every tracked row: see listener.collector.
        with collector.paused():
            drift = await self._reconcile()
            collector.keep_loaded()
        return drift

    async def _reconcile(self) -> int:
        engine, executor = self.engine, self.executor
        drift = 0
        count = 0
        slices = Slices()
        # Rows changed from a little before this sweep on are the incremental
        # read's (the sweep's snapshot may miss them); older ones are the sweep's.
        started = self.clock.now() - 10 * SECOND
        for table in self.sweep_order:
            self._watermarks.setdefault(table, started)
            seen: set[str] = set()
            async for page in self.store.tracked_pages(
                    table, STEADY_SWEEP_PAGE if self._swept_once else None):
                slices.restart()
                count += len(page)
                for row in page:
                    if slices.over():
                        await slices.yield_now()  # keep the timer loop on time
                    key = self._key_of(table, row)
                    if key is None:
                        continue
                    seen.add(key)
                    known = engine.row(table, key)
                    if known is None:
                        armed = self._upsert(table, key, row)
                        # Drift: a row memory lacked (a change the source never delivered).
                        drift += int(self._swept_once and armed > 0)
                    elif known._version is None or known._version != row.get("_version"):
                        drift += await self._reconcile_row(table, key, row, known)
                    # else memory already holds this version of the row
            for key in [k for k in engine.keys(table) if k not in seen]:
                row = await self.store.read_row(table, key)
                if row is None:
                    drift += engine.delete(table, key)
                else:
                    drift += self._upsert(table, key, row) > 0
        for unfinished in await self.store.unfinished_claims():
            if unfinished.key not in executor.in_flight:
                await executor.resume(unfinished)
        metrics.RECONCILES.inc()
        if self._swept_once:
            metrics.RECONCILE_DRIFT.inc(drift)
        log.info("reconciled", rows=count, drift=drift, armed=engine.armed,
                 first=not self._swept_once)
        note = getattr(self.store, "note_reconcile", None)
        if note is not None:
            await note(self.fence.holder, self.clock.now(), drift)
        self._swept_once = True
        await self.events.note_sweep()
        if self.readiness.source_subscribed and self.readiness.role == "active":
            self.events.active.set()
        self._poke()
        return drift

    async def _reconcile_row(self, table: str, key: str, row: dict[str, Any],
                             known: RowState) -> int:
        """Bring memory in line with a tracked row it holds at another version;
        1 when memory had it wrong."""
        engine = self.engine
        differs = False
        if table in engine.tables:
            try:
                fresh = engine.parse(table, row, self.clock.now())
            except BadRow as exc:
                self.bad_input(BadInputKind.ROW, str(exc), table, key)
                return 0
            if not fresh.same_facts(known):
                # The sweep's snapshot may be older than a change already applied:
                # judge with the row as it is now.
                row = await self.store.read_row(table, key) or row
                try:
                    differs = not engine.parse(table, row, self.clock.now()).same_facts(known)
                except BadRow:
                    differs = True  # _upsert below reports it
        self._upsert(table, key, row)
        # Drift: memory was wrong about a row (a change the source never delivered).
        return int(self._swept_once and differs)

    def _key_of(self, table: str, row: Any) -> str | None:
        column = self.queries[table].key
        key = key_text(row.get(column)) if isinstance(row, dict) else None
        if key is None:
            self.bad_input(BadInputKind.ROW, f"tracked row without a usable {column}: {str(row)[:200]}",
                           table)
        return key

