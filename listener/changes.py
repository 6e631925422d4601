"""Row changes as every source delivers them, validated into one shape."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Mapping

import orjson

from listener.instants import BadInstant, Instant, parse_instant
from listener.rows import key_text

DEFAULT_TABLE = "sessions"


class ChangeType(str, enum.Enum):
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"


class BadChange(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Change:
    type: ChangeType
    table: str
    key: str
    record: dict[str, Any] | None  # full row for INSERT and UPDATE; None: read it
    at: Instant | None = None  # when the database saw it, if known


def key_of(row: Any, column: str) -> str:
    if not isinstance(row, dict):
        raise BadChange("row is not an object")
    key = key_text(row.get(column))
    if key is None:
        raise BadChange(f"row has no usable {column} ({row.get(column)!r:.60})")
    return key


def change_from_payload(payload: Any, keys: Mapping[str, str] | None = None, *,
                        require_at: bool = False) -> Change:
    """Validate {"type", "table"?, "record", "old_record", "at"?} (replay lines and
    NOTIFY payloads share this shape). `keys` maps a table to its key column
    ("id" otherwise). Raises BadChange with a reason."""
    if not isinstance(payload, dict):
        raise BadChange("not a JSON object")
    try:
        kind = ChangeType(payload.get("type"))
    except ValueError:
        raise BadChange(f"type must be one of INSERT, UPDATE, DELETE, not "
                        f"{payload.get('type')!r:.40}") from None
    table = payload.get("table") or DEFAULT_TABLE
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
    column = (keys or {}).get(table, "id")
    record = payload.get("record")
    if kind is ChangeType.DELETE:
        old = payload.get("old_record") or record
        return Change(kind, table, key_of(old, column), None, at)
    if not isinstance(record, dict):
        raise BadChange(f"{kind.value} needs a record object")
    return Change(kind, table, key_of(record, column), record, at)


def change_from_line(line: str, keys: Mapping[str, str] | None = None) -> Change:
    try:
        payload = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadChange(f"not JSON ({exc})") from None
    return change_from_payload(payload, keys, require_at=True)
