"""What a batch of emails is, apart from how it is sent: its key, its frozen
payload, its members, and the kinds of failure a provider reports.

A batch is identified by the idempotency keys of its emails: the same emails
always make the same batch key, whatever order they were asked for in, so a
retry or a recovery that rebuilds the batch names it the same way.

A payload is a list of provider-ready email objects (JSON), every object with
its keys in sorted order at every level. The payload recorded before the first
attempt and the payload read back from the database (where jsonb reorders
keys) then serialise to the same bytes, so the provider sees one request
body under one idempotency key, whatever it compares.
"""
from __future__ import annotations

import enum
import hashlib
import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

from listener.effects import EmailError, OutgoingEmail

BATCH_KEY_PREFIX = "batch/"
# The header every email carries with its own idempotency key (Resend shows it
# as the message's entity id; mail clients stop threading equal subjects).
REF_HEADER = "X-Entity-Ref-ID"

Payload = list[dict[str, Any]]


def batch_key(member_keys: Iterable[str]) -> str:
    """'batch/' + sha256 of the sorted, distinct email keys: 70 characters."""
    joined = "\n".join(sorted(set(member_keys)))
    return BATCH_KEY_PREFIX + hashlib.sha256(joined.encode("utf-8")).hexdigest()


def canonical(value: Any) -> Any:
    """The same JSON value with every object's keys sorted (recursively)."""
    if isinstance(value, dict):
        return {str(k): canonical(value[k]) for k in sorted(value, key=str)}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return value


def canonical_payload(items: Iterable[dict[str, Any]]) -> Payload:
    return [canonical(item) for item in items]


def ref_of(item: dict[str, Any]) -> str | None:
    """The idempotency key of the email a payload item is (from its ref header)."""
    headers = item.get("headers")
    if isinstance(headers, dict):
        ref = headers.get(REF_HEADER)
        return ref if isinstance(ref, str) and ref else None
    return None


def payload_digest(payload: Payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


class Member(NamedTuple):
    """The ledger entry (one action) a batched email belongs to."""

    rule: str
    table_name: str
    row_key: str
    due_at: str  # ISO 8601 UTC, as the ledger's timestamptz reads it

    def as_json(self) -> dict[str, str]:
        return {"rule": self.rule, "table_name": self.table_name,
                "row_key": self.row_key, "due_at": self.due_at}


class FrozenBatch(NamedTuple):
    """A batch as recorded: its key, its payload, its members."""

    batch_key: str
    payload: Payload
    members: list[dict[str, Any]]


class FreezeRefused(Exception):
    """The store would not record the batch (fenced: another instance holds the lease)."""


# freeze(batch_key, payload, members, supersedes) -> the batches already frozen
# with some of these members (empty: frozen as asked); raises when not recorded.
Freeze = Callable[[str, Payload, list[dict[str, Any]], "str | None"],
                  Awaitable["list[FrozenBatch] | None"]]


class FreezeOutcome(enum.Enum):
    FROZEN = "frozen"
    TAKEN = "taken"
    FENCED = "fenced"


def frozen_batches(answer: Mapping[str, Any]) -> list[FrozenBatch]:
    """What `listener_batch_freeze_v1` answered, as `freeze` returns it (raises when fenced)."""
    outcome = FreezeOutcome(answer.get("outcome"))
    if outcome is FreezeOutcome.FENCED:
        raise FreezeRefused("fenced: this instance no longer holds the lease")
    if outcome is FreezeOutcome.FROZEN:
        return []
    return [FrozenBatch(str(b["batch_key"]), list(b["payload"]), list(b.get("members") or []))
            for b in answer.get("batches") or []]


class ErrorKind(enum.Enum):
    """How a provider refused (or may not have refused) a request."""

    RATE = "rate"  # 429 rate_limit_exceeded: slow down, retry the same request
    QUOTA = "quota"  # 429 daily/monthly quota spent: retrying soon cannot help
    INVALID = "invalid"  # 400/422: the request itself is wrong; nothing was sent
    KEY_REUSED = "key_reused"  # 409: the key was used with another body; never retry
    IN_FLIGHT = "in_flight"  # 409: the first request with this key is still running
    UNKNOWN = "unknown"  # 5xx, timeout, network: it may have been sent; retry the same
    REFUSED = "refused"  # 401/403/404/...: the account or endpoint refuses; do not retry


_TRANSIENT = {ErrorKind.RATE, ErrorKind.IN_FLIGHT, ErrorKind.UNKNOWN}


class ProviderError(EmailError):
    """An EmailError with what the provider said, for the batching mailer."""

    def __init__(self, message: str, kind: ErrorKind, *, status: int | None = None,
                 retry_after: float | None = None, invalid_index: int | None = None,
                 rate_limit: float | None = None) -> None:
        super().__init__(message, transient=kind in _TRANSIENT, retry_after=retry_after,
                         status=status)
        self.kind = kind
        self.invalid_index = invalid_index  # the batch item a 422 names, when it does
        self.rate_limit = rate_limit  # requests per second the server says it allows


class BatchSender(Protocol):
    """An EmailSender that can also send frozen payloads and batches."""

    # Requests per second the provider last said it allows (None: it did not say).
    server_rate_limit: float | None

    async def send(self, email: OutgoingEmail) -> str: ...

    def payload_item(self, email: OutgoingEmail) -> dict[str, Any]:
        """The provider-ready JSON object of one email, canonical key order."""

    async def send_item(self, item: dict[str, Any], idempotency_key: str) -> str:
        """One payload item through the single-email endpoint; its id."""

    async def send_batch(self, items: Sequence[dict[str, Any]], idempotency_key: str
                         ) -> list[str]:
        """A batch (1..100 items), strict validation; the ids in order. Raise ProviderError."""
