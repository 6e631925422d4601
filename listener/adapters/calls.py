"""The listener's SQL functions as one table of calls, and the store port built on it.

Every read and write the daemon makes is one call of one function of
listener/migrations/ with named arguments. `Call` says the function's name,
its parameters (name and SQL type) and the shape of its answer; `CallingStore`
implements the Store port once in terms of these calls. The SQL store
(psycopg: `fn(p_x => %(p_x)s)`) and the RPC store (PostgREST: a JSON body of
the same names) differ only in how one call travels.
"""
from __future__ import annotations

import asyncio
import enum
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, AsyncIterator, Iterable, Mapping

import orjson

from listener.instants import Instant, format_instant, parse_instant
from listener.rules.model import Recipient, RecipientKind
from listener.rules.query import TableQuery
from listener.store import (
    ActionKey, Contact, Fence, FireOutcome, FireRequest, Fired, UnfinishedClaim)

# Rows per page of a sweep. Each page is one JSON value, so PostgREST's
# "Max rows" (which caps result rows, not the size of one value) does not cut it.
# Planning a page's query costs a few milliseconds: at 1,000 rows a page that
# was a third of the sweep's time in the database.
PAGE = 5000
MAX_PAGE = 50_000  # the functions' own cap


class SqlType(str, enum.Enum):
    TEXT = "text"
    TEXT_ARRAY = "text[]"
    JSONB = "jsonb"
    TIMESTAMPTZ = "timestamptz"
    BIGINT = "bigint"
    INTEGER = "integer"
    INTERVAL = "interval"
    BOOLEAN = "boolean"


class Shape(str, enum.Enum):
    """What a function answers."""

    VALUE = "value"  # a scalar: boolean, number, text, or null
    OBJECT = "object"  # a JSON object, or null
    ARRAY = "array"  # a JSON array
    ROWS = "rows"  # a set of rows (`returns table`), read as a list of dicts
    PAGE = "page"  # {"columns": [names], "rows": [[values in that order], ...]}, read as dicts


