"""Acting on a due timer: re-read, re-check, claim, change status, email, record.

The same code runs under replay (in-memory store, no mailer, virtual clock)
and in the live daemon (SQL or RPC store, outbox or Resend, wall clock).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import logging

import structlog

from listener import logs, metrics
from listener.clock import Clock
from listener.effects import ActionEvent, EventPublisher
from listener.engine import FIRE, LATE, SKIP, Decision, Engine, Timer
from listener.instants import format_instant
from listener.sessions import BadRow, parse_row
from listener.store import (
    APPLIED, CLAIMED, FENCED, MISSING, ActionKey, Fence, Fenced, Store, UnfinishedClaim)

log = structlog.get_logger("listener.action")

MAX_CAS_ATTEMPTS = 3


@dataclass(slots=True)
class ActionResult:
    key: ActionKey
    fired_at: int
    outcome: str  # fired | late | skipped | failed
    status: str | None = None
    reason: str | None = None
    recipients: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def lateness_ms(self) -> int:
        return (self.fired_at - self.key.due_at) // 1000


class Deliverer:
    """Sends an action's emails; returns per-recipient errors (empty when all went)."""

    async def deliver(self, key: ActionKey, recipients: tuple[str, ...],
                      row: dict[str, Any]) -> dict[str, str]:
        raise NotImplementedError


