"""The store in memory: replay and unit tests. Same contract as the SQL functions."""
from __future__ import annotations

from typing import Any, AsyncIterator

from listener.instants import Instant, format_instant
from listener.store import (
    CONFLICT, DONE, FENCED, MISSING, STALE, CLAIMED, ActionKey, Contacts, Fence, FireRequest,
    Fired, LedgerEntry, UnfinishedClaim)
from listener.rules.table import TERMINAL


class MemoryStore:
    def __init__(self) -> None:
        self.rows: dict[str, dict[str, Any]] = {}
        self.ledger: dict[ActionKey, LedgerEntry] = {}
        self.lease: tuple[str, int] | None = None
        self._token = 0
        self._versions = 0  # stands in for xmin: every write makes a new version

    # -- what the app (or a replay log) does to the table ------------------------

    def write(self, record: dict[str, Any], at: Instant) -> dict[str, Any]:
        """Store a row as the database would, stamping `status_changed_at` as the
        trigger does when the row does not carry one. Returns the stored row."""
        row = dict(record)
        previous = self.rows.get(row["id"])
        if row.get("status_changed_at") is None:
            if previous is not None and previous.get("status") == row.get("status"):
                row["status_changed_at"] = previous.get("status_changed_at")
            else:
                row["status_changed_at"] = format_instant(at)
        row["_version"] = self._next_version()
        self.rows[row["id"]] = row
        return row

    def _next_version(self) -> str:
        self._versions += 1
        return str(self._versions)

    def remove(self, session_id: str) -> None:
        self.rows.pop(session_id, None)

    # -- the Store port ----------------------------------------------------------------

    async def tracked_pages(self) -> AsyncIterator[list[dict[str, Any]]]:
        yield [dict(r) for r in self.rows.values()
               if r.get("status") not in TERMINAL
               or (r.get("status") == "completed" and r.get("summary_submitted_at") is None)]

    async def read_session(self, session_id: str) -> dict[str, Any] | None:
        row = self.rows.get(session_id)
        return None if row is None else dict(row)

    def _fenced(self, fence: Fence) -> bool:
        return self.lease is not None and self.lease != (fence.holder, fence.token)

    async def fire(self, request: FireRequest, fence: Fence) -> Fired:
        """listener_fire, in memory (the same steps, see migrations/0003_functions.sql)."""
        if self._fenced(fence):
            return Fired(FENCED)
        key = request.key
        row = self.rows.get(key.session_id)
        if request.version is not None or request.status is not None:
            if row is None:
                return Fired(MISSING)
            if request.version is not None and row.get("_version") != request.version:
                return Fired(STALE, row=dict(row))
        entry = self.ledger.get(key)
        if entry is None:
            entry = self.ledger[key] = LedgerEntry("claimed", fence.holder, fence.token,
                                                   fired_at=request.fired_at)
        elif entry.state != "claimed":
            return Fired(DONE)
        else:
            entry.holder, entry.token, entry.attempts = fence.holder, fence.token, entry.attempts + 1
        if request.status is not None and not entry.status_applied:
            assert row is not None
            if request.expected is not None and row.get("status") not in request.expected:
                return Fired(CONFLICT, attempts=entry.attempts, row=dict(row))
            self._change_status(row, key.rule, request.status, request.reason or "",
                                request.fired_at)
            entry.status_applied = True
        if request.finish is not None:
            entry.state, entry.fired_at, entry.lateness_ms, entry.detail = (
                request.finish, request.fired_at, request.lateness_ms, request.detail or {})
        return Fired(CLAIMED, entry.status_applied, entry.attempts,
                     None if row is None else dict(row))

    def _change_status(self, row: dict[str, Any], rule: str, status: str, reason: str,
                       at: Instant) -> None:
        stamp = format_instant(at)
        # Only a top-level key is replaced, so a shallow copy keeps the rest intact.
        metadata = dict(row["metadata"]) if isinstance(row.get("metadata"), dict) else {}
        metadata["listener"] = {"reason": reason, "rule": rule, "at": stamp}
        row.update(status=status, metadata=metadata, updated_at=stamp, status_changed_at=stamp,
                   _version=self._next_version())
        if status == "completed" and row.get("ended_at") is None:
            row["ended_at"] = stamp
        if status == "cancelled" and "cancelled_at" in row and row["cancelled_at"] is None:
            row["cancelled_at"] = stamp

    async def complete(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                       lateness_ms: int, detail: dict[str, Any]) -> bool:
        if self._fenced(fence):
            return False
        entry = self.ledger.setdefault(key, LedgerEntry("claimed", fence.holder, fence.token))
        entry.state, entry.fired_at, entry.lateness_ms, entry.detail = (
            outcome, fired_at, lateness_ms, detail)
        return True

    async def unfinished_claims(self) -> list[UnfinishedClaim]:
        return [UnfinishedClaim(k, e.status_applied, e.attempts, e.fired_at)
                for k, e in self.ledger.items() if e.state == "claimed"]

    async def contacts(self, session_id: str) -> Contacts:
        return Contacts()

    async def acquire_lease(self, holder: str, ttl_seconds: float) -> int | None:
        if self.lease is None or self.lease[0] != holder:
            self._token += 1
            self.lease = (holder, self._token)
        return self.lease[1]

    async def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool:
        return self.lease == (fence.holder, fence.token)

    async def release_lease(self, fence: Fence) -> None:
        if self.lease == (fence.holder, fence.token):
            self.lease = None