@dataclass(frozen=True)
class Call:
    function: str
    params: tuple[tuple[str, SqlType], ...]
    shape: Shape
    # Parameters the SQL function gives a default: a call may leave them out.
    optional: frozenset[str] = frozenset()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.params)

    def sql(self, given: Iterable[str] | None = None) -> str:
        """`select public.fn(p_a => %(p_a)s::type, ...)` (`select * from` for a set
        of rows): named, so a default or a reordered parameter can never shift an
        argument. `given`: the arguments passed, when some optional ones are not."""
        passed = set(self.names if given is None else given)
        args = ", ".join(f"{name} => %({name})s::{kind.value}"
                         for name, kind in self.params if name in passed)
        if self.shape is Shape.ROWS:
            return f"select * from public.{self.function}({args})"
        return f"select public.{self.function}({args})"

    def sql_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments as psycopg parameters (JSON as text, cast in the SQL)."""
        self._check(args)
        return {name: _sql_value(kind, args[name]) for name, kind in self.params if name in args}

    def json_args(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """The arguments as a PostgREST RPC body."""
        self._check(args)
        return {name: _json_value(kind, args[name]) for name, kind in self.params
                if name in args}

    def _check(self, args: Mapping[str, Any]) -> None:
        required = set(self.names) - self.optional
        if not required <= set(args) <= set(self.names):
            raise TypeError(f"{self.function}: arguments {sorted(args)} are not "
                            f"{sorted(required)} with some of {sorted(self.optional)}")


def _sql_value(kind: SqlType, value: Any) -> Any:
    if value is None:
        return None
    if kind is SqlType.JSONB:
        return orjson.dumps(value).decode()
    if kind is SqlType.TIMESTAMPTZ and isinstance(value, int):
        return format_instant(value)
    if kind is SqlType.TEXT_ARRAY:
        return list(value)
    return value


def _json_value(kind: SqlType, value: Any) -> Any:
    if value is None:
        return None
    if kind is SqlType.INTERVAL and isinstance(value, timedelta):
        return f"{value.total_seconds()} seconds"  # PostgreSQL reads this as an interval
    if kind is SqlType.TIMESTAMPTZ and isinstance(value, int):
        return format_instant(value)
    if kind is SqlType.TEXT_ARRAY:
        return list(value)
    return value


T, TA, J, TS, BI, I, IV, B = (SqlType.TEXT, SqlType.TEXT_ARRAY, SqlType.JSONB,
                              SqlType.TIMESTAMPTZ, SqlType.BIGINT, SqlType.INTEGER,
                              SqlType.INTERVAL, SqlType.BOOLEAN)

TRACKED_ROWS = Call("listener_tracked_rows_v3",
                    (("p_query", J), ("p_after", T), ("p_limit", I)), Shape.PAGE)
READ_ROW = Call("listener_read_row_v2", (("p_query", J), ("p_key", T)), Shape.OBJECT)
CHANGED_ROWS = Call("listener_changed_rows_v3",
                    (("p_query", J), ("p_since", TS), ("p_limit", I)), Shape.PAGE)
FIRE = Call("listener_fire_v2", (
    ("p_table", T), ("p_key_column", T), ("p_status_column", T), ("p_columns", TA),
    ("p_rule", T), ("p_key", T), ("p_due_at", TS), ("p_holder", T), ("p_token", BI),
    ("p_fired_at", TS), ("p_version", T), ("p_expected", TA), ("p_status", T),
    ("p_reason", T), ("p_set", J), ("p_finish", T), ("p_lateness_ms", BI), ("p_detail", J),
    ("p_timeline", J)), Shape.OBJECT)
COMPLETE = Call("listener_complete_v2", (
    ("p_rule", T), ("p_table", T), ("p_key", T), ("p_due_at", TS), ("p_holder", T),
    ("p_token", BI), ("p_outcome", T), ("p_fired_at", TS), ("p_lateness_ms", BI),
    ("p_detail", J), ("p_timeline", J)), Shape.VALUE)
UNFINISHED_CLAIMS = Call("listener_unfinished_claims_v2", (("p_older_than", IV),), Shape.ARRAY)
CONTACTS = Call("listener_contacts_v2", (
    ("p_table", T), ("p_key_column", T), ("p_key", T), ("p_recipients", J)), Shape.OBJECT)
DESCRIBE = Call("listener_describe_v1", (("p_tables", TA),), Shape.OBJECT)
LEASE_ACQUIRE = Call("listener_lease_acquire", (("p_holder", T), ("p_ttl_ms", I)), Shape.VALUE)
LEASE_RENEW = Call("listener_lease_renew",
                   (("p_holder", T), ("p_token", BI), ("p_ttl_ms", I)), Shape.VALUE)
LEASE_RELEASE = Call("listener_lease_release", (("p_holder", T), ("p_token", BI)), Shape.VALUE)
BATCH_FREEZE = Call("listener_batch_freeze_v1", (
    ("p_batch_key", T), ("p_payload", J), ("p_members", J), ("p_holder", T), ("p_token", BI),
    ("p_supersedes", T)), Shape.OBJECT)
NOTE_RECONCILE = Call("listener_note_reconcile_v1",
                      (("p_holder", T), ("p_at", TS), ("p_drift", BI)), Shape.VALUE)


# `listener report`: every figure the ledger gives, as one JSON object.
REPORT = Call("listener_report_v1", (("p_since", TS), ("p_until", TS)), Shape.OBJECT)

# `listener audit`: read-only questions (STABLE functions).
AUDIT_OVERDUE = Call("listener_audit_overdue_v1",
                     (("p_query", J), ("p_grace", IV), ("p_sample", I)), Shape.ROWS,
                     frozenset({"p_sample"}))
AUDIT_DEADLINE_COLUMNS = Call("listener_audit_deadline_columns_v1", (
    ("p_read", J), ("p_table", T), ("p_count", B), ("p_cap", I)), Shape.ROWS,
    frozenset({"p_table", "p_count", "p_cap"}))
AUDIT_CRON = Call("listener_audit_cron_v1", (), Shape.OBJECT)
AUDIT_LEDGER = Call("listener_audit_ledger_v1", (
    ("p_stuck_after", IV), ("p_window", IV), ("p_sample", I)), Shape.OBJECT,
    frozenset({"p_stuck_after", "p_window", "p_sample"}))
AUDIT_VALUES = Call("listener_audit_values_v1", (
    ("p_table", T), ("p_column", T), ("p_known", TA), ("p_status_column", T),
    ("p_statuses", TA), ("p_limit", I)), Shape.ROWS,
    frozenset({"p_status_column", "p_statuses", "p_limit"}))

CALLS: tuple[Call, ...] = (TRACKED_ROWS, READ_ROW, CHANGED_ROWS, FIRE, COMPLETE,
                           UNFINISHED_CLAIMS, CONTACTS, DESCRIBE, LEASE_ACQUIRE, LEASE_RENEW,
                           LEASE_RELEASE, BATCH_FREEZE, NOTE_RECONCILE, REPORT, AUDIT_OVERDUE,
                           AUDIT_DEADLINE_COLUMNS, AUDIT_CRON, AUDIT_LEDGER, AUDIT_VALUES)


class BadAnswer(ValueError):
    """A function answered something of the wrong shape."""


def check_shape(call: Call, answer: Any) -> Any:
    """The answer, checked; a PAGE answer as a list of row objects."""
    if call.shape is Shape.PAGE:
        return rows_from_json(call, answer)
    if call.shape is Shape.ARRAY:
        if answer is None:
            return []
        if not isinstance(answer, list):
            raise BadAnswer(f"public.{call.function}: expected a JSON array, "
                            f"got {type(answer).__name__}")
    elif call.shape is Shape.OBJECT:
        if answer is not None and not isinstance(answer, dict):
            raise BadAnswer(f"public.{call.function}: expected a JSON object, "
                            f"got {type(answer).__name__}")
    return answer


def rows_from_json(call: Call, answer: Any) -> list[Any]:
    """{"columns", "rows"} as one dict per row. Each row's names are said once
    per page, not once per row: building and parsing them was most of a
    sweep's cost. An element that is not an array is passed on as it is (the
    daemon reports it with its table and skips it)."""
    if answer is None:
        return []
    if not isinstance(answer, dict) or not isinstance(answer.get("columns"), list) \
            or not isinstance(answer.get("rows"), list):
        raise BadAnswer(f"public.{call.function}: expected {{\"columns\", \"rows\"}}, "
                        f"got {type(answer).__name__}")
    columns = answer["columns"]
    width = len(columns)
    return [dict(zip(columns, row)) if isinstance(row, list) and len(row) == width else row
            for row in answer["rows"]]


# --------------------------------------------------------------------------- JSON in and out


def query_json(queries: Mapping[str, TableQuery], table: str) -> dict[str, Any]:
    """What the SQL functions take for `table`: its TableQuery as JSON, with
    `stamps_status`, and for a child table the parent's query inside `parent`
    (a child row is tracked when its parent row is)."""
    query = queries[table]
    out = query.as_json()
    out["stamps_status"] = query.stamps_status
    if query.parent is not None:
        parent = queries.get(query.parent["table"])
        out["parent"] = {**query.parent,
                         "query": None if parent is None else parent.as_json()}
    return out


def recipients_json(recipients: Mapping[str, Recipient]) -> dict[str, list[dict[str, str]]]:
    """{"role": [{"kind", "column"}]} for listener_contacts_v2; support needs no column."""
    out: dict[str, list[dict[str, str]]] = {}
    for role, recipient in recipients.items():
        sources = [{"kind": s.kind.value, "column": s.column} for s in recipient.sources
                   if s.kind is not RecipientKind.SUPPORT and s.column]
        if sources:
            out[role] = sources
    return out


def fired_from_json(result: Mapping[str, Any]) -> Fired:
    """The answer of listener_fire_v2."""
    return Fired(FireOutcome(result["outcome"]), bool(result.get("status_applied", False)),
                 int(result.get("attempts", 1)), result.get("row"))


def unfinished_from_json(row: Mapping[str, Any]) -> UnfinishedClaim:
    """One element of listener_unfinished_claims_v2."""
    key = ActionKey(row["rule"], row["table_name"], str(row["row_key"]),
                    _instant(parse_instant(row["due_at"])))
    return UnfinishedClaim(key, bool(row["status_applied"]), int(row["attempts"]),
                           parse_instant(row.get("fired_at")), row.get("batch_key"))


def contacts_from_json(result: Mapping[str, Any] | None) -> dict[str, Contact]:
    out: dict[str, Contact] = {}
    for role, value in (result or {}).items():
        if isinstance(value, Mapping):
            email, name = value.get("email"), value.get("name")
            out[role] = Contact(email if isinstance(email, str) else None,
                                name if isinstance(name, str) else None)
    return out


def _instant(value: Instant | None) -> Instant:
    if value is None:
        raise ValueError("due_at is null")
    return value


def row_key_of(row: Mapping[str, Any], key: str) -> str | None:
    """A row's key as text, as the ledger and the keyset pages take it."""
    value = row.get(key)
    if type(value) is str:  # nearly every key: the checks below are for the rest
        return value
    if isinstance(value, bool) or value is None or isinstance(value, (dict, list)):
        return None
    return str(value)


