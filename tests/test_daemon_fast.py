"""The fast tier: the real daemon, built by the composition root on the memory
backend (MemoryStore and MemorySource), on short real time. No database, no
network: the whole file runs in a few seconds (`pytest -m fast`).

What each test waits on is the daemon's own events (active, standing_by,
swept) or the results it reports, always with a timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import pytest
import structlog

from listener import daemon as daemon_module
from listener import metrics
from listener.adapters.email_outbox import OutboxSender
from listener.adapters.store_memory import MemoryStore
from listener.effects import OutgoingEmail
from listener.errors import StoreUnavailable
from listener.executor import ActionResult
from listener.instants import MINUTE, SECOND, format_instant
from listener.rules import load_rules
from listener.runtime import assemble, memory_backend
from listener.settings import Settings
from listener.store import Fence

pytestmark = pytest.mark.fast

# 5 min -> 50 ms (the support alert), 15 min -> 150 ms (the expiry).
SCALE = {"RULES_TIME_SCALE": "6000"}
CUSTOMER = "22222222-2222-4222-8222-222222222222"
OTHER_CUSTOMER = "33333333-3333-4333-8333-333333333333"
WAIT = 3.0  # seconds any one expected event may take: generous, never the point


def sid(n: int) -> str:
    return f"0f000000-0000-4000-8000-{n:012d}"


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


class CountingOutbox(OutboxSender):
    """The outbox, counting each send by idempotency key (a file per key would
    hide a second send of the same email)."""

    def __init__(self, folder: Path) -> None:
        super().__init__(folder)
        self.sent: Counter[str] = Counter()

    async def send(self, email: OutgoingEmail) -> str:
        self.sent[email.idempotency_key] += 1
        return await super().send(email)


@pytest.fixture(autouse=True)
def no_incremental_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """Changes reach the daemon through the source or a sweep, never by the
    every-2-seconds incremental read: what a test sees is what it caused."""
    monkeypatch.setattr(daemon_module, "CATCH_UP_S", 3600.0)


class Results:
    """The daemon's results, awaitable: `await results.until(check)`."""

    def __init__(self) -> None:
        self.items: list[ActionResult] = []
        self._changed = asyncio.Condition()

    def __call__(self, result: ActionResult) -> None:
        self.items.append(result)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def until(self, check: Callable[[list[ActionResult]], bool],
                    timeout: float = WAIT) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: check(self.items))
        await asyncio.wait_for(wait(), timeout)

    def of(self, key: str, rule: str | None = None) -> list[ActionResult]:
        return [r for r in self.items
                if r.key.row_key == key and (rule is None or r.key.rule == rule)]


class Running:
    """A daemon running on the memory backend, and what the tests reach into."""

    def __init__(self, listener: Any, backend: Any, results: Results,
                 outbox: CountingOutbox) -> None:
        self.daemon = listener.daemon
        self.outbox = outbox
        self.store: MemoryStore = backend.store
        self.source = backend.source
        self.results = results
        self.events = self.daemon.events

    async def wait(self, event: asyncio.Event, timeout: float = WAIT) -> None:
        await asyncio.wait_for(event.wait(), timeout)

    def write_request(self, key: str, minutes_ago: float = 0.0) -> None:
        """A pending request with no mechanic: the support alert, then the expiry."""
        changed = self.store.clock.now() - int(minutes_ago * MINUTE / 6000)
        self.source.write("sessions", {"id": key, "status": "pending",
                                       "customer_user_id": CUSTOMER,
                                       "status_changed_at": format_instant(changed)})

    def ledger(self, key: str) -> dict[str, str]:
        return {k.rule: e.state for k, e in self.store.ledger.items() if k.row_key == key}


