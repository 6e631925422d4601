"""The slice of a `public.sessions` row that the rules look at, parsed defensively.

Rows arrive from replay files, NOTIFY payloads, Realtime frames and RPC
results; any of them may carry garbage. A row without a usable id or status is
rejected (BadRow); a bad timestamp is read as null and reported, so one bad
column never takes the daemon, or the rest of the row, down.
"""
from __future__ import annotations

import sys
from typing import Any, Mapping

from listener.instants import BadInstant, Instant, parse_instant

TIMESTAMP_COLUMNS = ("scheduled_for", "started_at", "expires_at", "ended_at",
                     "summary_submitted_at")
MAX_ID_LENGTH = 100


class BadRow(ValueError):
    pass


class SessionState:
    """Memory per tracked session matters (100,000 of them under 100 MB): slots,
    integer instants, interned ids of mechanics."""

    __slots__ = ("id", "status", "mechanic_id", "status_changed_at", "scheduled_for",
                 "started_at", "expires_at", "ended_at", "summary_submitted_at", "version",
                 "fired")
    FACTS = __slots__[:-2]

    def __init__(self, id: str, status: str, mechanic_id: str | None = None,
                 status_changed_at: Instant | None = None, scheduled_for: Instant | None = None,
                 started_at: Instant | None = None, expires_at: Instant | None = None,
                 ended_at: Instant | None = None, summary_submitted_at: Instant | None = None,
                 version: str | None = None,
                 fired: tuple[tuple[int, Instant], ...] = ()) -> None:
        self.id = id
        self.status = status
        self.mechanic_id = mechanic_id
        self.status_changed_at = status_changed_at
        self.scheduled_for = scheduled_for
        self.started_at = started_at
        self.expires_at = expires_at
        self.ended_at = ended_at
        self.summary_submitted_at = summary_submitted_at
        # The row's version in the database (its xmin), when the source knows it:
        # acting on it is then a compare-and-set against the state decided on.
        self.version = version
        # (rule index, due instant) of episodes already fired: an episode fires once.
        self.fired = fired

    def same_facts(self, other: SessionState) -> bool:
        """Equal in everything a rule reads (the version may differ)."""
        return all(getattr(self, s) == getattr(other, s) for s in self.FACTS)

    def __repr__(self) -> str:
        return "SessionState(" + ", ".join(f"{s}={getattr(self, s)!r}" for s in self.__slots__) + ")"


def session_id_of(row: Any) -> str:
    if type(row) is not dict and not isinstance(row, Mapping):
        raise BadRow("row is not an object")
    sid = row.get("id")
    if type(sid) is not str or not sid or len(sid) > MAX_ID_LENGTH:
        raise BadRow(f"row has no usable id ({sid!r:.60})")
    return sid


def parse_row(row: Mapping[str, Any], previous: SessionState | None,
              at: Instant | None) -> tuple[SessionState, list[str]]:
    """Parse a row; return the state and the problems found in it.

    `status_changed_at` missing from the row (a replay log, a row from before
    the migration) is inferred: unchanged while the status is, otherwise the
    instant of the change, `at`.
    """
    sid = session_id_of(row)
    status = row.get("status")
    if type(status) is not str or not status:
        raise BadRow(f"row {sid} has no usable status ({status!r:.60})")
    problems: list[str] = []
    values: list[Instant | None] = []
    for column in TIMESTAMP_COLUMNS:
        value = row.get(column)
        if value is not None:
            try:
                value = parse_instant(value)
            except BadInstant as exc:
                problems.append(f"{column}: {exc}")
                value = None
        values.append(value)
    mechanic = row.get("mechanic_id")
    if mechanic is not None and type(mechanic) is not str:
        problems.append(f"mechanic_id: not a string ({mechanic!r:.60})")
        mechanic = None
    changed_at = row.get("status_changed_at")
    if changed_at is not None:
        try:
            changed_at = parse_instant(changed_at)
        except BadInstant as exc:
            problems.append(f"status_changed_at: {exc}")
            changed_at = None
    if changed_at is None:
        if previous is not None and previous.status == status:
            changed_at = previous.status_changed_at
        if changed_at is None:
            changed_at = at
        for column in ("updated_at", "created_at"):
            if changed_at is None:
                try:
                    changed_at = parse_instant(row.get(column))
                except BadInstant:
                    pass
    version = row.get("_version")
    state = SessionState(
        sys.intern(sid) if previous is None else previous.id,
        sys.intern(status),
        sys.intern(mechanic) if mechanic else None,
        changed_at, *values, version if type(version) is str else None)
    return state, problems
