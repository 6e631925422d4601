"""The store port: every read and write the daemon makes, as the SQL functions
in migrations/ define them. Implemented over SQL (psycopg), PostgREST RPC and
in memory (replay, unit tests), with one semantics.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol, Sequence

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


CLAIMED, DONE, FENCED = "claimed", "done", "fenced"
APPLIED, CONFLICT, MISSING = "applied", "conflict", "missing"


class Claim(NamedTuple):
    outcome: str  # CLAIMED | DONE | FENCED
    status_applied: bool = False  # a previous attempt already changed the status
    attempts: int = 1


class Transition(NamedTuple):
    outcome: str  # APPLIED | CONFLICT | MISSING | FENCED
    row: dict[str, Any] | None = None  # the row after the change, or as it is now


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
    async def tracked_rows(self) -> list[dict[str, Any]]:
        """Every row a rule may care about: non-terminal, or completed and owing a summary."""

    async def read_session(self, session_id: str) -> dict[str, Any] | None:
        """The row now, with an opaque `_version` for compare-and-set."""

    async def claim(self, key: ActionKey, fence: Fence, fired_at: Instant) -> Claim: ...

    async def transition(self, key: ActionKey, fence: Fence, expected: Sequence[str],
                         version: str | None, status: str, reason: str,
                         at: Instant) -> Transition: ...

    async def complete(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                       lateness_ms: int, detail: dict[str, Any]) -> bool:
        """Finish a claim; False when fenced."""

    async def unfinished_claims(self) -> list[UnfinishedClaim]: ...

    async def contacts(self, session_id: str) -> Contacts: ...

    async def acquire_lease(self, holder: str, ttl_seconds: float) -> int | None:
        """The fencing token when this holder now holds the lease, else None."""

    async def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool: ...

    async def release_lease(self, fence: Fence) -> None: ...