class Executor:
    def __init__(self, engine: Engine, store: Store, clock: Clock, fence: Fence, *,
                 deliverer: Deliverer | None = None, publisher: EventPublisher | None = None,
                 on_result: Callable[[ActionResult], None] | None = None,
                 background: Callable[[Awaitable[None]], Any] | None = None) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self.fence = fence
        self.deliverer = deliverer
        self.publisher = publisher
        self.on_result = on_result
        # Email delivery may be slow (rate limit, retries): live, it runs in the
        # background so status changes of other sessions never wait for it.
        self._background = background
        # Claims being worked on by this process: not "unfinished", whatever the ledger says.
        self.in_flight: set[ActionKey] = set()

    async def run(self, timer: Timer, fired_at: int,
                  resumed: UnfinishedClaim | None = None) -> ActionResult | None:
        """Act on one popped timer (or a claim a crash left unfinished). Returns the
        recorded result, or None when the guard failed or it was already done."""
        try:
            return await self._run(timer, fired_at, resumed)
        except Fenced:
            raise
        except Exception as exc:  # noqa: BLE001 - one action's failure must not stop the loop
            # Give the timer back: the next reconcile re-arms it (catch-up), and
            # the ledger claim, if made, is retried as unfinished.
            self.engine.release(timer)
            log.error("action_error", rule=timer.rule.name, session_id=timer.session_id,
                      due_at=format_instant(timer.due), error=repr(exc))
            return None

    async def resume(self, unfinished: UnfinishedClaim) -> ActionResult | None:
        """Finish a claim left `claimed` by a crash, a lost lease or a failed call."""
        key = unfinished.key
        if key in self.in_flight:
            return None
        index = next((i for i, r in enumerate(self.engine.rules) if r.name == key.rule), None)
        if index is None:
            claim = await self.store.claim(key, self.fence, self.clock.now())
            if claim.outcome != CLAIMED:
                return None
            return await self._finish(key, self.clock.now(), SKIP,
                                      detail={"why": "rule no longer enabled"})
        timer = Timer(self.engine.rules[index], index, key.session_id, key.due_at)
        return await self.run(timer, unfinished.fired_at or self.clock.now(), unfinished)

    async def _run(self, timer: Timer, fired_at: int,
                   resumed: UnfinishedClaim | None) -> ActionResult | None:
        engine, rule, sid = self.engine, timer.rule, timer.session_id
        key = ActionKey(rule.name, sid, timer.due)
        row = await self.store.read_session(sid)
        state = None
        if row is not None:
            state, _ = parse_row(row, engine.sessions.get(sid), fired_at)
        holds = state is not None and engine.holds(timer, state)
        if not holds and resumed is None:
            # Memory was behind the database; the fresh row re-arms what is owed.
            engine.release(timer)
            if row is None:
                engine.delete(sid)
            else:
                engine.upsert(row, fired_at)
            log.debug("timer_dropped", rule=rule.name, session_id=sid, why="guard failed")
            return None
        decision = engine.decide(timer, state, fired_at) if state is not None else None
        self.in_flight.add(key)
        try:
            claim = await self.store.claim(key, self.fence, fired_at)
            if claim.outcome == FENCED:
                engine.release(timer)
                raise Fenced(self.fence)
            if claim.outcome != CLAIMED:
                log.debug("already_done", rule=rule.name, session_id=sid)
                return None
            if decision is None or not (holds or claim.status_applied):
                # Resumed after the row moved on, its status change never made.
                return await self._finish(key, self.clock.now(), SKIP,
                                          detail={"why": "row moved on", "now": row and
                                                  row.get("status") or "deleted"})
            return await self._act(timer, key, decision, claim.status_applied, row, fired_at)
        finally:
            self.in_flight.discard(key)

    async def _act(self, timer: Timer, key: ActionKey, decision: Decision, status_applied: bool,
                   row: dict[str, Any], fired_at: int) -> ActionResult | None:
        rule = timer.rule
        fired_at = max(fired_at, self.clock.now())  # lateness includes the claim
        if decision.outcome == SKIP:
            return await self._finish(key, fired_at, SKIP, detail={"why": decision.detail})
        status = reason = None
        if rule.set_status is not None:
            if not status_applied:
                moved = await self._change_status(timer, key, row, fired_at)
                if moved is not None:
                    return await self._finish(key, fired_at, SKIP, detail=moved)
            status, reason = rule.set_status.status, rule.set_status.reason
        if decision.outcome == FIRE and decision.recipients and self.deliverer is not None:
            work = self._deliver_and_finish(key, fired_at, decision, status, reason, row)
            if self._background is not None:
                self.in_flight.add(key)
                self._background(self._tracked(key, work))
                return None
            return await work
        outcome = LATE if decision.outcome == LATE else FIRE
        return await self._finish(key, fired_at, outcome, status, reason, decision.recipients,
                                  {"why": decision.detail} if decision.detail else {})

    async def _tracked(self, key: ActionKey, work: Awaitable[ActionResult]) -> None:
        try:
            await work
        finally:
            self.in_flight.discard(key)

    async def _change_status(self, timer: Timer, key: ActionKey, row: dict[str, Any],
                             at: int) -> dict[str, Any] | None:
        """Compare-and-set the rule's status. None when applied, else why not."""
        change = timer.rule.set_status
        assert change is not None
        expected = sorted(timer.rule.when.statuses)
        for _ in range(MAX_CAS_ATTEMPTS):
            result = await self.store.transition(key, self.fence, expected, row.get("_version"),
                                                 change.status, change.reason, at)
            if result.outcome == APPLIED:
                self.engine.upsert(result.row, at)
                return None
            if result.outcome == FENCED:
                raise Fenced(self.fence)
            if result.outcome == MISSING or result.row is None:
                self.engine.delete(key.session_id)
                return {"why": "row moved on", "now": "deleted"}
            # The row changed under us. Still owed with the same due? Try again.
            row = result.row
            try:
                state, _ = parse_row(row, self.engine.sessions.get(key.session_id), at)
            except BadRow:
                return {"why": "row moved on", "now": "unreadable"}
            self.engine.upsert(row, at)
            if not self.engine.holds(timer, state):
                return {"why": "row moved on", "now": state.status}
        return {"why": "row kept changing", "now": row.get("status")}

    async def _deliver_and_finish(self, key: ActionKey, fired_at: int, decision: Decision,
                                  status: str | None, reason: str | None,
                                  row: dict[str, Any]) -> ActionResult:
        assert self.deliverer is not None
        try:
            errors = await self.deliverer.deliver(key, decision.recipients, row)
        except Exception as exc:  # noqa: BLE001 - recorded as failed, never dropped
            errors = {"all": repr(exc)}
        outcome = "failed" if errors else FIRE
        detail = {"email_errors": errors} if errors else {}
        return await self._finish(key, fired_at, outcome, status, reason, decision.recipients,
                                  detail)

    async def _finish(self, key: ActionKey, fired_at: int, outcome: str, status: str | None = None,
                      reason: str | None = None, recipients: tuple[str, ...] = (),
                      detail: dict[str, Any] | None = None) -> ActionResult:
        detail = dict(detail or {})
        if recipients:
            detail["recipients"] = list(recipients)
        result = ActionResult(key, fired_at, outcome, status, reason, recipients, detail)
        recorded = await self.store.complete(key, self.fence, outcome, fired_at,
                                             result.lateness_ms, detail)
        if not recorded:
            log.warning("complete_fenced", rule=key.rule, session_id=key.session_id)
        self.report(result)
        return result

    def report(self, result: ActionResult) -> None:
        key = result.key
        event = ActionEvent(key.rule, key.session_id, format_instant(key.due_at),
                            format_instant(result.fired_at), result.lateness_ms, result.outcome,
                            result.status, result.reason, result.detail)
        if result.outcome == "failed":
            log.warning("action", **event.as_dict())
        elif logs.enabled(logging.INFO):
            log.info("action", **event.as_dict())
        metrics.action_counter(key.rule, result.outcome).inc()
        metrics.FIRING_LATENESS.observe(max(0, result.fired_at - key.due_at) / 1e6)
        if self.publisher is not None:
            self.publisher.publish(event)
        if self.on_result is not None:
            self.on_result(result)