# Key text as PostgreSQL's input functions read it: a uuid is 32 hex digits, a
# hyphen allowed after any group of four, the whole optionally in braces; an
# integer is decimal within its type's range (PostgreSQL 16 also reads 0x1F,
# 0o17, 0b1 and 1_000, so those are left to it). A key outside these names no
# row, and every call naming it would fail on the cast.
_UUID_TEXT = re.compile("(?:{X}|X)".replace("X", "[0-9a-fA-F]{4}(?:-?[0-9a-fA-F]{4}){7}"))
_INTEGER_TEXT = re.compile(r"\s*[+-]?(?:\d[\d_]*|0[xXoObB][0-9a-fA-F_]+)\s*")
_DECIMAL_TEXT = re.compile(r"\s*[+-]?\d+\s*")
_INTEGER_BOUND = {"smallint": 2**15, "integer": 2**31, "bigint": 2**63}


def key_fits_type(key: str, sql_type: str | None) -> bool:
    """Whether a key column of `sql_type` can hold `key` (True when the type is
    unknown or takes any text)."""
    if sql_type == "uuid":
        return _UUID_TEXT.fullmatch(key) is not None
    bound = _INTEGER_BOUND.get(sql_type or "")
    if bound is None:
        return True
    if _DECIMAL_TEXT.fullmatch(key):
        return -bound <= int(key) < bound
    return _INTEGER_TEXT.fullmatch(key) is not None


