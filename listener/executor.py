"""Acting on a due timer: check the row is as decided, claim, change the status,
email, record.

The same code runs under replay (in-memory store, no mailer, virtual clock)
and in the live daemon (SQL or RPC store, outbox or Resend, wall clock). The
store's `fire` does the version check, the claim, the compare-and-set and, when
no email follows, the completion in one transaction: one round trip per action.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import structlog

from listener import logs, metrics
from listener.clock import Clock
from listener.effects import ActionEvent, EventPublisher
from listener.engine import FIRE, LATE, SKIP, Decision, Engine, Timer
from listener.instants import format_instant
from listener.sessions import BadRow, SessionState, parse_row
from listener.store import (
    CLAIMED, CONFLICT, DONE, FENCED, MISSING, STALE, ActionKey, Fence, Fenced, FireRequest,
    Store, UnfinishedClaim)

log = structlog.get_logger("listener.action")

# The row may change between deciding and acting; re-decide this many times.
MAX_STALE_RETRIES = 3


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
        self._emailing: set[ActionKey] = set()

    async def run(self, timer: Timer, fired_at: int,
                  resumed: UnfinishedClaim | None = None) -> ActionResult | None:
        """Act on one popped timer (or a claim a crash left unfinished). Returns the
        recorded result, or None when nothing was owed or it was already done."""
        key = ActionKey(timer.rule.name, timer.session_id, timer.due)
        if key in self.in_flight:
            # Already being acted on here (a resumed claim, or its emails still
            # waiting their turn): claiming it again would run it twice.
            return None
        self.in_flight.add(key)
        try:
            return await self._run(timer, key, fired_at, resumed)
        except Fenced:
            self.engine.release(timer)
            raise
        except Exception as exc:  # noqa: BLE001 - one action's failure must not stop the loop
            # Give the timer back: the next reconcile re-arms it (catch-up), and
            # the ledger claim, if made, is resumed as unfinished.
            self.engine.release(timer)
            log.error("action_error", rule=timer.rule.name, session_id=timer.session_id,
                      due_at=format_instant(timer.due), error=repr(exc))
            return None
        finally:
            if key not in self._emailing:
                self.in_flight.discard(key)

    async def resume(self, unfinished: UnfinishedClaim) -> ActionResult | None:
        """Finish a claim left `claimed` by a crash, a lost lease or a failed call."""
        key = unfinished.key
        if key in self.in_flight:
            return None
        index = next((i for i, r in enumerate(self.engine.rules) if r.name == key.rule), None)
        if index is None:
            fired = await self.store.fire(FireRequest(
                key, self.clock.now(), finish=SKIP, detail={"why": "rule no longer enabled"}),
                self.fence)
            return None if fired.outcome != CLAIMED else self._report(
                ActionResult(key, self.clock.now(), SKIP, detail={"why": "rule disabled"}))
        timer = Timer(self.engine.rules[index], index, key.session_id, key.due_at)
        return await self.run(timer, unfinished.fired_at or self.clock.now(), unfinished)

    async def _current(self, sid: str, at: int) -> tuple[dict[str, Any] | None,
                                                          SessionState | None]:
        """The row as the database has it now, parsed."""
        row = await self.store.read_session(sid)
        if row is None:
            return None, None
        try:
            state, _ = parse_row(row, self.engine.sessions.get(sid), at)
        except BadRow:
            return row, None
        return row, state

    async def _run(self, timer: Timer, key: ActionKey, fired_at: int,
                   resumed: UnfinishedClaim | None) -> ActionResult | None:
        engine, rule, sid = self.engine, timer.rule, timer.session_id
        state = engine.sessions.get(sid)
        row: dict[str, Any] | None = None
        if resumed is not None or state is None or state.version is None:
            # Memory does not know the row's version (a source that does not
            # carry it, or a resumed claim): read it, the guard goes by that.
            row, state = await self._current(sid, fired_at)
            if state is None or not engine.holds(timer, state):
                if resumed is not None:
                    return await self._resume_moved_on(timer, key, fired_at, resumed, row, state)
                self._forget(timer, row, fired_at)
                return None
        for _ in range(MAX_STALE_RETRIES):
            decision = engine.decide(timer, state, fired_at)
            request = self._request(key, decision, state.version, fired_at)
            answer = await self.store.fire(request, self.fence)
            if answer.outcome == FENCED:
                raise Fenced(self.fence)
            if answer.outcome == MISSING:
                engine.delete(sid)
                return None
            if answer.outcome == DONE:
                log.debug("already_done", rule=rule.name, session_id=sid)
                return None
            if answer.outcome == STALE:
                # The row changed after memory saw it: decide again on the row as it is.
                row = answer.row or {}
                try:
                    state, _ = parse_row(row, engine.sessions.get(sid), fired_at)
                except BadRow:
                    return await self._moved_on(key, fired_at, "unreadable")
                engine.upsert(row, fired_at)
                if not engine.holds(timer, state):
                    return await self._moved_on(key, fired_at, state.status)
                continue
            if answer.outcome == CONFLICT:
                return await self._moved_on(key, fired_at, (answer.row or {}).get("status"))
            return await self._after_claim(timer, key, decision, request, answer.row or row or {},
                                           answer.status_applied)
        return await self._moved_on(key, fired_at, "kept changing")

    def _request(self, key: ActionKey, decision: Decision, version: str | None,
                 fired_at: int) -> FireRequest:
        rule = decision.timer.rule
        change = rule.set_status if decision.outcome != SKIP else None
        emails = decision.outcome == FIRE and decision.recipients and self.deliverer is not None
        finish = None if emails else decision.outcome
        detail: dict[str, Any] = {}
        if decision.detail:
            detail["why"] = decision.detail
        if decision.recipients and not emails:
            detail["recipients"] = list(decision.recipients)
        at = max(fired_at, self.clock.now())  # lateness includes the time to get here
        return FireRequest(
            key, at, version, tuple(sorted(rule.when.statuses)) if change else None,
            change.status if change else None, change.reason if change else None,
            finish, None if finish is None else (at - key.due_at) // 1000, detail)

    async def _after_claim(self, timer: Timer, key: ActionKey, decision: Decision,
                           request: FireRequest, row: dict[str, Any],
                           status_applied: bool) -> ActionResult | None:
        change = timer.rule.set_status if decision.outcome != SKIP else None
        if change is not None and row:
            try:
                self.engine.upsert(row, request.fired_at)
            except BadRow:
                pass
        status = change.status if change and status_applied else None
        reason = change.reason if status else None
        if request.finish is not None:
            return self._report(ActionResult(key, request.fired_at, request.finish, status, reason,
                                             decision.recipients, request.detail or {}))
        work = self._deliver_and_finish(key, request.fired_at, decision, status, reason, row)
        if self._background is not None:
            self._emailing.add(key)
            self._background(self._tracked(key, work))
            return None
        return await work

    async def _tracked(self, key: ActionKey, work: Awaitable[ActionResult]) -> None:
        try:
            await work
        finally:
            self._emailing.discard(key)
            self.in_flight.discard(key)

    async def _resume_moved_on(self, timer: Timer, key: ActionKey, fired_at: int,
                               resumed: UnfinishedClaim, row: dict[str, Any] | None,
                               state: SessionState | None) -> ActionResult | None:
        """A resumed claim whose rule no longer holds: if its status change was
        made (that is why it no longer holds), finish the emails; else skip it."""
        if not resumed.status_applied or state is None:
            return await self._moved_on(key, fired_at, (row or {}).get("status"))
        decision = self.engine.decide(timer, state, fired_at)
        request = self._request(key, decision, None, fired_at)
        answer = await self.store.fire(request, self.fence)
        if answer.outcome == FENCED:
            raise Fenced(self.fence)
        if answer.outcome != CLAIMED:
            return None
        return await self._after_claim(timer, key, decision, request, row or {}, True)

    async def _moved_on(self, key: ActionKey, fired_at: int,
                        now_status: str | None) -> ActionResult | None:
        """Record that the row moved on before the action: skipped, nothing changed."""
        detail = {"why": "row moved on", "now": now_status or "deleted"}
        answer = await self.store.fire(FireRequest(key, max(fired_at, self.clock.now()),
                                                   finish=SKIP, detail=detail), self.fence)
        if answer.outcome == FENCED:
            raise Fenced(self.fence)
        if answer.outcome != CLAIMED:
            return None
        return self._report(ActionResult(key, max(fired_at, self.clock.now()), SKIP,
                                         detail=detail))

    def _forget(self, timer: Timer, row: dict[str, Any] | None, at: int) -> None:
        """Memory was behind the database; the fresh row re-arms what is owed."""
        self.engine.release(timer)
        if row is None:
            self.engine.delete(timer.session_id)
        else:
            try:
                self.engine.upsert(row, at)
            except BadRow:
                pass
        log.debug("timer_dropped", rule=timer.rule.name, session_id=timer.session_id)

    async def _deliver_and_finish(self, key: ActionKey, fired_at: int, decision: Decision,
                                  status: str | None, reason: str | None,
                                  row: dict[str, Any]) -> ActionResult:
        assert self.deliverer is not None
        try:
            errors = await self.deliverer.deliver(key, decision.recipients, row)
        except Exception as exc:  # noqa: BLE001 - recorded as failed, never dropped
            errors = {"all": repr(exc)}
        outcome = "failed" if errors else FIRE
        detail: dict[str, Any] = {"recipients": list(decision.recipients)}
        if errors:
            detail["email_errors"] = errors
        result = ActionResult(key, fired_at, outcome, status, reason, decision.recipients, detail)
        recorded = await self.store.complete(key, self.fence, outcome, fired_at,
                                             result.lateness_ms, detail)
        if not recorded:
            log.warning("complete_fenced", rule=key.rule, session_id=key.session_id)
        return self._report(result)

    def _report(self, result: ActionResult) -> ActionResult:
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
        return result


__all__ = ["ActionResult", "Deliverer", "Executor", "FIRE", "LATE", "SKIP"]
