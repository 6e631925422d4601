"""The ports the daemon's effects plug into: email senders and event publishers.

Adapters (outbox folder, Resend, MQTT) implement these; the executor only
knows these types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class OutgoingEmail:
    to: str
    sender: str  # the From header (EMAIL_FROM)
    subject: str
    html: str
    text: str
    # Ledger claim key plus recipient role: a retry after a crash or a timeout
    # carries the same key, so Resend delivers it at most once.
    idempotency_key: str
    rule: str
    table: str
    row_id: str
    role: str  # customer | mechanic | support | a role the table declares

    @property
    def session_id(self) -> str | None:
        return self.row_id if self.table == "sessions" else None


class EmailError(Exception):
    """A send that did not succeed. `transient` ones are retried."""

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after
        self.status = status


class EmailSender(Protocol):
    async def send(self, email: OutgoingEmail) -> str:
        """Deliver one email; return the provider's id. Raise EmailError."""


@dataclass(frozen=True, slots=True)
class Delivery:
    ok: bool
    attempts: int
    provider_id: str | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ActionEvent:
    """One fired, skipped, late or failed action, as logged and published."""

    rule: str
    table: str
    row_id: str
    due_at: str  # ISO 8601 UTC
    fired_at: str
    lateness_ms: int
    outcome: str  # fired | skipped | late | failed
    status: str | None = None
    reason: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def session_id(self) -> str | None:
        return self.row_id if self.table == "sessions" else None

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.rule, "table": self.table, "row_id": self.row_id}
        if self.table == "sessions":
            out["session_id"] = self.row_id
        out.update(due_at=self.due_at, fired_at=self.fired_at, lateness_ms=self.lateness_ms,
                   outcome=self.outcome)
        if self.status is not None:
            out["status"], out["reason"] = self.status, self.reason
        if self.detail:
            out["detail"] = self.detail
        return out


class WebhookPort(Protocol):
    """Sends a rule's webhook event to the app (listener.webhooks.WebhookSender)."""

    async def send(self, event: Any) -> Any:
        """Deliver (retrying what is worth retrying); a result with `.ok` and
        `.as_detail()`. Never raises for a delivery failure."""


class EventPublisher(Protocol):
    def publish(self, event: ActionEvent) -> None:
        """Queue the event; never blocks on the broker."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...