@contextlib.asynccontextmanager
async def running(tmp_path: Path, *, store: MemoryStore | None = None, lease_ttl_s: float = 3.0,
                  reconcile_s: float = 60.0, holder: str = "fast",
                  env: dict[str, str] | None = None) -> AsyncIterator[Running]:
    ruleset = load_rules({**SCALE, **(env or {})})
    settings = Settings(next_public_app_url="https://app.example",
                        email_from="Listener <l@example.com>",
                        support_email="support@example.com",
                        lease_ttl=int(lease_ttl_s * SECOND),
                        reconcile_interval=int(reconcile_s * SECOND))
    backend = memory_backend(ruleset, store=store,
                             max_notify_lateness=settings.max_notify_lateness)
    backend.store.write("auth.users", {"id": CUSTOMER, "email": "carla@example.com"}, 0)
    backend.store.write("profiles", {"id": CUSTOMER, "full_name": "Carla Customer"}, 0)
    results = Results()
    outbox = CountingOutbox(tmp_path)
    stop = asyncio.Event()
    async with assemble(settings, ruleset, backend=backend, sender=outbox,
                        holder=holder, email_rate=1000, shutdown_grace_s=1.0,
                        mailer_options={"base_delay": 0.01, "max_delay": 0.05},
                        on_result=results) as listener:
        task = asyncio.create_task(listener.daemon.run(stop))
        try:
            yield Running(listener, backend, results, outbox)
        finally:
            stop.set()
            await asyncio.wait_for(task, 5)


async def test_a_change_arms_a_timer_that_fires_once(tmp_path: Path) -> None:
    # The support alert alone: the request stays pending after it, so every
    # later look at the row (a change, two sweeps) could fire it again.
    async with running(tmp_path, env={"RULE_REQUEST_EXPIRY": "off"}) as live:
        await live.wait(live.events.active)
        swept = live.events.sweeps
        live.write_request(sid(1))
        await live.results.until(lambda _: live.results.of(sid(1)))
        assert live.events.sweeps == swept, "found by a sweep, not armed by its change"
        # The app changes a column the rules read, the deadline stays where it was.
        live.source.write("sessions", {"id": sid(1), "status": "pending",
                                       "customer_user_id": OTHER_CUSTOMER})
        for _ in range(2):
            swept = live.events.sweeps
            live.source.reconnect()
            await asyncio.wait_for(live.events.swept(swept + 1), WAIT)
        await live.wait(live.events.active)
        await asyncio.sleep(0.2)
        assert [(r.key.rule, r.outcome.value) for r in live.results.of(sid(1))] == [
            ("support_unassigned_alert", "fired")]
        assert live.ledger(sid(1)) == {"support_unassigned_alert": "fired"}
        assert live.store.tables["sessions"][sid(1)]["customer_user_id"] == OTHER_CUSTOMER
        assert list(live.outbox.sent.values()) == [1]  # the support email, once


async def test_a_lost_lease_stands_by_and_fires_nothing_without_the_fence(
        tmp_path: Path) -> None:
    async with running(tmp_path, lease_ttl_s=1.0) as live:  # the shortest lease allowed
        await live.wait(live.events.active)
        # This instance stalls past its lease and another instance takes it.
        holder, token, _ = live.store.lease
        live.store.lease = (holder, token, -math.inf)
        other = await live.store.acquire_lease("other", 60.0)
        assert other == token + 1
        live.write_request(sid(2), minutes_ago=20)  # both actions due at once
        await live.wait(live.events.standing_by)
        assert not live.events.active.is_set() and live.daemon.readiness.role == "standby"
        await asyncio.sleep(0.3)
        assert live.ledger(sid(2)) == {} and live.results.of(sid(2)) == []
        assert live.store.tables["sessions"][sid(2)]["status"] == "pending"
        # The other instance lets go: this one takes over and acts, once, fenced anew.
        await live.store.release_lease(Fence("other", other))
        await live.wait(live.events.active)
        await live.results.until(lambda _: len(live.results.of(sid(2))) == 2)
        assert live.ledger(sid(2)) == {"support_unassigned_alert": "fired",
                                       "request_expiry": "fired"}
        assert {e.token for k, e in live.store.ledger.items() if k.row_key == sid(2)} == {
            other + 1}


async def test_a_reconnect_sweeps_and_finds_a_change_the_source_dropped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Only the sweep may find it: no incremental read within the test.
    monkeypatch.setattr(daemon_module, "CATCH_UP_S", 3600.0)
    async with running(tmp_path) as live:
        await live.wait(live.events.active)
        live.source.drop(sid(3))
        live.write_request(sid(3), minutes_ago=20)
        assert [c.key for c in live.source.lost] == [sid(3)]
        await asyncio.sleep(0.3)
        assert live.results.of(sid(3)) == [], "a dropped change was acted on: proves nothing"
        drift = counter("listener_reconcile_drift_total")
        swept = live.events.sweeps
        live.source.reconnect()
        assert not live.events.active.is_set()  # unsubscribed: not active until swept
        await asyncio.wait_for(live.events.swept(swept + 1), WAIT)
        await live.wait(live.events.active)
        await live.results.until(lambda _: len(live.results.of(sid(3))) == 2)
        assert counter("listener_reconcile_drift_total") == drift + 1
        assert live.ledger(sid(3)) == {"support_unassigned_alert": "fired",
                                       "request_expiry": "fired"}


