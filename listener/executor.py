"""Acting on a due timer: check the row is as decided, claim, change the status,
email, call the app's webhook, record.

The same code runs under replay (in-memory store, no effects, virtual clock)
and in the live daemon (SQL or RPC store, outbox or Resend, wall clock). The
store's `fire` does the version check, the claim, the compare-and-set and, when
no effect follows, the completion in one transaction: one round trip per action.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import structlog

from listener import logs, metrics
from listener.clock import Clock
from listener.effects import ActionEvent, EventPublisher, WebhookPort
from listener.engine import Decision, Engine, Timer
from listener.errors import is_transient
from listener.retry import retrying
from listener.instants import format_instant
from listener.rows import BadRow, RowState
from listener.rules.model import Outcome, Rule
from listener.store import (
    CLAIMED, CONFLICT, DONE, FENCED, MISSING, STALE, ActionKey, Fence, Fenced, FireRequest,
    Store, UnfinishedClaim)

log = structlog.get_logger("listener.action")

# The row may change between deciding and acting; re-decide this many times.
MAX_STALE_RETRIES = 3
# Reads and completions that meet an unavailable database are retried (they are
# safe to repeat); a claim is not: its answer may be lost after it committed,
# and the ledger, read by the next sweep, says what happened.
STORE_ATTEMPTS = 5
STORE_GIVE_UP_S = 30.0
# Timeline levels the app's session_logs accepts, by outcome.
TIMELINE_LEVEL = {Outcome.FIRED: "info", Outcome.LATE: "warn", Outcome.FAILED: "error"}
# An outcome's text without the enum's value property (a Python call).
OUTCOME_TEXT = {outcome: outcome.value for outcome in Outcome}


@dataclass(slots=True)
class ActionResult:
    key: ActionKey
    fired_at: int
    outcome: Outcome
    status: str | None = None
    reason: str | None = None
    recipients: tuple[str, ...] = ()
    detail: dict[str, Any] = field(default_factory=dict)
    webhook: str | None = None  # the event the app was told, if any

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
                 webhooks: WebhookPort | None = None,
                 on_result: Callable[[ActionResult], None] | None = None,
                 background: Callable[[Awaitable[None]], Any] | None = None,
                 timeline: bool = True,
                 give_back: Callable[[Timer, BaseException], None] | None = None,
                 metered: bool = True) -> None:
        self.engine = engine
        self.store = store
        self.clock = clock
        self.fence = fence
        self.deliverer = deliverer
        if deliverer is not None and hasattr(deliverer, "fence"):
            deliverer.fence = fence  # emails of this term are recorded under its fence
        self.publisher = publisher
        self.webhooks = webhooks
        self.on_result = on_result
        # Whether actions write the app's timeline rows (replay has no app to show them to).
        self.timeline = timeline
        # What to do with a timer whose action raised: live, the daemon gives it
        # back to the engine after a delay (a hot loop otherwise: the timer is
        # due, so it would be popped and fail again at once) and sweeps again.
        # Without it (replay) the episode is left as it is: a bug is reported once.
        self.give_back = give_back
        # Whether actions count in the process's metrics (replay serves no /metrics).
        self.metered = metered
        self._messages: dict[tuple[str, Outcome], str] = {}
        # Per rule, the statuses its compare-and-set accepts, in a stable order.
        self._expected: dict[str, tuple[str, ...]] = {}
        # Emails and webhooks may be slow (rate limits, retries): live, they run
        # in the background so the status changes of other rows never wait.
        self._background = background
        # Claims being worked on by this process: not "unfinished", whatever the ledger says.
        self.in_flight: set[ActionKey] = set()
        self._effecting: set[ActionKey] = set()

    async def run(self, timer: Timer, fired_at: int,
                  resumed: UnfinishedClaim | None = None) -> ActionResult | None:
        """Act on one popped timer (or a claim a crash left unfinished). Returns the
        recorded result, or None when nothing was owed or it was already done."""
        key = ActionKey(timer.rule.name, timer.table, timer.key, timer.due)
        if key in self.in_flight:
            # Already being acted on here (a resumed claim, or its effects still
            # waiting their turn): claiming it again would run it twice.
            return None
        self.in_flight.add(key)
        try:
            return await self._run(timer, key, fired_at, resumed)
        except Fenced:
            self.engine.release(timer)
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - one action's failure must not stop the loop
            # The ledger claim, if made, stays unfinished and is resumed by a sweep;
            # the timer is given back later.
            if self.give_back is not None:
                self.give_back(timer, exc)
            if is_transient(exc):
                log.warning("action_deferred", rule=timer.rule.name, table=timer.table,
                            row_id=timer.key, due_at=format_instant(timer.due),
                            error=str(exc)[:300])
            else:
                metrics.BUGS.labels("action").inc()
                log.exception("action_error", rule=timer.rule.name, table=timer.table,
                              row_id=timer.key, due_at=format_instant(timer.due),
                              error=repr(exc)[:300])
            return None
        finally:
            if key not in self._effecting:
                self.in_flight.discard(key)
                self.engine.settle(timer.table, timer.key)

    async def resume(self, unfinished: UnfinishedClaim) -> ActionResult | None:
        """Finish a claim left `claimed` by a crash, a lost lease or a failed call."""
        key = unfinished.key
        if key in self.in_flight:
            return None
        index = next((i for i, r in enumerate(self.engine.rules) if r.name == key.rule), None)
        if index is None or self.engine.rules[index].table != key.table:
            now = self.clock.now()
            fired = await self.store.fire(FireRequest(
                key, now, finish=Outcome.SKIPPED.value, lateness_ms=(now - key.due_at) // 1000,
                detail={"why": "rule no longer enabled"}), self.fence)
            return None if fired.outcome != CLAIMED else self._report(
                ActionResult(key, now, Outcome.SKIPPED, detail={"why": "rule disabled"}))
        timer = Timer(self.engine.rules[index], index, key.table, key.row_key, key.due_at)
        return await self.run(timer, unfinished.fired_at or self.clock.now(), unfinished)

    async def _current(self, table: str, key: str,
                       at: int) -> tuple[dict[str, Any] | None, RowState | None]:
        """The row as the database has it now, parsed."""
        row = await self._retried(lambda: self.store.read_row(table, key), "read_row")
        if row is None:
            return None, None
        try:
            return row, self.engine.parse(table, row, at)
        except BadRow:
            return row, None

    async def _run(self, timer: Timer, key: ActionKey, fired_at: int,
                   resumed: UnfinishedClaim | None) -> ActionResult | None:
        engine, table, row_key = self.engine, timer.table, timer.key
        state = engine.row(table, row_key)
        row: dict[str, Any] | None = None
        if resumed is not None or state is None or state._version is None:
            # Memory does not know the row's version (a source that does not
            # carry it, or a resumed claim): read it, the guard goes by that.
            row, state = await self._current(table, row_key, fired_at)
            if state is None or not engine.holds(timer, state):
                if resumed is not None:
                    return await self._resume_moved_on(timer, key, fired_at, resumed, row, state)
                self._forget(timer, row, fired_at)
                return None
        for _ in range(MAX_STALE_RETRIES):
            decision = engine.decide(timer, state, fired_at)
            request = self._request(key, decision, state._version, fired_at)
            answer = await self.store.fire(request, self.fence)
            outcome = answer.outcome
            if outcome is CLAIMED:  # nearly every answer: the rest are checked after it
                return await self._after_claim(timer, key, decision, request,
                                               answer.row or row or {}, answer.status_applied)
            if outcome == FENCED:
                raise Fenced(self.fence)
            if outcome == MISSING:
                engine.delete(table, row_key)
                return None
            if outcome == DONE:
                log.debug("already_done", rule=timer.rule.name, table=table, row_id=row_key)
                return None
            if outcome == STALE:
                # The row changed after memory saw it: decide again on the row as it is.
                row = answer.row or {}
                try:
                    state = engine.parse(table, row, fired_at)
                except BadRow:
                    return await self._moved_on(key, fired_at, "unreadable")
                engine.upsert(table, row, fired_at)
                if not engine.holds(timer, state):
                    return await self._moved_on(
                        key, fired_at, row.get(engine.tables[table].codec.status))
                continue
            if outcome == CONFLICT:
                status_column = engine.tables[table].codec.status
                return await self._moved_on(key, fired_at, (answer.row or {}).get(status_column))
            return await self._after_claim(timer, key, decision, request, answer.row or row or {},
                                           answer.status_applied)
        return await self._moved_on(key, fired_at, "kept changing")

    def _effects(self, rule: Rule, decision: Decision) -> tuple[bool, bool]:
        """(emails follow, webhook follows) for this decision."""
        emails = bool(decision.outcome is Outcome.FIRED and decision.recipients
                      and self.deliverer is not None)
        webhook = bool(rule.webhook and decision.outcome is not Outcome.SKIPPED
                       and self.webhooks is not None)
        return emails, webhook

    def _request(self, key: ActionKey, decision: Decision, version: str | None,
                 fired_at: int) -> FireRequest:
        rule = decision.timer.rule
        outcome = decision.outcome
        acting = outcome is not Outcome.SKIPPED
        # _effects, inlined: asked once per action.
        emails = (outcome is Outcome.FIRED and decision.recipients
                  and self.deliverer is not None)
        webhook = rule.webhook and acting and self.webhooks is not None
        finish = None if emails or webhook else outcome
        detail: dict[str, Any] = {}
        if decision.detail:
            detail["why"] = decision.detail
        if decision.recipients and not emails:
            detail["recipients"] = list(decision.recipients)
        if rule.webhook and not webhook and acting:
            detail["webhook"] = {"event": rule.webhook, "sent": False,
                                 "why": "no WEBHOOK_URL"}
        now = self.clock.now()
        at = now if now > fired_at else fired_at  # lateness includes the time to get here
        lateness_ms = (at - key.due_at) // 1000
        changes = rule.set_status is not None and acting
        expected = None
        if changes:
            expected = self._expected.get(rule.name)
            if expected is None:
                expected = self._expected[rule.name] = tuple(sorted(rule.statuses))
        return FireRequest(
            key, at, version, expected,
            rule.set_status if changes else None, rule.reason if changes else None,
            None if finish is None else OUTCOME_TEXT[finish],
            None if finish is None else lateness_ms, detail,
            dict(rule.set_columns) if rule.set_columns and acting else None,
            None if finish is None or not self.timeline
            else self._timeline(rule, key, finish, at, detail))

    def _timeline(self, rule: Rule, key: ActionKey, outcome: Outcome, at: int,
                  detail: dict[str, Any]) -> dict[str, Any] | None:
        """The app's timeline row for an action taken (not for one skipped)."""
        if not self.timeline:
            return None
        table = self.engine.ruleset.tables.get(key.table)
        level = TIMELINE_LEVEL.get(outcome)
        if table is None or table.timeline is None or level is None:
            return None
        event = rule.event or f"session.listener.{rule.name}"
        message = self._messages.get((rule.name, outcome))
        if message is None:
            what = rule.describe_actions()
            message = self._messages[(rule.name, outcome)] = (
                f"listener: {rule.name} {outcome.value}" + (f" ({what})" if what != "none" else ""))
        return {"table": table.timeline, "row": {
            "level": level, "event": event, "message": message, "session_id": key.row_key,
            "metadata": {"source": "listener", "rule": rule.name, "outcome": outcome.value,
                         "due_at": format_instant(key.due_at), "fired_at": format_instant(at),
                         "lateness_ms": (at - key.due_at) // 1000, **detail}}}

    async def _after_claim(self, timer: Timer, key: ActionKey, decision: Decision,
                           request: FireRequest, row: dict[str, Any],
                           status_applied: bool) -> ActionResult | None:
        rule = timer.rule
        if (rule.set_status or rule.set_columns) and row:
            try:
                self.engine.upsert(timer.table, row, request.fired_at)
            except BadRow:
                pass
        status = rule.set_status if rule.set_status and status_applied else None
        reason = rule.reason if status else None
        if request.finish is not None:
            # Finished in the claim: the outcome is the decision's (see _request).
            return self._report(ActionResult(key, request.fired_at, decision.outcome,
                                             status, reason, decision.recipients,
                                             request.detail or {}))
        work = self._effect_and_finish(key, rule, request.fired_at, decision, status, reason, row)
        if self._background is not None:
            self._effecting.add(key)
            self._background(self._tracked(key, work))
            return None
        return await work

    async def _tracked(self, key: ActionKey, work: Awaitable[ActionResult]) -> None:
        try:
            await work
        finally:
            self._effecting.discard(key)
            self.in_flight.discard(key)
            self.engine.settle(key.table, key.row_key)

    async def _resume_moved_on(self, timer: Timer, key: ActionKey, fired_at: int,
                               resumed: UnfinishedClaim, row: dict[str, Any] | None,
                               state: RowState | None) -> ActionResult | None:
        """A resumed claim whose rule no longer holds: if its status change was
        made (that is why it no longer holds), finish the effects; else skip it."""
        if not resumed.status_applied or state is None:
            status_column = self.engine.tables[timer.table].codec.status
            return await self._moved_on(key, fired_at, (row or {}).get(status_column))
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
        at = max(fired_at, self.clock.now())
        detail = {"why": "row moved on", "now": now_status or "deleted"}
        answer = await self.store.fire(FireRequest(
            key, at, finish=Outcome.SKIPPED.value, lateness_ms=(at - key.due_at) // 1000,
            detail=detail), self.fence)
        if answer.outcome == FENCED:
            raise Fenced(self.fence)
        if answer.outcome != CLAIMED:
            return None
        return self._report(ActionResult(key, at, Outcome.SKIPPED, detail=detail))

    def _forget(self, timer: Timer, row: dict[str, Any] | None, at: int) -> None:
        """Memory was behind the database; the fresh row re-arms what is owed."""
        self.engine.release(timer)
        if row is None:
            self.engine.delete(timer.table, timer.key)
        else:
            try:
                self.engine.upsert(timer.table, row, at)
            except BadRow:
                pass
        log.debug("timer_dropped", rule=timer.rule.name, table=timer.table, row_id=timer.key)

    async def _effect_and_finish(self, key: ActionKey, rule: Rule, fired_at: int,
                                 decision: Decision, status: str | None, reason: str | None,
                                 row: dict[str, Any]) -> ActionResult:
        emails, webhook = self._effects(rule, decision)
        detail: dict[str, Any] = {}
        if decision.detail:
            detail["why"] = decision.detail
        failed = False
        if emails:
            assert self.deliverer is not None
            try:
                errors = await self.deliverer.deliver(key, decision.recipients, row)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - recorded as failed, never dropped
                errors = {"all": repr(exc)}
            detail["recipients"] = list(decision.recipients)
            if errors:
                detail["email_errors"] = errors
                failed = True
        if webhook:
            from listener.webhooks import WebhookEvent, key_columns

            assert self.webhooks is not None and rule.webhook is not None
            event = WebhookEvent.of_action(
                key, rule.webhook, fired_at=fired_at, late=decision.outcome is Outcome.LATE,
                status=status, reason=reason,
                keys=key_columns(self.engine.ruleset.tables[key.table], row))
            # A closed sender raises: the claim stays unfinished and is resumed.
            result = await self.webhooks.send(event)
            detail["webhook"] = {"event": rule.webhook, **result.as_detail()}
            if not result.ok:
                failed = True
        outcome = Outcome.FAILED if failed else decision.outcome
        result = ActionResult(key, fired_at, outcome, status, reason, decision.recipients,
                              detail, rule.webhook if webhook else None)
        timeline = self._timeline(rule, key, outcome, fired_at, detail)
        recorded = await self._retried(lambda: self.store.complete(
            key, self.fence, outcome.value, fired_at, result.lateness_ms, detail, timeline),
            "complete")
        if not recorded:
            log.warning("complete_fenced", rule=key.rule, table=key.table, row_id=key.row_key)
        return self._report(result)

    @staticmethod
    async def _retried(call: Callable[[], Awaitable[Any]], what: str) -> Any:
        return await retrying(call, attempts=STORE_ATTEMPTS, give_up_after=STORE_GIVE_UP_S,
                              retry_on=is_transient, event="store_retry",
                              context={"call": what})

    def _report(self, result: ActionResult) -> ActionResult:
        key = result.key
        failed = result.outcome is Outcome.FAILED
        # The event is built only for someone who takes it: a log line at its
        # level, or the publisher. Replay, at WARNING, fires most actions unread.
        logged = failed or logs.enabled(logging.INFO)
        if logged or self.publisher is not None:
            event = ActionEvent(key.rule, key.table, key.row_key, format_instant(key.due_at),
                                format_instant(result.fired_at), result.lateness_ms,
                                result.outcome.value, result.status, result.reason,
                                result.detail)
            if failed:
                log.warning("action", **event.as_dict())
            elif logged:
                log.info("action", **event.as_dict())
            if self.publisher is not None:
                self.publisher.publish(event)
        if self.metered:
            metrics.action_counter(key.rule, result.outcome.value).inc()
            metrics.FIRING_LATENESS.observe(max(0, result.fired_at - key.due_at) / 1e6)
        if self.on_result is not None:
            self.on_result(result)
        return result


__all__ = ["ActionResult", "Deliverer", "Executor"]
