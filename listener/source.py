"""The change-source port (sources reconnect with listener.retry.Backoff)."""
from __future__ import annotations

from typing import Protocol

from listener.changes import Change
from listener.retry import Backoff

__all__ = ["Backoff", "ChangeSink", "ChangeSource"]  # Backoff: sources import it from here


class ChangeSink(Protocol):
    """What a source feeds: the daemon."""

    def put(self, change: Change) -> None:
        """Queue one change; never blocks, never raises."""

    def bad_input(self, kind: str, detail: str, table: str | None = None,
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