async def test_a_bad_row_is_counted_and_skipped_while_the_others_fire(tmp_path: Path) -> None:
    async with running(tmp_path) as live:
        await live.wait(live.events.active)
        bad_rows = counter("listener_bad_input_total", kind="row")
        bad_payloads = counter("listener_bad_input_total", kind="memory_payload")
        live.write_request(sid(10))
        live.source.write("sessions", {"id": sid(11), "status": ["pending"],
                                       "customer_user_id": CUSTOMER})
        assert not live.source.push_payload({"type": "UPDATE", "table": "sessions",
                                             "record": {"status": "pending"}})
        live.write_request(sid(12))
        await live.results.until(lambda _: all(len(live.results.of(sid(n))) == 2
                                               for n in (10, 12)))
        assert counter("listener_bad_input_total", kind="row") == bad_rows + 1
        assert counter("listener_bad_input_total", kind="memory_payload") == bad_payloads + 1
        assert live.ledger(sid(11)) == {} and live.results.of(sid(11)) == []
        assert live.daemon.engine.row("sessions", sid(11)) is None


class BuggyStore(MemoryStore):
    """The memory store with a bug in the sweep's read, once, when armed."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.bug_armed = False

    async def tracked_pages(self, table: str, page: int | None = None
                            ) -> AsyncIterator[list[dict[str, Any]]]:
        if self.bug_armed:
            self.bug_armed = False
            raise RuntimeError("injected bug in the sweep")
        async for rows in super().tracked_pages(table, page):
            yield rows


async def test_a_bug_in_the_sweep_is_logged_as_a_bug_and_the_next_sweep_runs(
        tmp_path: Path) -> None:
    store = BuggyStore()
    async with running(tmp_path, store=store, reconcile_s=0.3) as live:
        await live.wait(live.events.active)
        bugs = counter("listener_bugs_total", part="reconcile")
        term = live.daemon.term
        with structlog.testing.capture_logs() as logs:
            store.bug_armed = True
            swept = live.events.sweeps
            await asyncio.wait_for(live.events.swept(swept + 1), WAIT)
        assert not store.bug_armed, "the bug was never hit: proves nothing"
        assert counter("listener_bugs_total", part="reconcile") == bugs + 1
        assert [(e["event"], e.get("part")) for e in logs if e["log_level"] == "error"] == [
            ("bug", "reconcile")]
        # The sweep's part restarted within the term: no new lease term was needed.
        assert live.daemon.term is term
        # A bug is not an outage: the store still reads as reachable, the daemon ready.
        assert live.daemon.readiness.database_reachable
        assert live.daemon.readiness.ready()
        live.write_request(sid(20))
        await live.results.until(lambda _: len(live.results.of(sid(20))) == 2)


class FlakyStore(MemoryStore):
    """The memory store, unavailable while `down` (every call of the port raises
    StoreUnavailable, as the SQL store does when the database is away)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.down = False
        self.refused = 0

    def _check(self, operation: str) -> None:
        if self.down:
            self.refused += 1
            raise StoreUnavailable(f"{operation}: memory store unavailable", operation=operation)

    async def tracked_pages(self, table: str, page: int | None = None
                            ) -> AsyncIterator[list[dict[str, Any]]]:
        self._check("tracked_pages")
        async for rows in super().tracked_pages(table, page):
            yield rows

    async def changed_since(self, *args: Any) -> Any:
        self._check("changed_since")
        return await super().changed_since(*args)

    async def read_row(self, *args: Any) -> Any:
        self._check("read_row")
        return await super().read_row(*args)

    async def fire(self, *args: Any) -> Any:
        self._check("fire")
        return await super().fire(*args)

    async def complete(self, *args: Any, **kwargs: Any) -> Any:
        self._check("complete")
        return await super().complete(*args, **kwargs)

    async def unfinished_claims(self) -> Any:
        self._check("unfinished_claims")
        return await super().unfinished_claims()

    async def renew_lease(self, *args: Any) -> Any:
        self._check("renew_lease")
        return await super().renew_lease(*args)


