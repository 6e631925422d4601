"""Hypothesis strategies for hostile input: rows as the SQL functions return
them, NOTIFY payloads and Realtime `postgres_changes` payloads, with extreme
and malformed values. For driving through the real parsing path; whatever they
generate must end as a parsed row or a logged, counted bad input, never an
exception out of the loop.

    from tests.fuzz_rows import SESSIONS, rows, notify_payloads, realtime_payloads

    @given(rows(SESSIONS))
    def test_any_row_is_read_or_refused(row): ...

A row is a dict of JSON values (timestamps as text, as the functions return
them), a payload is what the source receives: text for NOTIFY, a decoded
object for Realtime.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

# --------------------------------------------------------------------------- timestamps

# What PostgreSQL can hold and hand us as text or JSON, and what people type.
EXTREME_TIMESTAMPS = (
    "infinity", "-infinity",
    "0001-01-01 00:00:00+00 BC", "0001-01-01T00:00:00+00:00 BC", "4713-01-01 00:00:00+00 BC",
    "0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59.999999+00:00",
    "10000-01-01T00:00:00+00:00", "294276-12-31T23:59:59+00:00",
    "1800-01-01T05:53:28+05:53:28",             # local mean time offsets, to the second
    "2026-03-02 10:00:00+00", "2026-03-02T10:00:00", "2026-03-02T10:00:00.123456Z",
    "2026-03-02T10:00:00.1234567+00:00",         # more digits than microseconds
    "2026-03-02", "2026-02-30T00:00:00Z", "2026-03-02T24:00:00Z", "2026-03-02T10:00:00+25:00",
    "", " ", "now", "null", "NaN", "1772445600", "2026-03-02T10:00:00Z" * 50,
)


def timestamps() -> st.SearchStrategy[Any]:
    """A timestamp column's value: ordinary, extreme, malformed or of another type."""
    ordinary = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1),
                            timezones=st.just(timezone.utc)).map(lambda d: d.isoformat())
    with_offset = st.builds(
        lambda d, minutes: d.replace(tzinfo=timezone(timedelta(minutes=minutes))).isoformat(),
        st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)),
        st.integers(-23 * 60, 23 * 60))
    extreme = st.sampled_from(EXTREME_TIMESTAMPS)
    other_types = st.one_of(st.integers(), st.floats(), st.booleans(), st.just({"at": "2026"}),
                            st.lists(st.just("2026-03-02T10:00:00Z"), max_size=2))
    return st.one_of(ordinary, with_offset, extreme, extreme, st.none(), st.text(max_size=40),
                     other_types)


# --------------------------------------------------------------------------- JSON values

def json_values(max_leaves: int = 20) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | st.integers() | st.text(max_size=30) | st.floats(
        allow_nan=False, allow_infinity=False)
    return st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.text(max_size=10), inner, max_size=4), max_leaves=max_leaves)


def deep_json(depth: int) -> Any:
    """A list nested `depth` levels (keep it under the recursion limit to encode it)."""
    value: Any = []
    for _ in range(depth):
        value = [value]
    return value


def deep_json_text(depth: int) -> str:
    """Nested JSON as text, built without recursing: orjson refuses more than
    1024 levels, json raises RecursionError near the interpreter's limit."""
    return '{"a":' * depth + "null" + "}" * depth


def huge_metadata() -> st.SearchStrategy[Any]:
    """`metadata` the app may have stuffed: big, deep, wide, or not an object."""
    return st.one_of(
        st.just({}), json_values(),
        st.sampled_from([10_000, 100_000, 1_000_000]).map(lambda n: {"notes": "x" * n}),
        st.sampled_from([1_000, 10_000]).map(lambda n: {f"k{i}": i for i in range(n)}),
        st.integers(10, 200).map(deep_json),
        st.just("not an object"), st.just([1, 2, 3]), st.none())


# --------------------------------------------------------------------------- rows

@dataclass(frozen=True)
class RowShape:
    """What a table's rows carry: enough to make plausible and broken ones."""

    table: str
    key: str = "id"
    status: str = "status"
    known_statuses: tuple[str, ...] = ()
    timestamp_columns: tuple[str, ...] = ()
    id_columns: tuple[str, ...] = ()  # uuid references (customer, mechanic)
    other_columns: dict[str, st.SearchStrategy[Any]] = field(default_factory=dict)


