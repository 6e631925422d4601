"""The store port: every read and write the daemon makes, as the SQL functions
in migrations/ define them. Implemented over SQL (psycopg), PostgREST RPC and
in memory (replay, unit tests), with one semantics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, AsyncIterator, NamedTuple, Protocol

from listener.instants import Instant, format_instant


class ActionKey(NamedTuple):
    """One episode: a rule, a session, a due instant. Unique in the ledger."""

    rule: str
    session_id: str
    due_at: Instant

    @property
    def idempotency_key(self) -> str:
        return f"listener/{self.rule}/{self.session_id}/{format_instant(self.due_at)}"


@dataclass(frozen=True, slots=True)
class Fence:
    """Who acts, with the lease's fencing token: a stale holder can change nothing."""

    holder: str
    token: int


CLAIMED, DONE, FENCED, STALE, CONFLICT, MISSING = (
    "claimed", "done", "fenced", "stale", "conflict", "missing")


class Fired(NamedTuple):
    """What listener_fire answered."""

    outcome: str  # CLAIMED | DONE | FENCED | STALE | CONFLICT | MISSING
    status_applied: bool = False  # the status change is made (now or by an earlier attempt)
    attempts: int = 1
    row: dict[str, Any] | None = None  # the row after the change (CLAIMED), or as it is now


class FireRequest(NamedTuple):
    """One call of listener_fire; see migrations/0003_functions.sql."""

    key: ActionKey
    fired_at: Instant
    version: str | None = None  # act only if the row is still at this version
    expected: tuple[str, ...] | None = None  # statuses the compare-and-set accepts
    status: str | None = None
    reason: str | None = None
    finish: str | None = None  # complete the claim with this outcome, in the same call
    lateness_ms: int | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Contacts:
    customer_email: str | None = None
    customer_name: str | None = None
    mechanic_email: str | None = None
    mechanic_name: str | None = None


@dataclass(frozen=True, slots=True)
class UnfinishedClaim:
    key: ActionKey
    status_applied: bool
    attempts: int
    fired_at: Instant | None = None


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
    def tracked_pages(self) -> AsyncIterator[list[dict[str, Any]]]:
        """Every row a rule may care about (non-terminal, or completed and owing a
        summary), in pages, with the rule columns and `_version`."""

    async def read_session(self, session_id: str) -> dict[str, Any] | None:
        """The row now, with an opaque `_version` for compare-and-set."""

    async def fire(self, request: FireRequest, fence: Fence) -> Fired:
        """Check the row's version, claim, change the status, finish: one transaction."""

    async def complete(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                       lateness_ms: int, detail: dict[str, Any]) -> bool:
        """Finish a claim; False when fenced."""

    async def unfinished_claims(self) -> list[UnfinishedClaim]: ...

    async def contacts(self, session_id: str) -> Contacts: ...

    async def acquire_lease(self, holder: str, ttl_seconds: float) -> int | None:
        """The fencing token when this holder now holds the lease, else None."""

    async def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool: ...

    async def release_lease(self, fence: Fence) -> None: ...


async def all_tracked(store: Store) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    async for page in store.tracked_pages():
        rows.extend(page)
    return rows
