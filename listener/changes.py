"""Row changes as every source delivers them, validated into one shape."""
from __future__ import annotations

import enum
from typing import Any, Mapping, NamedTuple

import orjson

from listener.instants import BadInstant, Instant, instant_of_text, parse_instant


class ChangeType(str, enum.Enum):
    INSERT = "INSERT"
    UPDATE = "UPDATE"
    DELETE = "DELETE"


CHANGE_TYPES = tuple(t.value for t in ChangeType)
_CHANGE_TYPE = {t.value: t for t in ChangeType}
DEFAULT_TABLE = "sessions"
DEFAULT_KEY = "id"
MAX_KEY_LENGTH = 100


class BadChange(ValueError):
    pass


class Change(NamedTuple):
    """One change of one row. A named tuple: immutable and compared by value,
    and built in a third of a frozen dataclass's time (one per replayed line)."""

    type: ChangeType
    table: str
    key: str  # the row's key as text
    record: dict[str, Any] | None  # the row's columns for INSERT and UPDATE, when known
    at: Instant | None = None  # when the database saw it, if known

    @property
    def session_id(self) -> str | None:
        return self.key if self.table == "sessions" else None


def key_of(row: Any, column: str, table: str) -> str:
    """A row's key as text (what the ledger and the functions take). Raises BadChange."""
    # A dict (every source's rows) skips the slower check against the Mapping ABC.
    if type(row) is not dict and not isinstance(row, Mapping):
        raise BadChange(f"{table}: row is not an object")
    value = row.get(column)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if type(value) is not str or not value or len(value) > MAX_KEY_LENGTH:
        raise BadChange(f"{table}: row has no usable {column} ({value!r:.60})")
    return value


def change_from_payload(payload: Any, *, require_at: bool = False,
                        key_columns: Mapping[str, str] | None = None) -> Change:
    """Validate {"type", "table"?, "record", "old_record", "at"?} (replay lines and
    NOTIFY payloads share this shape); the key is read from the table's key
    column (`key_columns`, default "id"). Raises BadChange with a reason."""
    if not isinstance(payload, dict):
        raise BadChange("not a JSON object")
    raw = payload.get("type")
    kind = _CHANGE_TYPE.get(raw) if isinstance(raw, str) else None
    if kind is None:
        raise BadChange(f"type must be one of {', '.join(CHANGE_TYPES)}, not {raw!r:.40}")
    table = payload.get("table") or DEFAULT_TABLE
    if not isinstance(table, str):
        raise BadChange("table must be a string")
    column = (key_columns or {}).get(table, DEFAULT_KEY)
    at = None
    raw_at = payload.get("at")
    if require_at or raw_at is not None:
        try:
            # Text (every line's stamp) straight to the remembering parser.
            at = instant_of_text(raw_at) if type(raw_at) is str else parse_instant(raw_at)
        except BadInstant as exc:
            raise BadChange(f"at: {exc}") from None
        if at is None:
            raise BadChange("at is missing")
    record = payload.get("record")
    if kind is ChangeType.DELETE:
        old = payload.get("old_record") or record
        return Change(kind, table, key_of(old, column, table), None, at)
    if not isinstance(record, dict):
        raise BadChange(f"{table}: {kind.value} needs a record object")
    key = record.get(column)
    if type(key) is not str or not 0 < len(key) <= MAX_KEY_LENGTH:  # key_of, for what is not text
        key = key_of(record, column, table)
    return Change(kind, table, key, record, at)


def change_from_line(line: str, key_columns: Mapping[str, str] | None = None) -> Change:
    try:
        payload = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise BadChange(f"not JSON ({exc})") from None
    return change_from_payload(payload, require_at=True, key_columns=key_columns)
