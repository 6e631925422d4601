"""The store port: every read and write the daemon makes, as the SQL functions
in listener/migrations/ define them. Implemented over SQL (psycopg), PostgREST
RPC and in memory (replay, unit tests), with one semantics.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, NamedTuple, Protocol

from listener.instants import Instant, format_instant


class ActionKey(NamedTuple):
    """One episode: a rule, a row (table and key), a due instant. Unique in the ledger."""

    rule: str
    table: str
    row_key: str
    due_at: Instant

    @property
    def session_id(self) -> str | None:
        return self.row_key if self.table == "sessions" else None

    @property
    def idempotency_key(self) -> str:
        # Rows of sessions keep the key release 1 used, so a claim made before
        # an upgrade is finished after it under the same key (never sent twice).
        if self.table == "sessions":
            return f"listener/{self.rule}/{self.row_key}/{format_instant(self.due_at)}"
        return f"listener/{self.rule}/{self.table}/{self.row_key}/{format_instant(self.due_at)}"


@dataclass(frozen=True, slots=True)
class Fence:
    """Who acts, with the lease's fencing token: a stale holder can change nothing."""

    holder: str
    token: int


class FireOutcome(str, enum.Enum):
    """What the fire function answered (text, as the SQL function returns it)."""

    CLAIMED = "claimed"  # ours now: act, then complete
    DONE = "done"  # finished before (by us or another instance): nothing to do
    FENCED = "fenced"  # this holder's token is no longer the lease's
    STALE = "stale"  # the row changed since the version the timer was armed on
    CONFLICT = "conflict"  # the status moved on: a status change would overwrite a user
    MISSING = "missing"  # the row is gone


CLAIMED, DONE, FENCED, STALE, CONFLICT, MISSING = (
    FireOutcome.CLAIMED, FireOutcome.DONE, FireOutcome.FENCED, FireOutcome.STALE,
    FireOutcome.CONFLICT, FireOutcome.MISSING)


class Fired(NamedTuple):
    """What listener_fire answered."""

    outcome: FireOutcome
    status_applied: bool = False  # the status change is made (now or by an earlier attempt)
    attempts: int = 1
    # The row after the change (CLAIMED), or as it is now. A claim finished in its
    # call that changed nothing may come without it: the row is at the version asked.
    row: dict[str, Any] | None = None


class FireRequest(NamedTuple):
    """One call of the fire function (check version, claim, compare-and-set, finish)."""

    key: ActionKey
    fired_at: Instant
    version: str | None = None  # act only if the row is still at this version
    expected: tuple[str, ...] | None = None  # statuses the compare-and-set accepts
    status: str | None = None
    reason: str | None = None
    finish: str | None = None  # complete the claim with this outcome, in the same call
    lateness_ms: int | None = None
    detail: dict[str, Any] | None = None
    # Other columns set with the status (or alone) in the same compare-and-set.
    set_columns: dict[str, Any] | None = None
    # A row for the app's timeline, inserted when the action finishes:
    # {"table": "session_logs", "row": {column: value}}.
    timeline: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Contact:
    email: str | None = None
    name: str | None = None


@dataclass(frozen=True, slots=True)
class UnfinishedClaim:
    key: ActionKey
    status_applied: bool
    attempts: int
    fired_at: Instant | None = None
    batch_key: str | None = None  # the frozen email batch it belongs to, if any


@dataclass(slots=True)
class LedgerEntry:
    state: str
    holder: str
    token: int
    attempts: int = 1
    status_applied: bool = False
    fired_at: Instant | None = None
    lateness_ms: int | None = None
    detail: dict[str, Any] = field(default_factory=dict)


class Fenced(Exception):
    """This instance's lease token is stale: another instance is active."""


class Store(Protocol):
    def tracked_pages(self, table: str,
                      page: int | None = None) -> AsyncIterator[list[dict[str, Any]]]:
        """Every row of `table` a rule may care about (its conditions, from the
        TableQuery the store was built with), in pages of `page` rows (the
        store's own size when None), with `_version`."""

    async def changed_since(self, table: str, since: Instant,
                            limit: int) -> list[dict[str, Any]]:
        """Rows of `table` changed at or after `since`, oldest first, at most
        `limit`: the incremental read that finds changes a source dropped."""

    async def read_row(self, table: str, key: str) -> dict[str, Any] | None:
        """The row now (the columns rules read), with an opaque `_version`."""

    async def fire(self, request: FireRequest, fence: Fence) -> Fired:
        """Check the row's version, claim, change the status, finish: one transaction."""

    async def complete(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                       lateness_ms: int, detail: dict[str, Any],
                       timeline: dict[str, Any] | None = None) -> bool:
        """Finish a claim (and write its timeline row); False when fenced."""

    async def unfinished_claims(self) -> list[UnfinishedClaim]: ...

    async def contacts(self, table: str, key: str) -> dict[str, Contact]:
        """Email and name per recipient role of the row, from the table's
        declared recipient columns."""

    async def acquire_lease(self, holder: str, ttl_seconds: float) -> int | None:
        """The fencing token when this holder now holds the lease, else None."""

    async def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool: ...

    async def release_lease(self, fence: Fence) -> None: ...


async def all_tracked(store: Store, table: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async for page in store.tracked_pages(table):
        rows.extend(page)
    return rows