SESSIONS = RowShape(
    "sessions",
    known_statuses=("pending", "scheduled", "accepted", "waiting", "live", "reconnecting",
                    "completed", "cancelled", "expired", "on_hold"),
    timestamp_columns=("created_at", "updated_at", "status_changed_at", "scheduled_for",
                       "started_at", "expires_at", "ended_at", "summary_submitted_at"),
    id_columns=("customer_user_id", "mechanic_id"),
    other_columns={"type": st.sampled_from(["chat", "video", "diagnostic", "", None, 3]),
                   "plan": st.sampled_from(["chat10", "video15", "free", "unknown", None, 15]),
                   "metadata": huge_metadata()})


def keys() -> st.SearchStrategy[Any]:
    """A key column's value: uuid or text usually, anything sometimes."""
    return st.one_of(st.uuids().map(str), st.uuids().map(str), st.integers(1, 10**12).map(str),
                     st.integers(), st.none(), st.just(""), st.text(max_size=300),
                     st.just("x" * 10_000), st.just(["not", "a", "key"]))


def statuses(shape: RowShape) -> st.SearchStrategy[Any]:
    known = st.sampled_from(shape.known_statuses) if shape.known_statuses else st.text(max_size=12)
    return st.one_of(known, known, st.sampled_from(["unknown_status", "PENDING", " pending", ""]),
                     st.none(), st.integers(), st.text(max_size=500))


def versions() -> st.SearchStrategy[Any]:
    """`_version` (xmin as text) and what a broken function might send instead."""
    return st.one_of(st.integers(1, 2**32 - 1).map(str), st.integers(), st.none(),
                     st.just("not-a-version"))


@st.composite
def rows(draw: st.DrawFn, shape: RowShape = SESSIONS, *,
         well_formed: bool = False) -> dict[str, Any]:
    """A row of `shape` as JSON, with hostile values; some columns missing,
    unknown ones added (unless `well_formed`: then every column is there with
    a plausible value)."""
    if well_formed:
        row: dict[str, Any] = {shape.key: draw(st.uuids().map(str))}
        if shape.known_statuses:
            row[shape.status] = draw(st.sampled_from(shape.known_statuses))
        for column in shape.timestamp_columns:
            row[column] = draw(st.none() | st.datetimes(
                min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1),
                timezones=st.just(timezone.utc)).map(lambda d: d.isoformat()))
        for column in shape.id_columns:
            row[column] = draw(st.none() | st.uuids().map(str))
        row["_version"] = draw(st.integers(1, 2**32 - 1).map(str))
        return row
    row = {shape.key: draw(keys()), shape.status: draw(statuses(shape)), "_version": draw(versions())}
    for column in shape.timestamp_columns:
        row[column] = draw(timestamps())
    for column in shape.id_columns:
        row[column] = draw(st.none() | st.uuids().map(str) | st.text(max_size=40) | st.integers())
    for column, strategy in shape.other_columns.items():
        row[column] = draw(strategy)
    missing = draw(st.sets(st.sampled_from(sorted(row)), max_size=3))
    for column in missing:
        del row[column]
    row.update(draw(st.dictionaries(st.text(min_size=1, max_size=20).filter(
        lambda name: name not in row), json_values(5), max_size=3)))
    return row


# --------------------------------------------------------------------------- NOTIFY

# PostgreSQL refuses a NOTIFY payload of 8000 bytes or more.
NOTIFY_LIMIT = 8000
CHANGE_TYPES = ("INSERT", "UPDATE", "DELETE")


def _change(kind: Any, shape: RowShape, record: Any, old: Any, at: Any) -> dict[str, Any]:
    payload: dict[str, Any] = {"type": kind, "table": shape.table, "schema": "public"}
    if record is not None:
        payload["record"] = record
    if old is not None:
        payload["old_record"] = old
    if at is not None:
        payload["at"] = at
    return payload


