"""The change-source port (sources reconnect with listener.retry.Backoff)."""
from __future__ import annotations

import enum
from typing import Protocol

from listener.changes import Change
from listener.retry import Backoff

__all__ = ["Backoff", "BadInputKind", "ChangeSink", "ChangeSource"]  # Backoff: sources import it from here


class BadInputKind(enum.StrEnum):
    """What could not be read (the `kind` label of listener_bad_input_total)."""

    NOTIFY_PAYLOAD = "notify_payload"  # a NOTIFY that is not a change
    REALTIME_PAYLOAD = "realtime_payload"  # a Realtime frame that is not a change
    MEMORY_PAYLOAD = "memory_payload"  # a change pushed into the memory source
    CHANGE = "change"  # a change that failed to apply
    UNKNOWN_TABLE = "unknown_table"  # a change of a table no rule reads
    ROW = "row"  # a row without a usable key or status, or a key its table cannot hold
    COLUMN = "column"  # one column unreadable (the row goes on without it)
    UNKNOWN_STATUS = "unknown_status"  # a status the table does not know: terminal
    UNKNOWN_VALUE = "unknown_value"  # a value a rule's map lacks
    QUEUE_FULL = "queue_full"  # the change queue overflowed: a sweep follows


class ChangeSink(Protocol):
    """What a source feeds: the daemon."""

    def put(self, change: Change) -> None:
        """Queue one change; never blocks, never raises."""

    def bad_input(self, kind: BadInputKind, detail: str, table: str | None = None,
                  key: str | None = None) -> None:
        """A payload that could not be read: logged (with its table and key when
        known) and counted."""

    def subscribed(self, source: str) -> None:
        """The stream is live (again): changes from now on arrive, earlier ones
        may be lost, so the daemon sweeps."""

    def unsubscribed(self, source: str, reason: str) -> None: ...


class ChangeSource(Protocol):
    name: str

    async def run(self, sink: ChangeSink) -> None:
        """Deliver changes until cancelled, reconnecting by itself."""
