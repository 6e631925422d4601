"""The store in memory: replay and unit tests. The same contract as the SQL
functions (listener/migrations/0006_rows_of_any_table.sql), with the rows'
conditions evaluated here from the same TableQuery JSON.

Memory knows no schema: a row has the columns it was written with, and a
column the row lacks is one the table lacks (the SQL functions ask the
catalogue instead).
"""
from __future__ import annotations

import math
import re
from datetime import datetime, timezone
from typing import Any, AsyncIterator, Mapping

from listener.adapters.calls import (
    MAX_PAGE, PAGE, contacts_from_json, query_json, recipients_json, row_key_of)
from listener.clock import Clock, WallClock
from listener.instants import SECOND, Instant, format_instant
from listener.rules.model import Recipient
from listener.rules.query import STATUS_CHANGED_AT, TableQuery
from listener.store import (
    CLAIMED, CONFLICT, DONE, FENCED, MISSING, STALE, ActionKey, Contact, Fence, FireRequest,
    Fired, LedgerEntry, UnfinishedClaim)

# Where contacts come from, as in the database.
USERS, PROFILES, MECHANICS = "auth.users", "profiles", "mechanics"
UUID_TEXT = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.I)
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def time_of(value: Any) -> float | int | None:
    """A column's instant as the database compares it: microseconds, +-inf for
    'infinity', any year (a year-9999 deadline is a deadline here; the engine
    decides what to do with it); None when null or not a time."""
    if value is None:
        return None
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text == "infinity":
            return math.inf
        if text == "-infinity":
            return -math.inf
        if text.endswith("z"):
            text = text[:-1] + "+00:00"
        try:
            dt = datetime.fromisoformat(text)
        except ValueError:
            return None
    else:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    delta = dt - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * SECOND + delta.microseconds


def _sortable(value: Any) -> tuple[int, Any]:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