@st.composite
def notify_payloads(draw: st.DrawFn, shape: RowShape = SESSIONS) -> str:
    """Text as a NOTIFY carries it (under 8000 bytes): mostly change objects,
    often broken."""
    kind = draw(st.sampled_from(CHANGE_TYPES) | st.sampled_from(["TRUNCATE", "insert", "", None]))
    record = draw(rows(shape) | st.none() | json_values(3))
    old = draw(st.none() | st.builds(lambda key: {shape.key: key}, keys()) | json_values(3))
    payload = _change(kind, shape, record, old, draw(st.none() | timestamps()))
    payload = draw(st.just(payload) | st.builds(
        lambda p, drop: {k: v for k, v in p.items() if k not in drop}, st.just(payload),
        st.sets(st.sampled_from(sorted(payload)), min_size=1)))
    text = json.dumps(payload, default=str)
    text = draw(st.one_of(
        st.just(text), st.just(text),
        st.just(text[: len(text) // 2]),                         # cut short
        st.just(_padded(text, NOTIFY_LIMIT - 1)),                 # as large as NOTIFY allows
        st.just(deep_json_text(1_300)),                          # deeper than parsers allow
        st.text(max_size=200), st.just(""), st.just("null"), st.just("[]"), st.just('"text"'),
        st.just(json.dumps({"type": "UPDATE", "table": shape.table, "record": "not an object"})),
        st.just(json.dumps({"type": "UPDATE", "table": 42, "record": {}})),
        st.just(json.dumps({"type": "UPDATE", "table": "no_such_table",
                            "record": {shape.key: "x"}}))))
    return _fit(text, NOTIFY_LIMIT - 1)


def _fit(text: str, size: int) -> str:
    """NOTIFY cannot carry more: anything longer arrives cut (malformed)."""
    data = text.encode()
    return text if len(data) <= size else data[:size].decode("utf-8", "ignore")


def _padded(text: str, size: int) -> str:
    """`text` grown to `size` bytes with a filler field, when it is an object."""
    try:
        payload = json.loads(text)
    except ValueError:
        return text
    if not isinstance(payload, dict):
        return text
    payload["filler"] = ""
    room = size - len(json.dumps(payload).encode())
    payload["filler"] = "x" * max(0, room)
    return json.dumps(payload)


# --------------------------------------------------------------------------- Realtime

@st.composite
def realtime_payloads(draw: st.DrawFn, shape: RowShape = SESSIONS) -> Any:
    """What a `postgres_changes` callback receives: {"ids", "data": {...}},
    with the quirks Realtime has (413 errors and records cut to small
    columns, missing old_record without REPLICA IDENTITY FULL, other tables)."""
    kind = draw(st.sampled_from(CHANGE_TYPES) | st.sampled_from(["TRUNCATE", None, 1]))
    record = draw(rows(shape) | st.just({}) | st.none())
    data: dict[str, Any] = {
        "schema": draw(st.sampled_from(["public", "public", "auth", None])),
        "table": draw(st.sampled_from([shape.table, shape.table, "other_table", None])),
        "type": kind,
        "commit_timestamp": draw(timestamps()),
        "columns": draw(st.just([]) | st.lists(st.fixed_dictionaries(
            {"name": st.text(max_size=10), "type": st.sampled_from(["text", "uuid", "timestamptz"])}),
            max_size=3)),
        "errors": draw(st.sampled_from([None, None, [], ["Error 413: Payload Too Large"],
                                        "Error 413: Payload Too Large"])),
        "record": record,
        "old_record": draw(st.none() | st.builds(lambda key: {shape.key: key}, keys())
                           | st.just({})),
    }
    missing = draw(st.sets(st.sampled_from(sorted(data)), max_size=2))
    data = {k: v for k, v in data.items() if k not in missing}
    return draw(st.one_of(
        st.just({"ids": draw(st.lists(st.integers(), max_size=3)), "data": data}),
        st.just({"ids": [1], "data": data}),
        st.just({"data": "not an object"}), st.just({"ids": [1]}), st.just({}),
        st.none(), st.just([data]), st.text(max_size=50)))


# --------------------------------------------------------------------------- rows PostgreSQL stores

# timestamptz values PostgreSQL accepts at its edges: the infinities, its first
# and last instants, years before Python's datetime or beyond it, local mean
# time offsets. What it refuses (bad text) never becomes a row.
STORABLE_TIMESTAMPS = (
    "infinity", "-infinity",
    "4714-11-24 00:00:00+00 BC", "4713-01-01 00:00:00+00 BC", "0001-01-01 00:00:00+00 BC",
    "0001-01-01 00:00:00+00", "1739-12-31 23:59:59+00", "1800-01-01 05:53:28+05:53:28",
    "2199-12-31 23:59:59+00", "9999-12-31 23:59:59.999999+00", "10000-01-01 00:00:00+00",
    "294276-12-31 00:00:00+00", "294276-12-31 23:59:59.999999+00",
)
# The statuses the reference schema's CHECK on sessions allows.
SESSION_STATUSES = ("pending", "scheduled", "waiting", "live", "completed", "cancelled",
                    "expired", "refunded", "archived", "unattended")
SESSION_TIMESTAMPS = ("created_at", "updated_at", "status_changed_at", "scheduled_for",
                      "started_at", "ended_at", "cancelled_at", "expires_at",
                      "summary_submitted_at")
NOT_NULL_TIMESTAMPS = ("created_at", "updated_at")


def no_deadline(text: str | None) -> bool:
    """Whether a stored timestamp is one the daemon must refuse as a deadline:
    infinite, BC, or outside the years 1740 to 2199 (what instants may hold)."""
    if text is None:
        return False
    if text in ("infinity", "-infinity") or text.endswith(" BC"):
        return True
    year = int(text.split("-", 1)[0])
    return not 1740 <= year < 2200


def storable_timestamps(nullable: bool = True) -> st.SearchStrategy[str | None]:
    ordinary = st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2100, 1, 1),
                            timezones=st.just(timezone.utc)).map(lambda d: d.isoformat())
    recent = st.integers(-3 * 86_400, 3 * 86_400).map(
        lambda s: (datetime.now(timezone.utc) + timedelta(seconds=s)).isoformat())
    values = st.one_of(st.sampled_from(STORABLE_TIMESTAMPS), st.sampled_from(STORABLE_TIMESTAMPS),
                       ordinary, recent)
    return values | st.none() if nullable else values


