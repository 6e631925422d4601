"""The store in memory: replay and unit tests. Same contract as the SQL functions."""
from __future__ import annotations

from typing import Any, AsyncIterator, Mapping

from listener.instants import Instant, format_instant
from listener.rules.query import STATUS_CHANGED_AT, TableQuery
from listener.store import (
    CLAIMED, CONFLICT, DONE, FENCED, MISSING, STALE, ActionKey, Contact, Fence, FireRequest,
    Fired, LedgerEntry, UnfinishedClaim)


class MemoryStore:
    def __init__(self, queries: Mapping[str, TableQuery]) -> None:
        self.queries = dict(queries)
        self.rows: dict[str, dict[str, dict[str, Any]]] = {name: {} for name in queries}
        self.ledger: dict[ActionKey, LedgerEntry] = {}
        self.timeline: list[dict[str, Any]] = []
        self.lease: tuple[str, int] | None = None
        self._token = 0
        self._versions = 0  # stands in for xmin: every write makes a new version

    # -- what the app (or a replay log) does to a table ------------------------------

    def write(self, table: str, record: dict[str, Any], at: Instant) -> dict[str, Any]:
        """Store a row as the database would, stamping `status_changed_at` as the
        trigger does when the row does not carry one. Returns the stored row."""
        query = self.queries[table]
        row = dict(record)
        key = str(row[query.key])
        previous = self.rows[table].get(key)
        if query.stamps_status and row.get(STATUS_CHANGED_AT) is None:
            if previous is not None and previous.get(query.status) == row.get(query.status):
                row[STATUS_CHANGED_AT] = previous.get(STATUS_CHANGED_AT)
            else:
                row[STATUS_CHANGED_AT] = format_instant(at)
        row["_version"] = self._next_version()
        self.rows[table][key] = row
        return row

    def _next_version(self) -> str:
        self._versions += 1
        return str(self._versions)

    def remove(self, table: str, key: str) -> None:
        self.rows.get(table, {}).pop(key, None)

    # -- the Store port ----------------------------------------------------------------

    async def tracked_pages(self, table: str) -> AsyncIterator[list[dict[str, Any]]]:
        yield [dict(r) for r in self.rows.get(table, {}).values()]

    async def changed_since(self, table: str, since: Instant,
                            limit: int) -> list[dict[str, Any]]:
        return []

    async def read_row(self, table: str, key: str) -> dict[str, Any] | None:
        row = self.rows.get(table, {}).get(key)
        return None if row is None else dict(row)

    def _fenced(self, fence: Fence) -> bool:
        return self.lease is not None and self.lease != (fence.holder, fence.token)

    async def fire(self, request: FireRequest, fence: Fence) -> Fired:
        """The fire function, in memory: the same steps as in SQL."""
        if self._fenced(fence):
            return Fired(FENCED)
        key = request.key
        query = self.queries[key.table]
        row = self.rows.get(key.table, {}).get(key.row_key)
        if request.version is not None or request.status is not None or request.set_columns:
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
        if (request.status is not None or request.set_columns) and not entry.status_applied:
            assert row is not None
            if request.status is not None and request.expected is not None \
                    and row.get(query.status) not in request.expected:
                return Fired(CONFLICT, attempts=entry.attempts, row=dict(row))
            self._change(query, row, key.rule, request, request.fired_at)
            entry.status_applied = True
        if request.finish is not None:
            entry.state, entry.fired_at, entry.lateness_ms, entry.detail = (
                request.finish, request.fired_at, request.lateness_ms, request.detail or {})
            if request.timeline:
                self.timeline.append(request.timeline)
        return Fired(CLAIMED, entry.status_applied, entry.attempts,
                     None if row is None else dict(row))

    def _change(self, query: TableQuery, row: dict[str, Any], rule: str,
                request: FireRequest, at: Instant) -> None:
        stamp = format_instant(at)
        for column, value in (request.set_columns or {}).items():
            row[column] = value
        if request.status is not None:
            status = request.status
            # Only a top-level key is replaced, so a shallow copy keeps the rest intact.
            if "metadata" in row:
                metadata = dict(row["metadata"]) if isinstance(row.get("metadata"), dict) else {}
                metadata["listener"] = {"reason": request.reason or "", "rule": rule, "at": stamp}
                row["metadata"] = metadata
            row[query.status or "status"] = status
            if query.stamps_status:
                row[STATUS_CHANGED_AT] = stamp
            if "updated_at" in row:
                row["updated_at"] = stamp
            # Where the table has the column: the row carries it, or a rule reads it.
            if status == "completed" and row.get("ended_at") is None \
                    and ("ended_at" in row or "ended_at" in query.columns):
                row["ended_at"] = stamp
            if status == "cancelled" and "cancelled_at" in row and row["cancelled_at"] is None:
                row["cancelled_at"] = stamp
        row["_version"] = self._next_version()

    async def complete(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                       lateness_ms: int, detail: dict[str, Any],
                       timeline: dict[str, Any] | None = None) -> bool:
        if self._fenced(fence):
            return False
        entry = self.ledger.setdefault(key, LedgerEntry("claimed", fence.holder, fence.token))
        entry.state, entry.fired_at, entry.lateness_ms, entry.detail = (
            outcome, fired_at, lateness_ms, detail)
        if timeline:
            self.timeline.append(timeline)
        return True

    async def unfinished_claims(self) -> list[UnfinishedClaim]:
        return [UnfinishedClaim(k, e.status_applied, e.attempts, e.fired_at)
                for k, e in self.ledger.items() if e.state == "claimed"]

    async def contacts(self, table: str, key: str) -> dict[str, Contact]:
        return {}

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
