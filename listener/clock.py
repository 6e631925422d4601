"""Clocks are injected: the live daemon reads the wall clock, replay a virtual one."""
from __future__ import annotations

import time
from typing import Protocol

from listener.instants import Instant


class Clock(Protocol):
    def now(self) -> Instant: ...


class WallClock:
    def now(self) -> Instant:
        return time.time_ns() // 1000


class VirtualClock:
    """Moves only forward, and only when told."""

    def __init__(self, start: Instant = 0) -> None:
        self._now = start

    def now(self) -> Instant:
        return self._now

    def advance_to(self, instant: Instant) -> None:
        if instant > self._now:
            self._now = instant