# --------------------------------------------------------------------------- the port


class CallingStore:
    """The Store port, version 2, in terms of the calls above. Subclasses say
    how one call travels (`invoke`)."""

    def __init__(self, queries: Mapping[str, TableQuery], *,
                 recipients: Mapping[str, Mapping[str, Recipient]] | None = None,
                 page: int = PAGE) -> None:
        self.queries = dict(queries)
        self.recipients = dict(recipients or {})
        self.page = max(1, min(page, MAX_PAGE))
        self.key_types: dict[str, str] = {}  # table -> its primary key's type, once described

    async def invoke(self, call: Call, args: dict[str, Any]) -> Any:
        raise NotImplementedError

    async def _call(self, call: Call, args: dict[str, Any]) -> Any:
        return check_shape(call, await self.invoke(call, args))

    # -- reads ---------------------------------------------------------------------------

    async def tracked_pages(self, table: str,
                            page: int | None = None) -> AsyncIterator[list[dict[str, Any]]]:
        """Pages of tracked rows, keyset by key; the next page is fetched while
        the caller digests this one (at start-up the wait and the parsing overlap)."""
        query = query_json(self.queries, table)
        key = query["key"]
        size = self.page if page is None else max(1, min(page, MAX_PAGE))
        ahead = asyncio.ensure_future(self._page(query, None, size))
        try:
            while True:
                rows = await ahead
                if not rows:
                    return
                last = row_key_of(rows[-1], key) if isinstance(rows[-1], dict) else None
                if len(rows) < size or last is None:
                    yield rows  # the last page (or garbage: the daemon reports the rows)
                    return
                ahead = asyncio.ensure_future(self._page(query, last, size))
                yield rows
        finally:
            ahead.cancel()
            ahead.add_done_callback(lambda t: t.cancelled() or t.exception())  # retrieved

    async def _page(self, query: dict[str, Any], after: str | None,
                    size: int) -> list[dict[str, Any]]:
        return await self._call(TRACKED_ROWS, {"p_query": query, "p_after": after,
                                               "p_limit": size})

    async def changed_since(self, table: str, since: Instant, limit: int) -> list[dict[str, Any]]:
        return await self._call(CHANGED_ROWS, {"p_query": query_json(self.queries, table),
                                               "p_since": since, "p_limit": limit})

    async def read_row(self, table: str, key: str) -> dict[str, Any] | None:
        return await self._call(READ_ROW, {"p_query": query_json(self.queries, table),
                                           "p_key": key})

    async def describe(self, tables: list[str]) -> dict[str, Any]:
        """Per table: exists, primary_key, columns {name: type}, checks {column: [def]}.
        The key types found are kept for `key_fits`."""
        answer = await self._call(DESCRIBE, {"p_tables": list(tables)}) or {}
        for table, info in answer.items():
            if not isinstance(info, dict):
                continue
            primary = info.get("primary_key") or info.get("key") or ()
            columns = info.get("columns")
            if isinstance(primary, list) and len(primary) == 1 and isinstance(columns, dict) \
                    and isinstance(columns.get(primary[0]), str):
                self.key_types[table] = columns[primary[0]]
        return answer

    def key_fits(self, table: str, key: str) -> bool:
        """Whether `key` can be a key of `table` at all: False means no row has it
        (a forged or corrupt change), so nothing may be owed to it."""
        return key_fits_type(key, self.key_types.get(table))

    # -- actions -------------------------------------------------------------------------

    def fire_args(self, request: FireRequest, fence: Fence) -> dict[str, Any]:
        key = request.key
        query = self.queries.get(key.table)
        return {
            "p_table": key.table, "p_key_column": query.key if query else "id",
            "p_status_column": query.status if query else None,
            "p_columns": list(query.columns) if query else [],
            "p_rule": key.rule, "p_key": key.row_key, "p_due_at": key.due_at,
            "p_holder": fence.holder, "p_token": fence.token, "p_fired_at": request.fired_at,
            "p_version": request.version,
            "p_expected": None if request.expected is None else list(request.expected),
            "p_status": request.status, "p_reason": request.reason,
            "p_set": dict(request.set_columns) if request.set_columns else None,
            "p_finish": request.finish, "p_lateness_ms": request.lateness_ms,
            "p_detail": request.detail or {}, "p_timeline": request.timeline,
        }

    async def fire(self, request: FireRequest, fence: Fence) -> Fired:
        """Check the row's version, claim, compare-and-set, finish: one transaction."""
        answer = await self._call(FIRE, self.fire_args(request, fence))
        if answer is None:
            raise BadAnswer("public.listener_fire_v2 answered null")
        return fired_from_json(answer)

    def complete_args(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                      lateness_ms: int, detail: dict[str, Any],
                      timeline: dict[str, Any] | None) -> dict[str, Any]:
        return {"p_rule": key.rule, "p_table": key.table, "p_key": key.row_key,
                "p_due_at": key.due_at, "p_holder": fence.holder, "p_token": fence.token,
                "p_outcome": outcome, "p_fired_at": fired_at, "p_lateness_ms": lateness_ms,
                "p_detail": detail or {}, "p_timeline": timeline}

    async def complete(self, key: ActionKey, fence: Fence, outcome: str, fired_at: Instant,
                       lateness_ms: int, detail: dict[str, Any],
                       timeline: dict[str, Any] | None = None) -> bool:
        return bool(await self._call(COMPLETE, self.complete_args(
            key, fence, outcome, fired_at, lateness_ms, detail, timeline)))

    async def unfinished_claims(self) -> list[UnfinishedClaim]:
        rows = await self._call(UNFINISHED_CLAIMS, {"p_older_than": "0"})
        return [unfinished_from_json(r) for r in rows]

    async def contacts(self, table: str, key: str) -> dict[str, Contact]:
        query = self.queries[table]
        recipients = recipients_json(self.recipients.get(table, {}))
        if not recipients:
            return {}
        return contacts_from_json(await self._call(CONTACTS, {
            "p_table": table, "p_key_column": query.key, "p_key": key,
            "p_recipients": recipients}))

    async def freeze_batch(self, batch_key: str, payload: list[dict[str, Any]],
                           members: list[dict[str, Any]], fence: Fence,
                           supersedes: str | None = None) -> Any:
        """Record an email batch before its first attempt; the batches already
        recorded for these actions (listener_batch_freeze_v1's answer)."""
        return await self._call(BATCH_FREEZE, {
            "p_batch_key": batch_key, "p_payload": payload, "p_members": members,
            "p_holder": fence.holder, "p_token": fence.token, "p_supersedes": supersedes})

    async def note_reconcile(self, holder: str, at: Instant, drift: int) -> None:
        """For the admin views: the last full reconcile, by whom, how much drift."""
        await self._call(NOTE_RECONCILE, {"p_holder": holder, "p_at": at, "p_drift": drift})

    # -- the lease -----------------------------------------------------------------------

    async def acquire_lease(self, holder: str, ttl_seconds: float) -> int | None:
        token = await self._call(LEASE_ACQUIRE, {"p_holder": holder,
                                                 "p_ttl_ms": int(ttl_seconds * 1000)})
        return None if token is None else int(token)

    async def renew_lease(self, fence: Fence, ttl_seconds: float) -> bool:
        return bool(await self._call(LEASE_RENEW, {
            "p_holder": fence.holder, "p_token": fence.token,
            "p_ttl_ms": int(ttl_seconds * 1000)}))

    async def release_lease(self, fence: Fence) -> None:
        await self._call(LEASE_RELEASE, {"p_holder": fence.holder, "p_token": fence.token})
