"""Row changes as every source delivers them, validated into one shape."""
from __future__ import annotations

import orjson
from dataclasses import dataclass
from typing import Any

from listener.instants import BadInstant, Instant, parse_instant
from listener.sessions import BadRow, session_id_of

CHANGE_TYPES = ("INSERT", "UPDATE", "DELETE")


class BadChange(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Change:
    type: str  # INSERT | UPDATE | DELETE
    session_id: str
    record: dict[str, Any] | None  # full row for INSERT and UPDATE
    at: Instant | None = None  # when the database saw it, if known
    table: str = "sessions"


def change_from_payload(payload: Any, *, require_at: bool = False) -> Change:
    """Validate {"type", "table"?, "record", "old_record", "at"?} (replay lines and
    NOTIFY payloads share this shape). Raises BadChange with a reason."""
    if not isinstance(payload, dict):
        raise BadChange("not a JSON object")
    kind = payload.get("type")
    if kind not in CHANGE_TYPES:
        raise BadChange(f"type must be one of {', '.join(CHANGE_TYPES)}, not {kind!r:.40}")
    table = payload.get("table") or "sessions"
    if not isinstance(table, str):
        raise BadChange("table must be a string")
    at = None
    if require_at or payload.get("at") is not None:
        try:
            at = parse_instant(payload.get("at"))
        except BadInstant as exc:
            raise BadChange(f"at: {exc}") from None
        if at is None:
            raise BadChange("at is missing")
    record = payload.get("record")
    try:
        if kind == "DELETE":
            old = payload.get("old_record") or record
            return Change(kind, session_id_of(old), None, at, table)
        if not isinstance(record, dict):
            raise BadChange(f"{kind} needs a record object")
        return Change(kind, session_id_of(record), record, at, table)
    except BadRow as exc:
        raise BadChange(str(exc)) from None


def change_from_line(line: str) -> Change:
    try:
        payload = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadChange(f"not JSON ({exc})") from None
    return change_from_payload(payload, require_at=True)