async def eventually(check: Callable[[], bool], timeout: float = WAIT) -> None:
    """For readiness, which has facts but no events."""
    async def wait() -> None:
        while not check():
            await asyncio.sleep(0.01)
    await asyncio.wait_for(wait(), timeout)


async def test_an_unavailable_store_reads_unreachable_and_the_daemon_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(daemon_module, "GIVE_BACK_TRANSIENT_S", 0.1)
    store = FlakyStore()
    async with running(tmp_path, store=store, reconcile_s=0.2) as live:
        await live.wait(live.events.active)
        readiness = live.daemon.readiness
        store.down = True
        live.write_request(sid(30), minutes_ago=20)  # the change arrives; acting on it fails
        await eventually(lambda: not readiness.database_reachable)
        assert not readiness.ready() and "memory store unavailable" in readiness.last_store_error
        await asyncio.sleep(0.3)
        assert live.ledger(sid(30)) == {} and store.refused > 1
        swept = live.events.sweeps
        store.down = False
        await asyncio.wait_for(live.events.swept(swept + 1), WAIT)
        await eventually(lambda: readiness.database_reachable and readiness.ready())
        await live.results.until(lambda _: live.results.of(sid(30), "request_expiry"))
        # Whichever action was given back first: once the request has expired the
        # support alert is no longer owed, so it fired once or not at all.
        assert live.ledger(sid(30))["request_expiry"] == "fired"
        assert live.store.tables["sessions"][sid(30)]["status"] == "expired"
        assert len(live.results.of(sid(30))) == len(live.ledger(sid(30)))
        assert live.daemon.readiness.role == "active"


class PageSizeStore(MemoryStore):
    """The memory store, noting the page size each sweep asks for."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sweeps_done = lambda: 0
        self.asked: list[tuple[int, int | None]] = []

    async def tracked_pages(self, table: str, page: int | None = None
                            ) -> AsyncIterator[list[dict[str, Any]]]:
        self.asked.append((self.sweeps_done(), page))
        async for rows in super().tracked_pages(table, page):
            yield rows


async def test_sweeps_after_the_first_read_small_pages(tmp_path: Path) -> None:
    # Each page is decoded in one go on the event loop: later sweeps, when timers
    # are due, read small ones; the first (start-up) reads the store's large ones.
    store = PageSizeStore()
    async with running(tmp_path, store=store, reconcile_s=0.3) as live:
        store.sweeps_done = lambda: live.events.sweeps
        await live.wait(live.events.active)
        await asyncio.wait_for(live.events.swept(3), WAIT)
    first = {page for sweeps, page in store.asked if sweeps == 0}
    later = {page for sweeps, page in store.asked if 0 < sweeps < 3}
    assert first == {None}
    assert later == {daemon_module.STEADY_SWEEP_PAGE}


async def test_the_incremental_read_skips_rows_memory_forgot_at_the_same_version(
        tmp_path: Path) -> None:
    # A row that owes nothing is forgotten; the incremental read meets it again
    # (every changed row, tracked or not) and must not parse and arm it anew.
    async with running(tmp_path) as live:
        await live.wait(live.events.active)
        term = live.daemon.term
        live.source.write("sessions", {"id": sid(30), "status": "cancelled",
                                       "customer_user_id": CUSTOMER})
        engine = live.daemon.engine
        for _ in range(100):
            if engine.seen_version("sessions", sid(30)) is not None:
                break
            await asyncio.sleep(0.01)
        assert engine.row("sessions", sid(30)) is None, "owes nothing: forgotten"
        assert engine.seen_version("sessions", sid(30)) is not None
        applied: list[str] = []
        upsert = term._upsert

        def counting(table: str, key: str, row: Any) -> int:
            applied.append(key)
            return upsert(table, key, row)

        term._upsert = counting  # type: ignore[method-assign]
        await term.catch_up()
        assert sid(30) not in applied
        # A version memory has not seen is applied.
        live.store.write("sessions", {"id": sid(30), "status": "pending",
                                      "customer_user_id": CUSTOMER}, live.store.clock.now())
        await term.catch_up()
        assert sid(30) in applied