def _storable(value: Any) -> Any:
    """`value` as jsonb takes it: no NUL characters, no lone surrogates."""
    if isinstance(value, str):
        return value.replace("\x00", "").encode("utf-8", "ignore").decode()
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    return value


@dataclass(frozen=True)
class JsonText:
    """jsonb given as its text (too deep for Python's encoder to build)."""

    text: str


def storable_metadata() -> st.SearchStrategy[Any]:
    """jsonb `metadata` as the app may have stuffed it: huge, deep, wide, not an
    object, the listener's own key of the wrong type, numbers past a double."""
    return st.one_of(
        huge_metadata().map(_storable),
        st.sampled_from([{"listener": "not an object"}, {"listener": [1, 2]},
                         {"listener": {"at": "infinity", "rule": 7}}, {"n": 10 ** 40},
                         {"n": -1e308}, {"": {"": None}}, "null", True, 0,
                         JsonText("null")]),
        st.sampled_from([2_000, 5_000]).map(lambda depth: JsonText(deep_json_text(depth))),
        st.sampled_from([2_000, 10_000]).map(
            lambda n: JsonText("[" + ",".join(["{}"] * n) + "]")))


@st.composite
def stored_sessions(draw: st.DrawFn) -> dict[str, Any]:
    """Columns of a `sessions` row PostgreSQL accepts (CHECK and NOT NULL
    included), with the most hostile values it accepts. People are left null or
    set to `people` (customer, mechanic) by the caller."""
    row: dict[str, Any] = {"status": draw(st.sampled_from(SESSION_STATUSES)),
                           "type": draw(st.sampled_from(["chat", "video", "diagnostic"]))}
    for column in SESSION_TIMESTAMPS:
        row[column] = draw(storable_timestamps(nullable=column not in NOT_NULL_TIMESTAMPS))
    row["plan"] = draw(st.sampled_from(["chat10", "video15", "diagnostic", "free", "unknown",
                                        "", "VIDEO15"]) | st.none()
                       | st.text(max_size=40).map(_storable))
    row["metadata"] = draw(storable_metadata())
    row["mechanic"] = draw(st.booleans())
    row["customer"] = draw(st.booleans())
    return row


@st.composite
def stored_waitlist(draw: st.DrawFn) -> dict[str, Any]:
    """Columns of a `customer_waitlist` row: no CHECK on its status, so any
    text of up to 20 characters; expires_at is NOT NULL."""
    status = draw(st.sampled_from(["pending", "notified", "expired", "cancelled"])
                  | st.sampled_from(["PENDING", " pending", "", "unknown", "x" * 20])
                  | st.text(max_size=20).map(_storable))
    return {"status": status, "expires_at": draw(storable_timestamps(nullable=False)),
            "metadata": draw(storable_metadata())}
