"""The change-source port, and the backoff every source reconnects with."""
from __future__ import annotations

import asyncio
from typing import Protocol

from tenacity import RetryCallState, wait_exponential_jitter

from listener.changes import Change


class ChangeSink(Protocol):
    """What a source feeds: the daemon."""

    def put(self, change: Change) -> None:
        """Queue one change; never blocks, never raises."""

    def bad_input(self, kind: str, detail: str, session_id: str | None = None) -> None:
        """A payload that could not be read: logged and counted."""

    def subscribed(self, source: str) -> None:
        """The stream is live (again): changes from now on arrive, earlier ones
        may be lost, so the daemon sweeps."""

    def unsubscribed(self, source: str, reason: str) -> None: ...


class ChangeSource(Protocol):
    name: str

    async def run(self, sink: ChangeSink) -> None:
        """Deliver changes until cancelled, reconnecting by itself."""


class Backoff:
    """tenacity's exponential backoff with jitter, restarted after a success."""

    def __init__(self, initial: float = 0.2, maximum: float = 15.0) -> None:
        self._wait = wait_exponential_jitter(multiplier=initial, max=maximum, jitter=initial)
        self._attempt = 0

    def reset(self) -> None:
        self._attempt = 0

    async def sleep(self) -> float:
        self._attempt += 1
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = self._attempt
        delay = self._wait(state)
        await asyncio.sleep(delay)
        return delay