class MemoryStore:
    def __init__(self, queries: Mapping[str, TableQuery] | None = None, *,
                 recipients: Mapping[str, Mapping[str, Recipient]] | None = None,
                 clock: Clock | None = None, page: int = PAGE) -> None:
        self.queries = dict(queries or {})
        self.recipients = dict(recipients or {})
        self.clock = clock or WallClock()
        self.page = max(1, min(page, MAX_PAGE))
        self.tables: dict[str, dict[str, dict[str, Any]]] = {}
        self.changed_at: dict[tuple[str, str], Instant] = {}
        self.ledger: dict[ActionKey, LedgerEntry] = {}
        # (holder, token, expires at); None until someone first takes it (replay
        # never does, and acts unfenced).
        self.lease: tuple[str | None, int, float] | None = None
        self._token = 0
        self._versions = 0  # stands in for xmin: every write makes a new version

    # -- what the app (or a replay log) does to its tables ------------------------------

    def _key_column(self, table: str) -> str:
        query = self.queries.get(table)
        return query.key if query is not None else "id"

    def write(self, table: str, record: dict[str, Any], at: Instant, *,
              owned: bool = False, key: str | None = None) -> dict[str, Any]:
        """Store a row as the database would: status_changed_at stamped like the
        trigger does on a table whose rules anchor on it (a writer that sets it
        itself is trusted), a new version. Returns the stored row.

        `owned`: the caller gives `record` up (replay parsed it for this write
        alone), so it is stored as it is rather than copied. `key`: the row's
        key as text, when the caller has read it already."""
        query = self.queries.get(table)
        if key is None:
            key_column = query.key if query is not None else "id"
            key = record.get(key_column)
            if type(key) is not str:  # nearly every key is text: row_key_of reads the rest
                key = row_key_of(record, key_column)
            if key is None:
                raise ValueError(f"{table}: row has no usable {key_column}")
        rows = self.tables.get(table)
        if rows is None:
            rows = self.tables[table] = {}
        previous = rows.get(key)
        row = record if owned else dict(record)
        if query is not None and query.stamps_status and query.status:
            stamp = row.get(STATUS_CHANGED_AT)
            if previous is None:
                row[STATUS_CHANGED_AT] = stamp if stamp is not None else format_instant(at)
            elif row.get(query.status) != previous.get(query.status):
                if stamp is None or stamp == previous.get(STATUS_CHANGED_AT):
                    row[STATUS_CHANGED_AT] = format_instant(at)
            elif stamp is None:
                row[STATUS_CHANGED_AT] = previous.get(STATUS_CHANGED_AT)
        self._versions += 1
        row["_version"] = str(self._versions)
        rows[key] = row
        self.changed_at[(table, key)] = at
        return row

    def remove(self, table: str, key: str) -> None:
        self.tables.get(table, {}).pop(key, None)
        self.changed_at.pop((table, key), None)

    def _next_version(self) -> str:
        self._versions += 1
        return str(self._versions)

    def _view(self, table: str, row: dict[str, Any]) -> dict[str, Any]:
        """The row as the functions answer it: the query's columns and _version."""
        out = {c: row[c] for c in self.queries[table].columns if c in row}
        out["_version"] = row["_version"]
        return out

    # -- conditions, from the TableQuery JSON ----------------------------------------------

    def _anchor(self, table: str, key: str, row: dict[str, Any],
                anchor: Mapping[str, Any]) -> float | int | None:
        derived = anchor.get("derived")
        if derived is None:
            return time_of(row.get(anchor.get("column")))
        start = time_of(row.get(derived.get("start")))
        if start is None:
            return None
        total = 0.0
        for term in derived.get("lookups") or ():
            value = row.get(term["column"])
            amount = None if value is None else (term.get("map") or {}).get(str(value))
            if amount is None:
                return None
            total += float(amount) * term["unit_us"]
        for term in derived.get("sums") or ():
            children = self.tables.get(term["table"], {}).values()
            amount = sum(float(c[term["column"]]) for c in children
                         if c.get(term["column"]) is not None
                         and row_key_of(c, term["by"]) == key)
            total += amount * term["unit_us"]
        return start + round(total) if not math.isinf(start) else start

    def _holds(self, table: str, key: str, row: dict[str, Any],
               query: Mapping[str, Any]) -> bool:
        status = query.get("status")
        now = self.clock.now()
        for cond in query.get("conditions") or ():
            statuses = cond.get("statuses") or []
            if statuses and (status is None or row.get(status) is None
                             or str(row.get(status)) not in statuses):
                continue
            if any(row.get(c) is None for c in cond.get("present") or ()):
                continue
            if any(row.get(c) is not None for c in cond.get("absent") or ()):
                continue
            anchors = [a for a in (self._anchor(table, key, row, x)
                                   for x in cond.get("anchors") or ()) if a is not None]
            if not anchors:
                continue
            horizon = cond.get("horizon_us")
            if horizon is not None and max(anchors) < now - horizon:
                continue
            return True
        return False

    def _tracked(self, table: str, key: str, row: dict[str, Any],
                 query: Mapping[str, Any]) -> bool:
        parent = query.get("parent")
        if not parent:
            return self._holds(table, key, row, query)
        parent_query = parent.get("query")
        parent_key = row_key_of(row, parent["by"])
        if parent_query is None or parent_key is None:
            return False
        parent_row = self.tables.get(parent["table"], {}).get(parent_key)
        return parent_row is not None and self._holds(parent["table"], parent_key, parent_row,
                                                      parent_query)

    # -- the catalogue ---------------------------------------------------------------

    async def describe(self, tables: list[str]) -> dict[str, Any]:
        """listener_describe_v1, in memory. A table exists when the store has a
        query or rows for it; its columns are the ones its rows have and the ones
        the rules read (nothing here says a column is missing), its primary key
        the query's key, and it has no CHECK constraints."""
        out: dict[str, Any] = {}
        for table in tables:
            query = self.queries.get(table)
            rows = self.tables.get(table)
            if query is None and rows is None:
                out[table] = {"exists": False}
                continue
            columns = dict.fromkeys(query.columns if query is not None else ())
            if query is not None and query.stamps_status:
                columns[STATUS_CHANGED_AT] = None
            for row in (rows or {}).values():
                columns.update(dict.fromkeys(c for c in row if not c.startswith("_")))
            out[table] = {"exists": True, "primary_key": [self._key_column(table)],
                          "columns": {c: "unknown" for c in columns}, "checks": {}}
        return out

    # -- the Store port ----------------------------------------------------------------

    async def tracked_pages(self, table: str,
                            page: int | None = None) -> AsyncIterator[list[dict[str, Any]]]:
        size = self.page if page is None else max(1, min(page, MAX_PAGE))
        query = query_json(self.queries, table)
        key_column = query["key"]
        rows = sorted(((k, r) for k, r in self.tables.get(table, {}).items()
                       if self._tracked(table, k, r, query)),
                      key=lambda kr: _sortable(kr[1].get(key_column)))
        views = [self._view(table, r) for _, r in rows]
        for start in range(0, len(views), size):
            yield views[start:start + size]

    async def changed_since(self, table: str, since: Instant, limit: int) -> list[dict[str, Any]]:
        key_column = self._key_column(table)
        changed = sorted(((at, k) for (t, k), at in self.changed_at.items()
                          if t == table and at >= since),
                         key=lambda ak: (ak[0], _sortable(self.tables[table][ak[1]]
                                                          .get(key_column))))
        return [{**self._view(table, self.tables[table][k]), "_changed_at": format_instant(at)}
                for at, k in changed[:max(1, limit)]]

    async def read_row(self, table: str, key: str) -> dict[str, Any] | None:
        row = self.tables.get(table, {}).get(key)
        return None if row is None else self._view(table, row)

    def _fenced(self, fence: Fence) -> bool:
        if self.lease is None:
            return False
        holder, token, expires = self.lease
        return (holder, token) != (fence.holder, fence.token) or expires <= self.clock.now()

    async def fire(self, request: FireRequest, fence: Fence) -> Fired:
        """listener_fire_v2, in memory: the same steps."""
        if self.lease is not None and self._fenced(fence):
            return Fired(FENCED)
        key = request.key
        table = key.table
        query = self.queries[table]
        rows = self.tables.get(table)
        row = rows.get(key.row_key) if rows is not None else None
        changes = request.status is not None or request.set_columns is not None
        version = request.version
        checked = version is not None or changes
        if checked:
            if row is None:
                return Fired(MISSING)
            if version is not None and row.get("_version") != version:
                return Fired(STALE, row=self._view(table, row))
        ledger = self.ledger
        entry = ledger.get(key)
        if entry is None:
            # A first claim finished in the same call (nearly every one): the
            # entry is made in its final state at once, unless the
            # compare-and-set may stop it between the claim and the finish.
            if request.finish is not None and (not changes or self._may_change(row, query, request)):
                if changes:
                    self._change(row, query, request)
                if request.timeline:
                    self._insert_timeline(request.timeline)
                ledger[key] = LedgerEntry(request.finish, fence.holder, fence.token, 1, changes,
                                          request.fired_at, request.lateness_ms,
                                          dict(request.detail or {}))
                # The row is answered only when this call changed it: otherwise it is
                # at the caller's version, and nothing follows the claim to read it.
                # Copying it anyway was a third of the call (its values are cold).
                return Fired(CLAIMED, changes, 1, self._view(table, row) if changes else None)
            entry = ledger[key] = LedgerEntry("claimed", fence.holder, fence.token,
                                              fired_at=request.fired_at)
        elif entry.state != "claimed":
            return Fired(DONE)
        else:
            entry.holder, entry.token, entry.attempts = fence.holder, fence.token, entry.attempts + 1
        if changes and not entry.status_applied:
            assert row is not None
            current = row.get(query.status) if query.status else None
            if request.expected is not None and (current is None
                                                 or str(current) not in request.expected):
                return Fired(CONFLICT, attempts=entry.attempts, row=self._view(table, row))
            self._change(row, query, request)
            entry.status_applied = True
        if request.finish is not None:
            detail = dict(request.detail or {})
            if request.timeline:
                self._insert_timeline(request.timeline)
            entry.state, entry.fired_at, entry.lateness_ms, entry.detail = (
                request.finish, request.fired_at, request.lateness_ms, detail)
        return Fired(CLAIMED, entry.status_applied, entry.attempts,
                     self._view(table, row) if checked and row is not None else None)

    def _may_change(self, row: dict[str, Any], query: TableQuery, request: FireRequest) -> bool:
        """Whether the compare-and-set of `request` succeeds on `row` (else the
        claim is made and then answered as a conflict, or _change raises)."""
        if query.status is None:
            return request.status is None and request.expected is None
        if request.expected is None:
            return True
        current = row.get(query.status)
        return current is not None and str(current) in request.expected

    def _change(self, row: dict[str, Any], query: TableQuery, request: FireRequest) -> None:
        stamp = format_instant(request.fired_at)
        changed = False
        status = request.status
        if status is not None:
            if query.status is None:
                raise ValueError(f"{query.table} has no status column")
            if STATUS_CHANGED_AT in row and row.get(query.status) != status:
                row[STATUS_CHANGED_AT] = stamp
            row[query.status] = status
            if "metadata" in row and (row["metadata"] is None or isinstance(row["metadata"], dict)):
                # Only a top-level key is replaced, so a shallow copy keeps the rest intact.
                metadata = dict(row["metadata"] or {})
                metadata["listener"] = {"reason": request.reason, "rule": request.key.rule,
                                        "at": stamp}
                row["metadata"] = metadata
            if status == "completed" and "ended_at" in row and row["ended_at"] is None:
                row["ended_at"] = stamp
            if status == "cancelled" and "cancelled_at" in row and row["cancelled_at"] is None:
                row["cancelled_at"] = stamp
            changed = True
        for column, value in (request.set_columns or {}).items():
            if column in row and column not in (query.key, query.status, "metadata"):
                row[column] = value
                changed = True
        if changed:
            if "updated_at" in row:
                row["updated_at"] = format_instant(self.clock.now())
            self._versions += 1
            row["_version"] = str(self._versions)

    def _insert_timeline(self, timeline: Mapping[str, Any] | None) -> None:
        if not timeline or not isinstance(timeline.get("row"), Mapping):
            return
        rows = self.tables.setdefault(str(timeline.get("table")), {})
        rows[f"timeline-{len(rows) + 1}"] = dict(timeline["row"])

    async def complete(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                       lateness_ms: int, detail: dict[str, Any],
                       timeline: dict[str, Any] | None = None) -> bool:
        if self._fenced(fence):
            return False
        entry = self.ledger.get(key)
        if entry is None or entry.state != "claimed" or (entry.holder, entry.token) != (
                fence.holder, fence.token):
            return False
        self._insert_timeline(timeline)
        entry.state, entry.fired_at, entry.lateness_ms, entry.detail = (
            outcome, fired_at, lateness_ms, detail)
        return True

    async def unfinished_claims(self) -> list[UnfinishedClaim]:
        return [UnfinishedClaim(k, e.status_applied, e.attempts, e.fired_at)
                for k, e in self.ledger.items() if e.state == "claimed"]

    async def contacts(self, table: str, key: str) -> dict[str, Contact]:
        """listener_contacts_v2, in memory: users from the rows of "auth.users"
        and "profiles", mechanics from "mechanics"."""
        row = self.tables.get(table, {}).get(key)
        recipients = recipients_json(self.recipients.get(table, {}))
        if row is None or not recipients:
            return {}
        out: dict[str, dict[str, Any]] = {}
        for role, sources in recipients.items():
            chosen: dict[str, Any] | None = None
            for source in sources:
                column = source["column"]
                if column not in row or row[column] is None:
                    continue
                value = str(row[column])
                contact: dict[str, Any] = {"email": None, "name": None}
                if UUID_TEXT.match(value):
                    if source["kind"] == "user":
                        contact["email"] = self.tables.get(USERS, {}).get(value, {}).get("email")
                        contact["name"] = self.tables.get(PROFILES, {}).get(value, {}).get(
                            "full_name")
                    elif source["kind"] == "mechanic":
                        mechanic = self.tables.get(MECHANICS, {}).get(value, {})
                        contact = {"email": mechanic.get("email"), "name": mechanic.get("name")}
                if chosen is None or (chosen["email"] is None and contact["email"] is not None):
                    chosen = contact
                if chosen["email"] is not None:
                    break
            if chosen is not None:
                out[role] = chosen
        return contacts_from_json(out)

    async def acquire_lease(self, holder: str, ttl_seconds: float) -> int | None:
        now = self.clock.now()
        expires = now + ttl_seconds * SECOND
        if self.lease is not None:
            current, token, until = self.lease
            if current == holder and until > now:
                self.lease = (holder, token, expires)
                return token
            if current is not None and until > now:
                return None
        self._token += 1
        self.lease = (holder, self._token, expires)
        return self._token

    async def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool:
        if self.lease is None or self.lease[:2] != (fence.holder, fence.token):
            return False
        self.lease = (fence.holder, fence.token, self.clock.now() + ttl_seconds * SECOND)
        return True

    async def release_lease(self, fence: Fence) -> None:
        if self.lease is not None and self.lease[:2] == (fence.holder, fence.token):
            self.lease = (None, fence.token, -math.inf)
